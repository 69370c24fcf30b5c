//! Per-model counters and latency histograms, lock-free on the request path. They feed both
//! Prometheus `/metrics` and the V2 statistics endpoint.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Histogram bucket bounds in seconds: 25 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 18] = [
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5,
    5.0, 10.0,
];

/// Batch size bucket bounds (rows per backend call).
pub const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// A Prometheus histogram: durations (recorded in nanoseconds, rendered in seconds) or plain
/// values such as batch sizes.
///
/// An observation is two relaxed atomic adds (its bucket and the sum) in the recording
/// thread's shard: each thread keeps to one of [`SHARDS`] cache-line-aligned shards, so worker
/// threads recording at once do not pass cache lines back and forth; reads add the shards up.
/// `tools/bench-metrics` measures it against prometheus-client's histogram.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    shards: Box<[Shard]>,
}

/// Threads spread over this many shards per histogram.
pub const SHARDS: usize = 8;

/// The most bucket bounds a histogram takes.
const MAX_BOUNDS: usize = 23;

/// One thread group's counts: per bucket (not cumulative), the last one above every bound,
/// then the sum of observations (nanoseconds for durations, the values themselves otherwise).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard([AtomicU64; MAX_BOUNDS + 2]);

thread_local! {
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Relaxed) % SHARDS
    };
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::with_bounds(&LATENCY_BUCKETS)
    }
}

