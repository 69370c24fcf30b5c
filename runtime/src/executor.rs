//! Where a served version's backend calls run.
//!
//! Every version has a bounded queue and `workers` threads that take calls from it: the request's
//! task queues the call and waits for the reply. That is two thread hand-offs per request (the
//! queue wakes a worker, the reply wakes the task), and on a small box each costs more than a
//! short model's whole call (measured in docs/benchmarks.md, "The request path").
//!
//! So a version whose call is short also runs **inline**: when the request is alone in the
//! server (no other inference request anywhere in its path), the version has no other call in
//! flight, its previous request came more than [`IDLE_GAP`] before (twice the workers' idle poll:
//! requests that come closer keep a worker awake, and a call handed to an awake worker costs no
//! wake-up) and every worker is asleep, the request's own task makes the call, with no hand-off. A lone request (an
//! application calling one model at a time) never leaves its thread; under load, requests go to
//! the queue and the worker threads as before, and the HTTP threads keep to HTTP (running calls
//! on them under load served 17-23% fewer requests/s at 8 and 32 clients on 2 cores). A version
//! runs at most one call beyond its `workers`: the inline one.
//!
//! `executor = "auto"` (the default) allows inline calls when the backend call is short
//! ([`INLINE_MAX_US`] on the warm-up input), the version does not wait to gather a batch (a batch
//! is gathered by a worker; with `max_queue_delay_us = 0` the worker takes only what is already
//! queued, and a lone request finds nothing), and no input has a symbolic dimension past the
//! first (a longer sequence or a larger image than the warm-up's would make the call longer than
//! measured). The bound weighs what the hand-off costs against holding an HTTP thread for the
//! call: the two wake-ups cost 40-50 µs on 2 vCPUs (a 57 µs CNN answered a lone client at 247 µs
//! p50 through the queue, 201 µs inline, docs/benchmarks.md), a fifth or more of a call up to
//! 200 µs; past that the gain is small and an HTTP thread would be held for longer than a
//! request's parse. `executor = "threads"` never runs inline; `executor = "inline"` always may.

use std::sync::Arc;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Instant;

use crossbeam_channel::{Sender, TrySendError};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::backend::Session;
use crate::batcher::{self, Alive, Job, Reply};
use crate::config::{Batching, ExecutorChoice, ModelSpec};
use crate::stats::ModelStats;
use crate::tensor::Tensor;

/// The longest median backend call on the warm-up input that `executor = "auto"` runs inline.
pub const INLINE_MAX_US: f64 = 200.0;

/// Where a version's calls run and why, as its metadata shows it (`parameters.executor`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExecutorInfo {
    /// `inline` (a lone request's call runs on its own task; others on the worker threads) or
    /// `threads` (every call on the worker threads).
    pub kind: &'static str,
    /// `configured`, `measured` (the call's median decided), `batching`, `symbolic` (an input
    /// dimension past the first is symbolic), or `unmeasured` (no warm-up input to time).
    pub by: &'static str,
    /// The median backend call on the warm-up input, in microseconds, where it was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_us: Option<f64>,
    /// The most rows (first dimension) a request may have to run inline: the warm-up input's,
    /// which the call was timed on, where `auto` decided on a timed call. A larger batch would
    /// hold the HTTP thread for longer than measured, so it goes to the workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inline_rows: Option<usize>,
}

