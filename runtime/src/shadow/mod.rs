//! Shadow evaluation: a candidate model loaded beside the one serving and run on a share of its
//! live requests, off their critical path, to measure how far the candidate would answer
//! differently before anyone activates it.
//!
//! The request path pays one atomic add per request to count it, and for a sampled one a copy of
//! its inputs and of the active model's answer. The answer goes back to the client at once; the
//! candidate runs on its own worker thread, from a task spawned after the answer is known, and
//! never delays or changes it. Three bounds keep the candidate's cost in hand on a small box:
//! the share of requests sampled (`share`), the candidate runs started per second
//! (`max_per_second`) and the runs at once (`max_in_flight`). A sampled request that would pass
//! either of the last two is skipped and counted, never queued.
//!
//! Each compared request adds its rows to the counts: rows whose top class (on the class output,
//! the first float `[batch, classes]` output) agrees with the active answer, and the mean
//! absolute difference of that output's scores. The candidate's latency is a histogram; where a
//! reference profile lies beside the candidate, its drift is measured on the same rows as a
//! served version's would be.

mod compare;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Instant;

use serde::Serialize;

use self::compare::{Comparison, compare};
use crate::config::{ExecutorChoice, GoldenSource, ModelSpec, ShadowSettings, Source};
use crate::executor::NotRun;
use crate::model::{LoadError, ModelSlot};
use crate::onnx::TensorSpec;
use crate::stats::{Histogram, LATENCY_BUCKETS, quantile};
use crate::tensor::Tensor;

/// A loaded candidate and what its runs have measured.
pub struct Shadow {
    /// The model it shadows.
    pub model: String,
    pub settings: ShadowSettings,
    candidate: Arc<ModelSlot>,
    /// Requests answered by the model while the candidate was loaded.
    seen: AtomicU64,
    /// Sampled requests started on the candidate.
    started: AtomicU64,
    /// Sampled requests not run: over `max_per_second` or `max_in_flight`.
    skipped: AtomicU64,
    /// Runs that failed, or whose answer could not be compared with the active one.
    failed: AtomicU64,
    /// Runs compared.
    compared: AtomicU64,
    rows: AtomicU64,
    agreed_rows: AtomicU64,
    /// Sum over compared rows of the mean absolute score difference, in millionths.
    abs_diff_micros: AtomicU64,
    in_flight: AtomicUsize,
    /// When the next run may start, in nanoseconds since `epoch` (the rate bound).
    next_start_ns: AtomicU64,
    epoch: Instant,
    latency: Histogram,
}

