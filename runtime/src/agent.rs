//! The runtime's side of the MQTT agent (`[updates.mqtt]`): its settings, and the device it
//! reports on: served models, inference statistics since the last report, resources.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use outpost_updater::Refusal;
use outpost_updater::apply::{Applied, Updater};
use outpost_updater::mqtt::agent::Device;
use outpost_updater::mqtt::report::{DeviceReport, ModelDrift, ModelReport, ModelShadow, Resources, StatsReport};

use crate::registry::Registry;
use crate::releases::ReleaseService;
use crate::stats::{LATENCY_BUCKETS, quantile};

/// Reads the MQTT password file (first line, without its newline).
pub fn read_password(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// The device as the agent sees it: the update service and the serving runtime.
pub struct RuntimeDevice {
    updates: Arc<ReleaseService>,
    registry: Arc<Registry>,
    started: Instant,
    labels: BTreeMap<String, String>,
    /// Counters at the last report, per model and version, to report what happened since.
    last: Mutex<BTreeMap<String, Snapshot>>,
}

#[derive(Clone, Default)]
struct Snapshot {
    success: u64,
    failure: u64,
    rejected: u64,
    latency: Vec<u64>,
    decided: u64,
    escalated: u64,
    central_failures: u64,
    confidence_sum: u64,
}

impl RuntimeDevice {
    pub fn new(
        updates: Arc<ReleaseService>,
        registry: Arc<Registry>,
        labels: BTreeMap<String, String>,
    ) -> Arc<RuntimeDevice> {
        Arc::new(RuntimeDevice { updates, registry, started: Instant::now(), labels, last: Mutex::default() })
    }

    /// Inference statistics since the previous call: totals and latency quantiles over every
    /// model, escalation rate and central failures, and the same per model.
    fn stats(&self) -> StatsReport {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = Snapshot { latency: vec![0; LATENCY_BUCKETS.len() + 1], ..Snapshot::default() };
        let mut per_model = BTreeMap::new();
        for slot in self.registry.slots().iter() {
            let esc = slot.escalator().map(|e| &e.stats);
            for (version, st) in slot.stats() {
                let key = format!("{}/{version}", slot.spec.name);
                let now = Snapshot {
                    success: st.success.load(Relaxed),
                    failure: st.failure.load(Relaxed),
                    rejected: st.rejected.load(Relaxed),
                    latency: st.request.bucket_counts(),
                    decided: esc.map_or(0, |e| e.decided.load(Relaxed)),
                    escalated: esc.map_or(0, |e| e.escalated.load(Relaxed)),
                    central_failures: esc.map_or(0, |e| e.failures.iter().map(|f| f.load(Relaxed)).sum()),
                    confidence_sum: esc.map_or(0, |e| e.confidence.sum_ns()),
                };
                let before = last.insert(key.clone(), now.clone()).unwrap_or_default();
                let d = |a: u64, b: u64| a.saturating_sub(b);
                let lat: Vec<u64> = now
                    .latency
                    .iter()
                    .enumerate()
                    .map(|(i, c)| d(*c, before.latency.get(i).copied().unwrap_or(0)))
                    .collect();
                let delta = Snapshot {
                    success: d(now.success, before.success),
                    failure: d(now.failure, before.failure),
                    rejected: d(now.rejected, before.rejected),
                    decided: d(now.decided, before.decided),
                    escalated: d(now.escalated, before.escalated),
                    central_failures: d(now.central_failures, before.central_failures),
                    confidence_sum: d(now.confidence_sum, before.confidence_sum),
                    latency: lat,
                };
                if delta.success + delta.failure + delta.rejected > 0 {
                    per_model.insert(key, summary(&delta));
                }
                total.success += delta.success;
                total.failure += delta.failure;
                total.rejected += delta.rejected;
                total.decided += delta.decided;
                total.escalated += delta.escalated;
                total.central_failures += delta.central_failures;
                total.confidence_sum += delta.confidence_sum;
                for (t, c) in total.latency.iter_mut().zip(&delta.latency) {
                    *t += c;
                }
            }
        }
        StatsReport { models: per_model, ..summary(&total) }
    }
}

fn summary(s: &Snapshot) -> StatsReport {
    let q = |p: f64| quantile(&LATENCY_BUCKETS, &s.latency, p).map(|v| v * 1e3);
    StatsReport {
        count: s.success + s.failure + s.rejected,
        failures: s.failure,
        rejected: s.rejected,
        p50_ms: q(0.50),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        escalation_rate: (s.decided > 0).then(|| s.escalated as f64 / s.decided as f64),
        central_failures: s.central_failures,
        // The confidence histogram keeps millionths in its sum.
        mean_confidence: (s.decided > 0).then(|| s.confidence_sum as f64 / 1e6 / s.decided as f64),
        simulated: false,
        models: BTreeMap::new(),
    }
}

/// This process's resources, from /proc (absent fields where it cannot be read).
fn resources(started: Instant) -> Resources {
    let page = 4096u64;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map(|pages| pages * page);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()));
    Resources { rss_bytes: rss, load1: load, uptime_secs: started.elapsed().as_secs() }
}

impl Device for RuntimeDevice {
    fn with_updater<R>(&self, f: impl FnOnce(&Updater) -> R) -> R {
        self.updates.with_updater(f)
    }

    fn apply(&self, dir: &Path) -> Result<Applied, Refusal> {
        self.updates.apply(dir)
    }

    fn stage_candidate(&self, dir: &Path) -> Result<Applied, Refusal> {
        self.updates.stage_candidate(dir)
    }

    fn promote(&self) -> Result<Applied, Refusal> {
        self.updates.promote()
    }

    fn drop_candidate(&self) -> Result<u64, Refusal> {
        self.updates.drop_candidate()
    }

    fn revert(&self) -> Result<Applied, Refusal> {
        self.updates.revert()
    }

    fn report(&self) -> DeviceReport {
        let models = self
            .registry
            .slots()
            .iter()
            .map(|s| ModelReport {
                name: s.spec.name.clone(),
                versions: s.served().iter().map(|v| v.version.clone()).collect(),
                state: s.state().as_str().into(),
                drift: s
                    .served()
                    .iter()
                    .filter_map(|v| {
                        let r = v.drift.as_ref()?.report();
                        Some(ModelDrift {
                            version: v.version.clone(),
                            windows: r.windows,
                            alerts: r.alerts,
                            threshold: r.threshold,
                            psi: r.last.map(|l| l.psi.into_iter().collect()).unwrap_or_default(),
                        })
                    })
                    .collect(),
                shadow: self.registry.shadow(&s.spec.name).map(|shadow| {
                    let r = shadow.report();
                    ModelShadow {
                        candidate: r.candidate,
                        compared: r.compared,
                        failed: r.failed,
                        skipped: r.skipped,
                        rows: r.rows,
                        agreement: r.agreement,
                        mean_abs_diff: r.mean_abs_diff,
                        p50_ms: r.p50_ms,
                        p99_ms: r.p99_ms,
                    }
                }),
            })
            .collect();
        DeviceReport {
            runtime: Some(format!("outpost {}", env!("CARGO_PKG_VERSION"))),
            models,
            stats: Some(self.stats()),
            resources: Some(resources(self.started)),
            labels: self.labels.clone(),
        }
    }
}