/// Decides where `spec`'s version runs, with the batching its workers apply (see
/// [`crate::batch_choice`]). `call_us` is the backend call's median on the warm-up input when the
/// backend choice measured it already; otherwise it is measured here on `probe`.
pub fn decide(
    spec: &ModelSpec,
    batching: Option<&Batching>,
    session: &dyn Session,
    probe: Option<&[Tensor]>,
    call_us: Option<f64>,
) -> ExecutorInfo {
    let info = |kind, by, call_us| ExecutorInfo { kind, by, call_us, inline_rows: None };
    match spec.executor {
        ExecutorChoice::Threads => return info("threads", "configured", call_us),
        ExecutorChoice::Inline => return info("inline", "configured", call_us),
        ExecutorChoice::Auto => {}
    }
    // A batch waits for its rows; with no wait (`max_queue_delay_us = 0`, take what is queued) a
    // lone request has nothing to wait for, and runs inline like any other.
    if batching.is_some_and(Batching::waits) {
        return info("threads", "batching", call_us);
    }
    if session.signature().inputs.iter().any(|s| s.shape.iter().skip(1).any(|&d| d < 0)) {
        return info("threads", "symbolic", call_us);
    }
    let Some(call_us) = call_us.or_else(|| probe.and_then(|p| time_call(session, p))) else {
        return info("threads", "unmeasured", None);
    };
    if call_us > INLINE_MAX_US {
        return info("threads", "measured", Some(call_us));
    }
    let inline_rows = probe.and_then(|p| p.iter().filter_map(|t| t.shape.first().copied()).max());
    ExecutorInfo { inline_rows, ..info("inline", "measured", Some(call_us)) }
}

/// A first timed call longer than this settles it: the version runs on threads, and is not timed
/// again (a slow model's load is not held up by the runs a median takes).
const CLEARLY_SLOW_US: f64 = 4.0 * INLINE_MAX_US;

/// The backend call on `probe` (already warmed by the load's golden check or warm-up run): one
/// timed run, and where that is not clearly slow, the median of [`crate::choice::median_us`]'s.
fn time_call(session: &dyn Session, probe: &[Tensor]) -> Option<f64> {
    let start = std::time::Instant::now();
    session.run(probe).ok()?;
    let first_us = start.elapsed().as_secs_f64() * 1e6;
    if first_us > CLEARLY_SLOW_US {
        return Some(first_us);
    }
    crate::choice::median_us(session, probe)
}

/// How long a version must have had no request for the next to run inline.
pub const IDLE_GAP: std::time::Duration = std::time::Duration::from_micros(2 * batcher::IDLE_SPIN.as_micros() as u64);

/// The queue is full (or closed): the caller answers 503.
#[derive(Debug)]
pub struct QueueFull {
    pub bound: usize,
}

/// Why a call got no reply.
#[derive(Debug)]
pub enum NotRun {
    /// The queue is full.
    Full(QueueFull),
    /// The worker went away before it answered.
    Stopped,
}

/// A served version's executor (see the module docs).
pub struct Executor {
    queue: Sender<Job>,
    /// Where an inline call runs: the session and its statistics; `None` for threads only.
    inline: Option<(Arc<dyn Session>, Arc<ModelStats>)>,
    /// The most rows an inline call may have (`usize::MAX`: no bound).
    inline_rows: usize,
    workers: u64,
    /// Requests of this version between the executor's entry and their reply.
    in_flight: AtomicUsize,
    /// When the last request came, in microseconds since `epoch`.
    last_arrival_us: AtomicU64,
    epoch: Instant,
}

impl Executor {
    /// Starts `spec`'s worker threads (named `thread_name-N`), applying `batching`, with inline
    /// calls where `info` says so.
    pub fn start(
        spec: &ModelSpec,
        batching: Option<Batching>,
        thread_name: &str,
        session: Arc<dyn Session>,
        stats: Arc<ModelStats>,
        info: &ExecutorInfo,
    ) -> Executor {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(spec.queue_bound);
        for i in 0..spec.workers {
            let (rx, session, stats, batching) = (rx.clone(), session.clone(), stats.clone(), batching.clone());
            // Counted from here, so the version is ready as soon as it is served; the count
            // drops when the thread ends (or was never started).
            let alive = Alive::claim(&stats);
            let spawned = std::thread::Builder::new().name(format!("{thread_name}-{i}")).spawn(move || {
                let _alive = alive;
                batcher::run_worker(rx, session, stats, batching)
            });
            if let Err(e) = spawned {
                tracing::error!(model = %spec.name, error = %e, "could not start an inference thread");
            }
        }
        let inline = (info.kind == "inline").then_some((session, stats));
        Executor {
            queue: tx,
            inline,
            inline_rows: info.inline_rows.unwrap_or(usize::MAX),
            workers: spec.workers as u64,
            in_flight: AtomicUsize::new(0),
            last_arrival_us: AtomicU64::new(0),
            epoch: Instant::now() - IDLE_GAP,
        }
    }