impl Histogram {
    /// A histogram with these (sorted) upper bounds, at most 23.
    pub fn with_bounds(bounds: &'static [f64]) -> Histogram {
        assert!(bounds.len() <= MAX_BOUNDS, "at most {MAX_BOUNDS} bucket bounds");
        Histogram { bounds, shards: (0..SHARDS).map(|_| Shard::default()).collect() }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        self.record(d.as_secs_f64(), d.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// Records one plain value (e.g. a batch size).
    pub fn observe_value(&self, v: u64) {
        self.record(v as f64, v);
    }

    /// Records a fractional value; the sum keeps millionths.
    pub fn record_value(&self, v: f64) {
        self.record(v, (v * 1e6).max(0.0) as u64);
    }

    fn record(&self, bucket_value: f64, sum: u64) {
        let i = self.bounds.iter().position(|&b| bucket_value <= b).unwrap_or(self.bounds.len());
        let shard = &self.shards[SHARD.with(|s| *s)].0;
        shard[i].fetch_add(1, Relaxed);
        shard[MAX_BOUNDS + 1].fetch_add(sum, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.bucket_counts().iter().sum()
    }

    /// Observations per bucket (not cumulative), then those above the last bound.
    pub fn bucket_counts(&self) -> Vec<u64> {
        (0..=self.bounds.len()).map(|i| self.shards.iter().map(|s| s.0[i].load(Relaxed)).sum()).collect()
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// Sum of observations in nanoseconds (durations) or of the values.
    pub fn sum_ns(&self) -> u64 {
        self.shards.iter().map(|s| s.0[MAX_BOUNDS + 1].load(Relaxed)).sum()
    }

    /// Appends the histogram in Prometheus text form; `sum_scale` converts the stored sum.
    pub fn render(&self, out: &mut String, name: &str, labels: &str, sum_scale: f64) {
        // One read of the buckets, so that +Inf and the count agree with them.
        let counts = self.bucket_counts();
        let mut cumulative = 0;
        for (bound, c) in self.bounds.iter().zip(&counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let total: u64 = counts.iter().sum();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_ns() as f64 * sum_scale);
        let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
    }
}

/// What happened to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    Success,
    /// The request was bad or the inference failed.
    Failure,
    /// Turned away because the model's queue was full.
    Rejected,
}

/// Counters and histograms of one model version.
#[derive(Debug)]
pub struct ModelStats {
    pub success: AtomicU64,
    pub failure: AtomicU64,
    pub rejected: AtomicU64,
    /// Inferences run (the same as successful requests until batching joins several).
    pub executions: AtomicU64,
    /// Milliseconds since the epoch of the last successful inference.
    pub last_inference_ms: AtomicU64,
    /// Whole request, from the body read to the response built.
    pub request: Histogram,
    /// Waiting for a worker.
    pub queue: Histogram,
    /// Inside the backend.
    pub compute: Histogram,
    /// Request time of successes only (V2 statistics' `success`).
    pub success_time: Histogram,
    /// Request time of failures only (V2 statistics' `fail`).
    pub failure_time: Histogram,
    /// Rows per backend call.
    pub batch_size: Histogram,
    /// Backend calls that panicked (answered 500; the worker carries on).
    pub panics: AtomicU64,
    /// Worker threads running now (a version with none cannot answer and is not ready).
    pub workers: AtomicU64,
    /// Worker threads asleep on an empty queue (past their idle poll): a call queued now pays a
    /// thread wake-up ([`crate::executor`] runs it inline instead where it may).
    pub sleeping: AtomicU64,
}

impl Default for ModelStats {
    fn default() -> Self {
        ModelStats {
            success: AtomicU64::new(0),
            failure: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            executions: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            workers: AtomicU64::new(0),
            sleeping: AtomicU64::new(0),
            last_inference_ms: AtomicU64::new(0),
            request: Histogram::default(),
            queue: Histogram::default(),
            compute: Histogram::default(),
            success_time: Histogram::default(),
            failure_time: Histogram::default(),
            batch_size: Histogram::with_bounds(&BATCH_BUCKETS),
        }
    }
}

impl ModelStats {
    /// Records a finished request.
    pub fn record(&self, outcome: RequestOutcome, elapsed: Duration) {
        match outcome {
            RequestOutcome::Success => {
                self.success.fetch_add(1, Relaxed);
                self.success_time.observe(elapsed);
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                self.last_inference_ms.store(now.as_millis() as u64, Relaxed);
            }
            RequestOutcome::Failure => {
                self.failure.fetch_add(1, Relaxed);
                self.failure_time.observe(elapsed);
            }
            RequestOutcome::Rejected => {
                self.rejected.fetch_add(1, Relaxed);
            }
        }
        self.request.observe(elapsed);
    }

    /// Appends this model's metrics in Prometheus text form.
    pub fn render(&self, out: &mut String, model: &str, version: &str) {
        let l = format!("model=\"{model}\",version=\"{version}\"");
        for (outcome, c) in [("success", &self.success), ("failure", &self.failure), ("rejected", &self.rejected)] {
            let _ = writeln!(out, "outpost_inference_requests_total{{{l},outcome=\"{outcome}\"}} {}", c.load(Relaxed));
        }
        let _ = writeln!(out, "outpost_inference_executions_total{{{l}}} {}", self.executions.load(Relaxed));
        let _ = writeln!(out, "outpost_backend_panics_total{{{l}}} {}", self.panics.load(Relaxed));
        let _ = writeln!(out, "outpost_model_workers{{{l}}} {}", self.workers.load(Relaxed));
        self.request.render(out, "outpost_request_duration_seconds", &l, 1e-9);
        self.queue.render(out, "outpost_queue_duration_seconds", &l, 1e-9);
        self.compute.render(out, "outpost_compute_duration_seconds", &l, 1e-9);
        self.batch_size.render(out, "outpost_batch_size", &l, 1.0);
    }
}

/// The `# HELP` / `# TYPE` header of every metric family [`ModelStats::render`] writes.
pub const METRIC_HEADERS: &str = "\
# HELP outpost_inference_requests_total Inference requests by outcome (rejected: queue full).
# TYPE outpost_inference_requests_total counter
# HELP outpost_inference_executions_total Backend executions.
# TYPE outpost_inference_executions_total counter
# HELP outpost_backend_panics_total Backend calls that panicked (their requests answered 500; the worker carries on).
# TYPE outpost_backend_panics_total counter
# HELP outpost_model_workers Worker threads running for the model version.
# TYPE outpost_model_workers gauge
# HELP outpost_request_duration_seconds Time from request body to response, per inference request.
# TYPE outpost_request_duration_seconds histogram
# HELP outpost_queue_duration_seconds Time a request waited for a worker.
# TYPE outpost_queue_duration_seconds histogram
# HELP outpost_compute_duration_seconds Time inside the backend.
# TYPE outpost_compute_duration_seconds histogram
# HELP outpost_batch_size Rows per backend call (requests stacked by the dynamic batcher).
# TYPE outpost_batch_size histogram
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let mut out = String::new();
        h.render(&mut out, "x", "m=\"a\"", 1e-9);
        assert!(out.contains("x_bucket{m=\"a\",le=\"0.00005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{m=\"a\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{m=\"a\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{m=\"a\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{m=\"a\"} 3\n"), "{out}");
    }

    #[test]
    fn threads_recording_at_once_lose_nothing() {
        let h = std::sync::Arc::new(Histogram::with_bounds(&BATCH_BUCKETS));
        let threads: Vec<_> = (0..2 * SHARDS as u64)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || (0..1000).for_each(|i| h.observe_value(1 + i * 3 + t)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let n = 2 * SHARDS as u64 * 1000;
        assert_eq!(h.count(), n);
        let counts = h.bucket_counts();
        assert_eq!(counts.len(), BATCH_BUCKETS.len() + 1);
        assert!(*counts.last().unwrap() > 0, "values above the last bound are counted: {counts:?}");
        let expected: u64 = (0..2 * SHARDS as u64).flat_map(|t| (0..1000).map(move |i| 1 + i * 3 + t)).sum();
        assert_eq!(h.sum_ns(), expected);
    }

    #[test]
    fn outcomes_are_counted_apart() {
        let s = ModelStats::default();
        s.record(RequestOutcome::Success, Duration::from_millis(1));
        s.record(RequestOutcome::Rejected, Duration::from_micros(5));
        s.record(RequestOutcome::Failure, Duration::from_micros(5));
        let mut out = String::new();
        s.render(&mut out, "m", "1");
        assert!(out.contains("outpost_inference_requests_total{model=\"m\",version=\"1\",outcome=\"success\"} 1"));
        assert!(out.contains("outcome=\"rejected\"} 1"));
        assert_eq!(s.request.count(), 3);
        assert_eq!(s.success_time.count(), 1);
    }
}

/// The `q` quantile (0..1) of bucket counts as [`Histogram::bucket_counts`] gives them: the
/// upper bound of the bucket it falls in (the last bound when above all), None when empty.
pub fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bounds[i.min(bounds.len() - 1)]);
        }
    }
    bounds.last().copied()
}

#[cfg(test)]
mod quantile_tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let h = Histogram::default();
        for _ in 0..90 {
            h.observe(Duration::from_micros(40));
        }
        for _ in 0..10 {
            h.observe(Duration::from_millis(3));
        }
        let c = h.bucket_counts();
        assert_eq!(quantile(h.bounds(), &c, 0.5), Some(50e-6));
        assert_eq!(quantile(h.bounds(), &c, 0.95), Some(5e-3));
        assert_eq!(quantile(h.bounds(), &[0; 19], 0.5), None);
    }
}
