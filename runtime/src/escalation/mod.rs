//! Escalating unsure cases to a central model.
//!
//! After the local answer, the model's confidence (from the configured output, by the configured
//! policy) decides: confident answers go back at once; unsure ones are sent, with the same
//! inputs, to the central model, whose answer goes back instead. When the central fails (down,
//! slow, busy, breaker open) the local answer goes back flagged, and the case is kept in the
//! hard-example queue, which drains to the central side when it is back. The caller sees the
//! outcome in the response `parameters`.

mod breaker;
mod central;
pub mod confidence;
mod queue;
mod sink;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value, json};

pub use breaker::{Breaker, BreakerState};
pub use central::{Central, CentralError};
pub use queue::{HardExampleQueue, write_atomically};
pub use sink::{Sink, SinkError};

use crate::config::{Escalation, Policy};
use crate::stats::Histogram;
use crate::tensor::{Tensor, TensorJson};

/// Confidence histogram bounds.
pub const CONFIDENCE_BUCKETS: [f64; 10] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
const FAILURE_KINDS: [&str; 6] = ["breaker_open", "busy", "timeout", "connect", "status", "bad_response"];

/// What the client asked for in the request `parameters`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Overrides {
    pub mode: Mode,
    pub policy: Option<Policy>,
    pub threshold: Option<f64>,
}

/// `parameters.escalation`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Escalate when unsure (the default).
    #[default]
    Auto,
    /// Never escalate.
    Local,
    /// Always ask the central.
    Central,
}

impl Overrides {
    /// Reads `escalation`, `escalation_policy` and `escalation_threshold` from request parameters.
    pub fn parse(params: &Map<String, Value>) -> Result<Overrides, String> {
        let mode = match params.get("escalation") {
            None => Mode::Auto,
            Some(Value::String(s)) if s == "auto" => Mode::Auto,
            Some(Value::String(s)) if s == "local" => Mode::Local,
            Some(Value::String(s)) if s == "central" => Mode::Central,
            Some(v) => {
                return Err(format!("parameter `escalation` must be \"auto\", \"local\" or \"central\", got {v}"));
            }
        };
        let policy = match params.get("escalation_policy") {
            None => None,
            Some(v) => Some(v.as_str().and_then(Policy::parse).ok_or_else(|| {
                format!("parameter `escalation_policy` must be \"max_probability\", \"margin\" or \"entropy\", got {v}")
            })?),
        };
        let threshold = match params.get("escalation_threshold") {
            None => None,
            Some(v) => Some(
                v.as_f64()
                    .filter(|t| (0.0..=1.0).contains(t))
                    .ok_or_else(|| format!("parameter `escalation_threshold` must be a number in 0..1, got {v}"))?,
            ),
        };
        Ok(Overrides { mode, policy, threshold })
    }

    /// Whether the request says anything about escalation.
    pub fn any(&self) -> bool {
        *self != Overrides::default()
    }
}

/// How a request was answered, for the response `parameters`.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    pub served_by: &'static str,
    pub confidence: Option<f64>,
    /// `not_needed`, `skipped` (the client said local), `ok` or `failed`.
    pub escalation: &'static str,
    pub error: Option<String>,
}

impl Resolution {
    /// The response `parameters` that carry this outcome.
    pub fn parameters(&self) -> Value {
        let mut p = json!({ "served_by": self.served_by, "escalation": self.escalation });
        if let Some(c) = self.confidence {
            p["confidence"] = json!(c);
        }
        if let Some(e) = &self.error {
            p["escalation_error"] = json!(e);
        }
        p
    }
}

/// Counters of one model's escalations.
#[derive(Debug)]
pub struct EscalationStats {
    pub decided: AtomicU64,
    pub escalated: AtomicU64,
    pub central_ok: AtomicU64,
    pub failures: [AtomicU64; FAILURE_KINDS.len()],
    pub bytes_sent: AtomicU64,
    pub central_latency: Histogram,
    pub confidence: Histogram,
}

impl Default for EscalationStats {
    fn default() -> Self {
        EscalationStats {
            decided: AtomicU64::new(0),
            escalated: AtomicU64::new(0),
            central_ok: AtomicU64::new(0),
            failures: Default::default(),
            bytes_sent: AtomicU64::new(0),
            central_latency: Histogram::default(),
            confidence: Histogram::with_bounds(&CONFIDENCE_BUCKETS),
        }
    }
}

/// One model's escalation: its settings, the central, the hard-example queue and counters.
pub struct Escalator {
    pub config: Escalation,
    pub central: Central,
    pub queue: Option<Arc<HardExampleQueue>>,
    /// Hard examples being written by the blocking pool (bounded by [`MAX_PENDING_WRITES`]).
    pending_writes: Arc<AtomicUsize>,
    pub stats: EscalationStats,
}

/// Hard examples written at once off the request path; past it a new one is dropped (counted
/// with the queue's drops) rather than piling up threads behind a slow disk.
pub const MAX_PENDING_WRITES: usize = 16;