    /// Runs one inference: on this task when inline calls are allowed, the request is `alone`
    /// in the server, this version was idle for [`IDLE_GAP`], nothing else is in flight here and
    /// every worker sleeps; else queued for a worker.
    pub async fn infer(&self, inputs: Vec<Tensor>, alone: bool) -> Result<Reply, NotRun> {
        let now_us = self.epoch.elapsed().as_micros() as u64;
        let idle = now_us.saturating_sub(self.last_arrival_us.swap(now_us, Relaxed)) >= IDLE_GAP.as_micros() as u64;
        if let Some((session, stats)) = &self.inline
            && alone
            && idle
            && inputs.iter().all(|t| t.shape.first().is_none_or(|&rows| rows <= self.inline_rows))
            // At least: a reload of the same version shares its statistics with the old one's
            // workers until they exit.
            && stats.sleeping.load(Relaxed) >= self.workers
            && self.in_flight.compare_exchange(0, 1, AcqRel, Acquire).is_ok()
        {
            let _in_flight = InFlight(&self.in_flight);
            stats.queue.observe(std::time::Duration::ZERO);
            return Ok(batcher::run_one(session.as_ref(), stats, &inputs));
        }
        self.in_flight.fetch_add(1, AcqRel);
        // Counted out however the request ends (a client that goes away drops it).
        let _in_flight = InFlight(&self.in_flight);
        let (reply, rx) = oneshot::channel();
        let job = Job { inputs, enqueued: Instant::now(), reply };
        match self.queue.try_send(job) {
            Ok(()) => rx.await.map_err(|_| NotRun::Stopped),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                Err(NotRun::Full(QueueFull { bound: self.queue.capacity().unwrap_or(0) }))
            }
        }
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::backend::{BackendError, Signature};
    use crate::config::ModelConfig;
    use crate::onnx::TensorSpec;
    use crate::tensor::DataType;

    /// A session that takes a set time per call, with one input of the given shape.
    struct Timed {
        per_run: Duration,
        /// Calls running now, and the most ever at once.
        running: AtomicUsize,
        peak: AtomicUsize,
        /// While set, a call holds on (after it has marked itself running).
        gate: AtomicBool,
        /// The name of the thread each call ran on.
        threads: std::sync::Mutex<Vec<String>>,
        signature: Signature,
    }

    impl Timed {
        fn new(micros: u64, shape: &[i64]) -> Arc<Timed> {
            let input = TensorSpec { name: "x".into(), datatype: DataType::Fp32, shape: shape.to_vec() };
            Arc::new(Timed {
                per_run: Duration::from_micros(micros),
                running: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                gate: AtomicBool::new(false),
                threads: std::sync::Mutex::new(Vec::new()),
                signature: Signature { inputs: vec![input], outputs: Vec::new() },
            })
        }
    }

    impl Timed {
        fn threads(&self) -> Vec<String> {
            std::mem::take(&mut *self.threads.lock().unwrap())
        }
    }

    impl Session for Timed {
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn run(&self, _: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
            let name = std::thread::current().name().unwrap_or("?").to_owned();
            self.threads.lock().unwrap().push(name);
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(self.per_run);
            while self.gate.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(Vec::new())
        }
    }

    fn spec(extra: &str) -> ModelSpec {
        let config: ModelConfig = toml::from_str(&format!("name = \"m\"\npath = \"m.onnx\"\n{extra}")).unwrap();
        config.validate(&|k| k.to_string()).unwrap()
    }

