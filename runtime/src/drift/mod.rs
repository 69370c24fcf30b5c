//! Drift on the device: how far a served version's live answers and inputs have moved from its
//! reference profile ([`Profile`], shipped beside the model).
//!
//! Per version, the request path counts each answered row into the bins of three kinds of
//! signal: the top-class confidence, the predicted class, and each input's per-row mean. The
//! counters are atomics in one flat array (no lock, no allocation per request). Every
//! [`DriftSettings::window`] rows the window closes: the row that fills it takes the counts
//! (swapping each to zero), scores each signal against the reference with the population
//! stability index, keeps the scores for `/metrics` and the model's statistics, and logs once if
//! the largest passes [`DriftSettings::threshold`].
//!
//! PSI = Σ (aᵢ − eᵢ) · ln(aᵢ / eᵢ) over the bins, with live share aᵢ and reference share eᵢ each
//! floored at [`FLOOR`] so that an empty bin scores finitely. The usual reading: under 0.1 no
//! real change, 0.1–0.25 a moderate one, over 0.25 a significant one (docs/quality.md).

pub mod profile;
pub(crate) mod rows;

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use serde::Serialize;

pub use self::profile::{Profile, ProfileError};
use self::rows::{for_each_row, row_mean, row_top};
use crate::onnx::Signature;
use crate::tensor::Tensor;

/// A bin's share is never taken below this in the index (an empty bin would score infinite).
pub const FLOOR: f64 = 1e-4;
/// Rows per window unless configured.
pub const DEFAULT_WINDOW: u64 = 500;
/// The score past which a window is reported, unless configured.
pub const DEFAULT_THRESHOLD: f64 = 0.25;

/// A model's drift settings (`[models.drift]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DriftSettings {
    pub window: u64,
    pub threshold: f64,
}

impl Default for DriftSettings {
    fn default() -> Self {
        DriftSettings { window: DEFAULT_WINDOW, threshold: DEFAULT_THRESHOLD }
    }
}

/// The population stability index of live `counts` against reference `fractions`; `None` with
/// no live rows.
pub fn psi(fractions: &[f64], counts: &[u64]) -> Option<f64> {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return None;
    }
    let score = fractions
        .iter()
        .zip(counts)
        .map(|(&e, &c)| {
            let (a, e) = ((c as f64 / n as f64).max(FLOOR), e.max(FLOOR));
            (a - e) * (a / e).ln()
        })
        .sum();
    Some(score)
}

/// One signal: its name in metrics and where its bins lie in the counters.
struct Signal {
    name: String,
    start: usize,
    reference: profile::Histogram,
}

/// The scores of the last closed window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Scores {
    /// Per signal (`confidence`, `class`, `input:NAME`), in the profile's order.
    pub psi: Vec<(String, f64)>,
    /// Rows the window held.
    pub rows: u64,
}

impl Scores {
    /// The largest score.
    pub fn max(&self) -> f64 {
        self.psi.iter().map(|s| s.1).fold(0.0, f64::max)
    }
}

/// What `/v2/models/{m}/stats` and the state report carry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DriftReport {
    pub window: u64,
    pub threshold: f64,
    /// Rows counted since load.
    pub rows: u64,
    /// Windows closed since load, and those whose score passed the threshold.
    pub windows: u64,
    pub alerts: u64,
    /// The last closed window's scores, once one has closed.
    pub last: Option<Scores>,
}

/// Live drift state of one served version.
pub struct Drift {
    settings: DriftSettings,
    softmax: bool,
    output: usize,
    /// Signature index of each profiled input, in the profile's order.
    inputs: Vec<usize>,
    signals: Vec<Signal>,
    counts: Box<[AtomicU64]>,
    rows: AtomicU64,
    windows: AtomicU64,
    alerts: AtomicU64,
    last: Mutex<Option<Scores>>,
}