impl Escalator {
    /// Reads the central's CA file (https), opens the hard-example queue (when configured) and,
    /// inside a tokio runtime, starts draining it.
    pub fn start(config: &Escalation) -> std::io::Result<Arc<Escalator>> {
        let queue = config.queue.clone().map(HardExampleQueue::open).transpose()?.map(Arc::new);
        let e = Arc::new(Escalator {
            central: Central::new(config)?,
            config: config.clone(),
            queue,
            pending_writes: Arc::default(),
            stats: Default::default(),
        });
        if e.queue.is_some()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(drain(Arc::downgrade(&e)));
        }
        Ok(e)
    }

    /// Decides on the local answer and escalates when needed. Returns the answer to send and
    /// how it was reached.
    pub async fn resolve(
        &self,
        model: &str,
        version: &str,
        inputs: &[Tensor],
        local: Vec<Tensor>,
        ov: Overrides,
    ) -> (Vec<Tensor>, Resolution) {
        self.stats.decided.fetch_add(1, Relaxed);
        let scores = match &self.config.output {
            Some(name) => local.iter().find(|t| &t.name == name),
            None => local.first(),
        };
        let policy = ov.policy.unwrap_or(self.config.policy);
        let confidence = scores.and_then(|s| confidence::confidence(s, policy, self.config.softmax));
        if let Some(c) = confidence {
            self.stats.confidence.record_value(c);
        }
        let threshold = ov.threshold.unwrap_or(self.config.threshold);
        let escalate = match ov.mode {
            Mode::Local => false,
            Mode::Central => true,
            Mode::Auto => confidence.is_none_or(|c| c < threshold),
        };
        if !escalate {
            let escalation = if ov.mode == Mode::Local { "skipped" } else { "not_needed" };
            return (local, Resolution { served_by: "local", confidence, escalation, error: None });
        }
        self.stats.escalated.fetch_add(1, Relaxed);
        let result = self.central.infer(inputs).await.and_then(|answer| {
            match local.iter().find(|l| !answer.outputs.iter().any(|c| c.name == l.name)) {
                Some(missing) => Err(CentralError::BadResponse(format!("no output `{}`", missing.name))),
                None => Ok(answer),
            }
        });
        match result {
            Ok(answer) => {
                self.stats.central_ok.fetch_add(1, Relaxed);
                self.stats.bytes_sent.fetch_add(answer.bytes_sent as u64, Relaxed);
                self.stats.central_latency.observe(answer.latency);
                (answer.outputs, Resolution { served_by: "central", confidence, escalation: "ok", error: None })
            }
            Err(e) => {
                let kind = e.kind();
                if let Some(i) = FAILURE_KINDS.iter().position(|k| *k == kind) {
                    self.stats.failures[i].fetch_add(1, Relaxed);
                }
                tracing::debug!(model, version, kind, error = %e, "escalation failed; answering locally");
                if let Some(q) = &self.queue {
                    let example = hard_example(model, version, &e.to_string(), confidence, inputs, &local);
                    self.keep(q, model, example);
                }
                (local, Resolution { served_by: "local", confidence, escalation: "failed", error: Some(e.to_string()) })
            }
        }
    }

    /// Queues a hard example from the blocking pool (its write and fsync never hold up the
    /// answer); with [`MAX_PENDING_WRITES`] already under way, the example is dropped and counted.
    fn keep(&self, queue: &Arc<HardExampleQueue>, model: &str, example: Vec<u8>) {
        let pending = &self.pending_writes;
        let taken = pending.fetch_update(Relaxed, Relaxed, |n| (n < MAX_PENDING_WRITES).then_some(n + 1)).is_ok();
        let runtime = tokio::runtime::Handle::try_current();
        let (true, Ok(runtime)) = (taken, runtime) else {
            if taken {
                pending.fetch_sub(1, Relaxed);
            }
            queue.drops.fetch_add(1, Relaxed);
            tracing::warn!(model, "hard example dropped: the queue's disk is behind");
            return;
        };
        let (q, pending, model) = (queue.clone(), pending.clone(), model.to_owned());
        runtime.spawn_blocking(move || {
            if let Err(io) = q.push(&example) {
                tracing::warn!(model, error = %io, "could not keep a hard example");
            }
            pending.fetch_sub(1, Relaxed);
        });
    }

    /// Appends this model's escalation metrics in Prometheus text form.
    pub fn render(&self, out: &mut String, model: &str) {
        use std::fmt::Write;
        let s = &self.stats;
        let l = format!("model=\"{model}\"");
        let _ = writeln!(out, "outpost_escalation_decisions_total{{{l}}} {}", s.decided.load(Relaxed));
        let _ = writeln!(out, "outpost_escalations_total{{{l}}} {}", s.escalated.load(Relaxed));
        let _ = writeln!(out, "outpost_central_answers_total{{{l}}} {}", s.central_ok.load(Relaxed));
        for (kind, c) in FAILURE_KINDS.iter().zip(&s.failures) {
            let _ = writeln!(out, "outpost_central_failures_total{{{l},kind=\"{kind}\"}} {}", c.load(Relaxed));
        }
        let _ = writeln!(out, "outpost_central_bytes_sent_total{{{l}}} {}", s.bytes_sent.load(Relaxed));
        let _ = writeln!(out, "outpost_central_breaker_state{{{l}}} {}", self.central.breaker.state().gauge());
        if let Some(q) = &self.queue {
            let _ = writeln!(out, "outpost_hard_examples_queued{{{l}}} {}", q.depth());
            let _ = writeln!(out, "outpost_hard_examples_dropped_total{{{l}}} {}", q.drops.load(Relaxed));
            let _ = writeln!(out, "outpost_hard_examples_parked_total{{{l}}} {}", q.parked.load(Relaxed));
        }
        s.central_latency.render(out, "outpost_central_duration_seconds", &l, 1e-9);
        s.confidence.render(out, "outpost_confidence", &l, 1e-6);
    }
}