    fn input() -> Vec<Tensor> {
        vec![Tensor::from_f32("x", vec![1, 4], &[0.0; 4])]
    }

    #[test]
    fn auto_runs_a_short_fixed_shape_call_inline_and_everything_else_on_threads() {
        let fast = Timed::new(0, &[-1, 4]);
        let probe = input();
        let decided = |extra: &str, session: &Timed, measured| {
            let spec = spec(extra);
            decide(&spec, spec.batching.as_ref(), session, Some(&probe), measured)
        };
        assert_eq!(
            decided("", &fast, Some(3.0)),
            ExecutorInfo { kind: "inline", by: "measured", call_us: Some(3.0), inline_rows: Some(1) }
        );
        // Measured here when the backend choice did not.
        let here = decided("", &fast, None);
        assert_eq!((here.kind, here.by), ("inline", "measured"));
        assert!(here.call_us.is_some_and(|us| us <= INLINE_MAX_US), "{here:?}");
        assert_eq!(decided("", &fast, Some(INLINE_MAX_US * 2.0)).kind, "threads");
        assert_eq!(decided("[batching]\nmax_batch_size = 8", &fast, Some(3.0)).by, "batching");
        let no_wait = decided("[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 0", &fast, Some(3.0));
        assert_eq!((no_wait.kind, no_wait.by), ("inline", "measured"));
        assert_eq!(decided("", &Timed::new(0, &[1, -1]), Some(3.0)).by, "symbolic");
        assert_eq!(
            decide(&spec(""), None, fast.as_ref(), None, None),
            ExecutorInfo { kind: "threads", by: "unmeasured", call_us: None, inline_rows: None }
        );
        // Configured wins over every rule.
        assert_eq!(decided("executor = \"threads\"", &fast, Some(3.0)).kind, "threads");
        assert_eq!(decided("executor = \"inline\"", &Timed::new(0, &[1, -1]), None).kind, "inline");
    }

    #[test]
    fn a_clearly_slow_call_is_timed_once() {
        let slow = Timed::new(2_000, &[1, 4]);
        let info = decide(&spec(""), None, slow.as_ref(), Some(&input()), None);
        assert_eq!((info.kind, info.by), ("threads", "measured"));
        assert!(info.call_us.is_some_and(|us| us >= 2_000.0), "{info:?}");
        assert_eq!(slow.threads().len(), 1, "one run settles a call 40x over the bound");
    }

    #[test]
    fn inline_cannot_batch_with_a_wait() {
        let config: ModelConfig =
            toml::from_str("name = \"m\"\npath = \"m.onnx\"\nexecutor = \"inline\"\n[batching]\nmax_batch_size = 8\n")
                .unwrap();
        let err = config.validate(&|k| k.to_string()).unwrap_err().to_string();
        assert!(err.contains("executor") && err.contains("cannot batch"), "{err}");
        // Without a wait a lone request has nothing to gather.
        let spec = spec("executor = \"inline\"\n[batching]\nmax_batch_size = 8\nmax_queue_delay_us = 0");
        assert_eq!(spec.executor, ExecutorChoice::Inline);
    }