/// A sampled request's claim on a candidate run; releases its in-flight place when dropped.
pub struct Permit {
    shadow: Arc<Shadow>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.shadow.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Shadow {
    /// Loads the candidate of `spec` (its golden check and warm-up as for any version) and checks
    /// that it takes the same inputs as the model, whose served version has `inputs`.
    #[allow(clippy::result_large_err)] // once per load, and the registry collects `LoadError`s
    pub fn load(spec: &ModelSpec, settings: &ShadowSettings, inputs: &[TensorSpec]) -> Result<Shadow, LoadError> {
        let candidate = Arc::new(ModelSlot::new(candidate_spec(spec, settings)));
        if let Some(first) = candidate.load().into_iter().next() {
            return Err(first);
        }
        Shadow::attach(&spec.name, candidate, settings, inputs).map_err(|reason| LoadError::Versions {
            name: spec.name.clone(),
            reason: format!("shadow candidate {}: {reason}", settings.path.display()),
        })
    }

    /// A shadow of model `model` (whose served version has `inputs`) on a loaded candidate: a
    /// model of a candidate release, or one [`Shadow::load`] loaded.
    pub fn attach(
        model: &str,
        candidate: Arc<ModelSlot>,
        settings: &ShadowSettings,
        inputs: &[TensorSpec],
    ) -> Result<Shadow, String> {
        let served = candidate.version(None).ok_or("it serves no version")?;
        same_inputs(inputs, &served.signature.inputs)?;
        drop(served);
        Ok(Shadow {
            model: model.to_owned(),
            settings: settings.clone(),
            candidate,
            seen: AtomicU64::new(0),
            started: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            compared: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            agreed_rows: AtomicU64::new(0),
            abs_diff_micros: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            next_start_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            latency: Histogram::default(),
        })
    }

    /// The candidate's model slot.
    pub fn candidate(&self) -> &Arc<ModelSlot> {
        &self.candidate
    }

    /// Counts a request that reached the model and decides whether it also runs on the
    /// candidate: every 1/`share`-th request ([`sampled`]), when the rate and in-flight bounds
    /// allow.
    pub fn admit(self: &Arc<Self>) -> Option<Permit> {
        let n = self.seen.fetch_add(1, Relaxed) + 1;
        if !sampled(n, self.settings.share) {
            return None;
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        let interval = (1e9 / self.settings.max_per_second) as u64;
        let next = self.next_start_ns.load(Relaxed);
        if now < next || self.next_start_ns.compare_exchange(next, now + interval, Relaxed, Relaxed).is_err() {
            self.skipped.fetch_add(1, Relaxed);
            return None;
        }
        if self.in_flight.fetch_add(1, Relaxed) >= self.settings.max_in_flight {
            self.in_flight.fetch_sub(1, Relaxed);
            self.skipped.fetch_add(1, Relaxed);
            return None;
        }
        Some(Permit { shadow: self.clone() })
    }

    /// Runs the candidate on `inputs` and compares its answer with `active`, on a task of its
    /// own: the caller does not wait.
    pub fn spawn(permit: Permit, inputs: Vec<Tensor>, active: Vec<Tensor>) {
        tokio::spawn(async move {
            let shadow = &permit.shadow;
            shadow.started.fetch_add(1, Relaxed);
            match shadow.run(inputs).await {
                Some(answer) => match compare(&active, &answer) {
                    Ok(Comparison { rows, agreed, abs_diff_sum }) => {
                        shadow.rows.fetch_add(rows, Relaxed);
                        shadow.agreed_rows.fetch_add(agreed, Relaxed);
                        shadow.abs_diff_micros.fetch_add((abs_diff_sum * 1e6).round() as u64, Relaxed);
                        shadow.compared.fetch_add(1, Relaxed);
                    }
                    Err(reason) => {
                        tracing::debug!(model = %shadow.candidate.spec.name, %reason, "shadow answer not compared");
                        shadow.failed.fetch_add(1, Relaxed);
                    }
                },
                None => {
                    shadow.failed.fetch_add(1, Relaxed);
                }
            }
            drop(permit);
        });
    }

    async fn run(&self, inputs: Vec<Tensor>) -> Option<Vec<Tensor>> {
        let served = self.candidate.version(None)?;
        if let Some(d) = &served.drift {
            d.observe_inputs(&inputs);
        }
        let started = Instant::now();
        let answer = match served.infer(inputs, false).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                tracing::debug!(model = %self.candidate.spec.name, error = %e, "shadow candidate failed");
                return None;
            }
            Err(NotRun::Full(_) | NotRun::Stopped) => return None,
        };
        self.latency.observe(started.elapsed());
        if let Some(d) = &served.drift {
            d.observe_outputs(&answer, &self.candidate.spec.name, &served.version);
        }
        Some(answer)
    }

    /// What the candidate has measured, for the model's statistics and the state report.
    pub fn report(&self) -> ShadowReport {
        let rows = self.rows.load(Relaxed);
        let agreed = self.agreed_rows.load(Relaxed);
        let diff = self.abs_diff_micros.load(Relaxed) as f64 / 1e6;
        let counts = self.latency.bucket_counts();
        let drift = self.candidate.version(None).and_then(|v| v.drift.as_ref().map(|d| d.report()));
        ShadowReport {
            candidate: self.settings.version.clone(),
            share: self.settings.share,
            seen: self.seen.load(Relaxed),
            started: self.started.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            failed: self.failed.load(Relaxed),
            compared: self.compared.load(Relaxed),
            rows,
            agreed_rows: agreed,
            agreement: (rows > 0).then(|| agreed as f64 / rows as f64),
            mean_abs_diff: (rows > 0).then(|| diff / rows as f64),
            p50_ms: quantile(&LATENCY_BUCKETS, &counts, 0.5).map(|s| s * 1e3),
            p99_ms: quantile(&LATENCY_BUCKETS, &counts, 0.99).map(|s| s * 1e3),
            drift,
        }
    }

    /// Appends the candidate's metrics (after [`METRIC_HEADERS`]).
    pub fn render(&self, out: &mut String, model: &str) {
        let l = format!("model=\"{model}\",candidate=\"{}\"", self.settings.version);
        for (outcome, c) in [("compared", &self.compared), ("failed", &self.failed), ("skipped", &self.skipped)] {
            let _ = writeln!(out, "outpost_shadow_requests_total{{{l},outcome=\"{outcome}\"}} {}", c.load(Relaxed));
        }
        let _ = writeln!(out, "outpost_shadow_rows_total{{{l}}} {}", self.rows.load(Relaxed));
        let _ = writeln!(out, "outpost_shadow_agreed_rows_total{{{l}}} {}", self.agreed_rows.load(Relaxed));
        let diff = self.abs_diff_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "outpost_shadow_abs_diff_total{{{l}}} {diff}");
        self.latency.render(out, "outpost_shadow_duration_seconds", &l, 1e-9);
    }
}