impl Drift {
    /// Live state for a profile already checked against `signature` ([`Profile::read`]).
    pub fn new(profile: Profile, signature: &Signature, settings: DriftSettings) -> Drift {
        let output = signature.outputs.iter().position(|o| o.name == profile.output).unwrap_or(0);
        let inputs = profile
            .inputs
            .iter()
            .map(|i| signature.inputs.iter().position(|s| s.name == i.name).unwrap_or(0))
            .collect();
        let mut signals = Vec::new();
        let mut start = 0;
        let mut add = |name: String, reference: profile::Histogram| {
            let len = reference.fractions.len();
            signals.push(Signal { name, start, reference });
            start += len;
        };
        add("confidence".into(), profile.confidence);
        add("class".into(), profile.class);
        for input in profile.inputs {
            add(format!("input:{}", input.name), input.histogram);
        }
        Drift {
            settings,
            softmax: profile.softmax,
            output,
            inputs,
            signals,
            counts: (0..start).map(|_| AtomicU64::new(0)).collect(),
            rows: AtomicU64::new(0),
            windows: AtomicU64::new(0),
            alerts: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    fn count(&self, signal: usize, value: f64) {
        let s = &self.signals[signal];
        self.counts[s.start + s.reference.bin(value)].fetch_add(1, Relaxed);
    }

    /// Counts a request's inputs (before they go to the backend): each row's mean per input.
    pub fn observe_inputs(&self, inputs: &[Tensor]) {
        for (k, &i) in self.inputs.iter().enumerate() {
            let Some(t) = inputs.get(i) else { continue };
            for_each_row(t, |row| self.count(2 + k, row_mean(t, row)));
        }
    }

    /// Counts a request's answer: each row's confidence and class; closes the window when full.
    /// `model` and `version` name it in the log.
    pub fn observe_outputs(&self, outputs: &[Tensor], model: &str, version: &str) {
        let Some(t) = outputs.get(self.output) else { return };
        let mut rows = 0;
        for_each_row(t, |row| {
            let (confidence, class) = row_top(t, row, self.softmax);
            self.count(0, confidence);
            self.count(1, class as f64);
            rows += 1;
        });
        let before = self.rows.fetch_add(rows, Relaxed);
        let window = self.settings.window;
        if rows > 0 && (before + rows) / window > before / window {
            self.close(model, version);
        }
    }

    /// Takes the window's counts and scores them.
    fn close(&self, model: &str, version: &str) {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.swap(0, Relaxed)).collect();
        let psi: Vec<(String, f64)> = self
            .signals
            .iter()
            .filter_map(|s| {
                let live = &counts[s.start..s.start + s.reference.fractions.len()];
                Some((s.name.clone(), psi(&s.reference.fractions, live)?))
            })
            .collect();
        let rows =
            self.signals.first().map_or(0, |s| counts[s.start..s.start + s.reference.fractions.len()].iter().sum());
        let scores = Scores { psi, rows };
        self.windows.fetch_add(1, Relaxed);
        if scores.max() > self.settings.threshold {
            self.alerts.fetch_add(1, Relaxed);
            tracing::warn!(
                model, version, threshold = self.settings.threshold, rows, psi = ?scores.psi,
                "drift: the last window's inputs or answers moved past the threshold from the reference profile"
            );
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(scores);
    }

    pub fn report(&self) -> DriftReport {
        DriftReport {
            window: self.settings.window,
            threshold: self.settings.threshold,
            rows: self.rows.load(Relaxed),
            windows: self.windows.load(Relaxed),
            alerts: self.alerts.load(Relaxed),
            last: self.last.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// Appends this version's drift metrics (after [`METRIC_HEADERS`]).
    pub fn render(&self, out: &mut String, model: &str, version: &str) {
        let l = format!("model=\"{model}\",version=\"{version}\"");
        let r = self.report();
        let _ = writeln!(out, "outpost_drift_rows_total{{{l}}} {}", r.rows);
        let _ = writeln!(out, "outpost_drift_windows_total{{{l}}} {}", r.windows);
        let _ = writeln!(out, "outpost_drift_alerts_total{{{l}}} {}", r.alerts);
        let _ = writeln!(out, "outpost_drift_threshold{{{l}}} {}", r.threshold);
        for (signal, score) in r.last.iter().flat_map(|s| &s.psi) {
            let _ = writeln!(out, "outpost_drift_psi{{{l},signal=\"{signal}\"}} {score}");
        }
    }
}

/// The `# HELP` and `# TYPE` lines of the drift metrics.
pub const METRIC_HEADERS: &str = "\
# HELP outpost_drift_rows_total Rows counted against the version's reference profile.
# TYPE outpost_drift_rows_total counter
# HELP outpost_drift_windows_total Drift windows closed and scored.
# TYPE outpost_drift_windows_total counter
# HELP outpost_drift_alerts_total Drift windows whose largest score passed the threshold.
# TYPE outpost_drift_alerts_total counter
# HELP outpost_drift_threshold The score past which a window is reported.
# TYPE outpost_drift_threshold gauge
# HELP outpost_drift_psi Population stability index of the last closed window against the reference, per signal.
# TYPE outpost_drift_psi gauge
";

#[cfg(test)]
mod tests;