/// The `# HELP` / `# TYPE` lines of [`Escalator::render`]'s families.
pub const METRIC_HEADERS: &str = "\
# HELP outpost_escalation_decisions_total Requests whose confidence was checked.
# TYPE outpost_escalation_decisions_total counter
# HELP outpost_escalations_total Requests sent to the central model.
# TYPE outpost_escalations_total counter
# HELP outpost_central_answers_total Requests answered by the central model.
# TYPE outpost_central_answers_total counter
# HELP outpost_central_failures_total Escalations that fell back to the local answer, by kind.
# TYPE outpost_central_failures_total counter
# HELP outpost_central_bytes_sent_total Request bytes sent to the central model.
# TYPE outpost_central_bytes_sent_total counter
# HELP outpost_central_breaker_state Circuit breaker: 0 closed, 1 open, 2 half-open.
# TYPE outpost_central_breaker_state gauge
# HELP outpost_hard_examples_queued Hard examples waiting on disk for the central side.
# TYPE outpost_hard_examples_queued gauge
# HELP outpost_hard_examples_dropped_total Hard examples dropped to stay within the queue's bounds.
# TYPE outpost_hard_examples_dropped_total counter
# HELP outpost_hard_examples_parked_total Hard examples the central refused, or that could not be read, set aside.
# TYPE outpost_hard_examples_parked_total counter
# HELP outpost_central_duration_seconds Central call latency.
# TYPE outpost_central_duration_seconds histogram
# HELP outpost_confidence Confidence of local answers (least confident row).
# TYPE outpost_confidence histogram
";

/// A hard example as the queue keeps it and `/v2/hard-examples` takes it. Written straight to
/// bytes on the request's task (an image-sized input through one JSON value per element took
/// milliseconds); fields in the order a JSON object's keys sort in.
#[derive(Serialize)]
struct HardExample<'a> {
    captured_at_ms: u64,
    confidence: Option<f64>,
    inputs: Vec<TensorJson<'a>>,
    local_outputs: Vec<TensorJson<'a>>,
    model: &'a str,
    reason: &'a str,
    version: &'a str,
}

fn hard_example(
    model: &str,
    version: &str,
    reason: &str,
    confidence: Option<f64>,
    inputs: &[Tensor],
    local: &[Tensor],
) -> Vec<u8> {
    let captured_at_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let doc = HardExample {
        captured_at_ms,
        confidence,
        inputs: inputs.iter().map(Tensor::json_object).collect(),
        local_outputs: local.iter().map(Tensor::json_object).collect(),
        model,
        reason,
        version,
    };
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// Uploads queued hard examples to the central side, oldest first, while it answers; backs off
/// while it does not. Ends when the escalator is gone.
async fn drain(escalator: std::sync::Weak<Escalator>) {
    let mut pause = Duration::from_millis(200);
    loop {
        tokio::time::sleep(pause).await;
        let Some(e) = escalator.upgrade() else { return };
        let Some(q) = &e.queue else { return };
        let reader = q.clone();
        let Some((seq, bytes)) = tokio::task::spawn_blocking(move || reader.oldest()).await.ok().flatten() else {
            pause = Duration::from_millis(200);
            continue;
        };
        if e.central.breaker.state() == BreakerState::Open && !e.central.breaker.allow() {
            pause = Duration::from_millis(500);
            continue;
        }
        match e.central.upload_hard_example(bytes).await {
            Ok(()) => {
                e.central.breaker.success();
                q.remove(seq);
                pause = Duration::ZERO;
            }
            // Refused for what it is: it would be refused again; the rest go on.
            Err(CentralError::Status { status: status @ (400 | 413 | 415 | 422), message }) => {
                let q = q.clone();
                let why = format!("the central answered {status}: {}", message.chars().take(200).collect::<String>());
                let _ = tokio::task::spawn_blocking(move || q.park(seq, &why)).await;
                pause = Duration::ZERO;
            }
            Err(err) => {
                tracing::debug!(error = %err, "hard examples wait for the central");
                if !matches!(err, CentralError::Status { .. }) {
                    e.central.breaker.failure();
                }
                pause = Duration::from_secs(1);
            }
        }
    }
}