/// The `# HELP` and `# TYPE` lines of the shadow metrics.
pub const METRIC_HEADERS: &str = "\
# HELP outpost_shadow_requests_total Sampled requests run on the shadow candidate, by outcome (skipped: over its rate or in-flight bound).
# TYPE outpost_shadow_requests_total counter
# HELP outpost_shadow_rows_total Rows the candidate answered and were compared with the active model.
# TYPE outpost_shadow_rows_total counter
# HELP outpost_shadow_agreed_rows_total Compared rows whose top class the candidate and the active model agree on.
# TYPE outpost_shadow_agreed_rows_total counter
# HELP outpost_shadow_abs_diff_total Sum over compared rows of the mean absolute difference of their class scores.
# TYPE outpost_shadow_abs_diff_total counter
# HELP outpost_shadow_duration_seconds The candidate's backend call, per sampled request.
# TYPE outpost_shadow_duration_seconds histogram
";

/// What a shadow candidate has measured since it was loaded.
#[derive(Clone, Debug, Serialize)]
pub struct ShadowReport {
    pub candidate: String,
    pub share: f64,
    pub seen: u64,
    pub started: u64,
    pub skipped: u64,
    pub failed: u64,
    pub compared: u64,
    pub rows: u64,
    pub agreed_rows: u64,
    pub agreement: Option<f64>,
    pub mean_abs_diff: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<crate::drift::DriftReport>,
}

/// The candidate as a model of its own: the same settings where they apply, one worker behind
/// a short queue, its calls always on that worker (never inline on a request's task).
fn candidate_spec(spec: &ModelSpec, settings: &ShadowSettings) -> ModelSpec {
    let mut c = spec.clone();
    c.source = Source::File { path: settings.path.clone(), version: settings.version.clone() };
    c.golden = GoldenSource::Beside;
    c.profile = None;
    c.escalation = None;
    c.batching = None;
    c.shadow = None;
    c.workers = 1;
    c.queue_bound = settings.max_in_flight;
    c.executor = ExecutorChoice::Threads;
    c
}

/// Whether the `n`th request (from 1) is sampled at `share`: spread evenly, `floor(n * share)`
/// of the first `n`.
fn sampled(n: u64, share: f64) -> bool {
    (n as f64 * share).floor() > ((n - 1) as f64 * share).floor()
}

/// Whether the candidate's inputs are the model's: the same names, types and ranks, and the
/// same size where both fix a dimension.
fn same_inputs(model: &[TensorSpec], candidate: &[TensorSpec]) -> Result<(), String> {
    for i in model {
        match candidate.iter().find(|t| t.name == i.name) {
            None => return Err(format!("it has no input `{}`", i.name)),
            Some(t)
                if t.datatype != i.datatype
                    || t.shape.len() != i.shape.len()
                    || t.shape.iter().zip(&i.shape).any(|(&a, &b)| a >= 0 && b >= 0 && a != b) =>
            {
                return Err(format!(
                    "its input `{}` is {} {}, the model's {} {}",
                    i.name,
                    t.datatype.as_str(),
                    t.shape_text(),
                    i.datatype.as_str(),
                    i.shape_text()
                ));
            }
            Some(_) => {}
        }
    }
    if candidate.len() != model.len() {
        return Err(format!("it takes {} inputs, the model {}", candidate.len(), model.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;

    #[test]
    fn a_share_samples_evenly() {
        for (share, of_100) in [(1.0, 100), (0.25, 25), (0.1, 10), (0.03, 3)] {
            let picked: Vec<u64> = (1..=100).filter(|&n| sampled(n, share)).collect();
            assert_eq!(picked.len(), of_100, "{share}");
        }
        assert_eq!((1..=8).filter(|&n| sampled(n, 0.25)).collect::<Vec<_>>(), [4, 8]);
    }

    #[test]
    fn a_candidate_must_take_the_models_inputs() {
        let spec =
            |name: &str, datatype, shape: &[i64]| TensorSpec { name: name.into(), datatype, shape: shape.to_vec() };
        let model = [spec("input", DataType::Fp32, &[-1, 64])];
        assert!(same_inputs(&model, &[spec("input", DataType::Fp32, &[-1, 64])]).is_ok());
        assert!(same_inputs(&model, &[spec("input", DataType::Fp32, &[1, -1])]).is_ok());
        let e = same_inputs(&model, &[spec("input", DataType::Fp32, &[-1, 1, 8, 8])]).unwrap_err();
        assert_eq!(e, "its input `input` is FP32 [-1, 1, 8, 8], the model's FP32 [-1, 64]");
        assert!(same_inputs(&model, &[spec("input", DataType::Fp16, &[-1, 64])]).unwrap_err().contains("FP16"));
        assert!(same_inputs(&model, &[spec("x", DataType::Fp32, &[-1, 64])]).unwrap_err().contains("no input `input`"));
        let two = [spec("input", DataType::Fp32, &[-1, 64]), spec("mask", DataType::Fp32, &[-1, 64])];
        assert!(same_inputs(&model, &two).unwrap_err().contains("takes 2 inputs, the model 1"));
    }
}