    /// A lone call (the worker asleep) runs on the caller's thread; one that finds another in
    /// flight goes to a worker thread; past the queue's bound, refused at once. Every accepted call is counted.
    #[test]
    fn a_lone_call_runs_inline_and_calls_under_load_go_to_the_workers() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
        let session = Timed::new(0, &[-1, 4]);
        let stats = Arc::new(ModelStats::default());
        let info = ExecutorInfo { kind: "inline", by: "configured", call_us: None, inline_rows: None };
        let executor = Arc::new(Executor::start(
            &spec("workers = 1\nqueue_bound = 1"),
            None,
            "w",
            session.clone(),
            stats.clone(),
            &info,
        ));
        let until = |done: &dyn Fn() -> bool| {
            while !done() {
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        std::thread::sleep(IDLE_GAP * 2);
        until(&|| stats.sleeping.load(Relaxed) == 1);
        runtime.block_on(executor.infer(input(), true)).unwrap().unwrap();
        let caller = std::thread::current().name().unwrap().to_owned();
        assert_eq!(session.threads(), [caller], "a lone call runs on the caller's thread");
        // Not alone in the server: the worker takes it, however idle this version is.
        std::thread::sleep(IDLE_GAP * 2);
        until(&|| stats.sleeping.load(Relaxed) == 1);
        runtime.block_on(executor.infer(input(), false)).unwrap().unwrap();
        assert_eq!(session.threads(), ["w-0"]);

        // One call held inline at the gate; the next goes to the worker (held there too); with
        // the queue's one place then taken, one more is refused.
        session.gate.store(true, Ordering::SeqCst);
        std::thread::sleep(IDLE_GAP * 2);
        until(&|| stats.sleeping.load(Relaxed) == 1);
        let call = |executor: &Arc<Executor>| {
            let executor = executor.clone();
            runtime.spawn(async move { executor.infer(input(), true).await })
        };
        let inline = call(&executor);
        until(&|| session.running.load(Ordering::SeqCst) == 1);
        let queued = call(&executor);
        until(&|| session.running.load(Ordering::SeqCst) == 2);
        let waiting = call(&executor);
        until(&|| executor.queue.len() == 1);
        match runtime.block_on(executor.infer(input(), true)) {
            Err(NotRun::Full(QueueFull { bound: 1 })) => {}
            other => panic!("a call with the queue full: {other:?}"),
        }
        session.gate.store(false, Ordering::SeqCst);
        for call in [inline, queued, waiting] {
            runtime.block_on(call).unwrap().unwrap().unwrap();
        }
        let threads = session.threads();
        assert_eq!(threads.iter().filter(|t| t.as_str() == "w-0").count(), 2, "{threads:?}");
        assert_eq!(session.peak.load(Ordering::SeqCst), 2, "one inline call beside the one worker, no more");
        assert_eq!(stats.executions.load(Relaxed), 5);
        assert_eq!(executor.in_flight.load(Relaxed), 0);
        drop(executor);
        until(&|| stats.workers.load(Relaxed) == 0);
    }

    /// A call timed on one row runs inline for one row; a lone request of more rows goes to the
    /// workers.
    #[test]
    fn a_batch_larger_than_the_timed_one_goes_to_the_workers() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let session = Timed::new(0, &[-1, 4]);
        let stats = Arc::new(ModelStats::default());
        let info = decide(&spec("workers = 1"), None, session.as_ref(), Some(&input()), Some(3.0));
        assert_eq!((info.kind, info.inline_rows), ("inline", Some(1)));
        let executor = Executor::start(&spec("workers = 1"), None, "w", session.clone(), stats.clone(), &info);
        let lone = |rows: usize| {
            std::thread::sleep(IDLE_GAP * 2);
            while stats.sleeping.load(Relaxed) != 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let inputs = vec![Tensor::from_f32("x", vec![rows, 4], &vec![0.0; rows * 4])];
            runtime.block_on(executor.infer(inputs, true)).unwrap().unwrap();
            session.threads()
        };
        let caller = std::thread::current().name().unwrap().to_owned();
        assert_eq!(lone(1), [caller]);
        assert_eq!(lone(8), ["w-0"], "eight rows where one was timed");
    }

    #[test]
    fn a_threads_version_never_runs_inline() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let session = Timed::new(0, &[-1, 4]);
        let stats = Arc::new(ModelStats::default());
        let info = ExecutorInfo { kind: "threads", by: "configured", call_us: None, inline_rows: None };
        let executor = Executor::start(&spec("workers = 1"), None, "w", session.clone(), stats, &info);
        runtime.block_on(executor.infer(input(), true)).unwrap().unwrap();
        assert_eq!(session.threads(), ["w-0"]);
    }
}
