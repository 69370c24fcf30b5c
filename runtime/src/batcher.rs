//! A model's worker threads: take jobs from the bounded queue, run them on the backend, answer.
//!
//! With batching on, a worker that takes a job keeps taking compatible ones until the batch
//! reaches a preferred size or the maximum, or until the first job has waited
//! `max_queue_delay`; it stacks their inputs along the first (batch) dimension, runs the backend
//! once, and splits the outputs back, row ranges in request order. A job that does not fit
//! (other trailing shape, or too many rows) starts the next batch.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tokio::sync::oneshot;

use crate::backend::{BackendError, Session};
use crate::config::Batching;
use crate::onnx::ModelGraph;
use crate::stats::ModelStats;
use crate::tensor::Tensor;

/// What a job's caller gets back.
pub type Reply = Result<Vec<Tensor>, BackendError>;

/// One inference waiting for a worker.
pub struct Job {
    pub inputs: Vec<Tensor>,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Reply>,
}

impl Job {
    /// Rows in the batch dimension (the first input's first dimension: a batched model's
    /// requests are checked by [`batch_rows`] to agree on it before they are queued).
    fn rows(&self) -> usize {
        self.inputs.first().and_then(|t| t.shape.first().copied()).unwrap_or(0)
    }

    /// Whether `other` can share a backend call with this job: same trailing shapes.
    fn stacks_with(&self, other: &Job) -> bool {
        self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .zip(&other.inputs)
                .all(|(a, b)| a.datatype == b.datatype && a.shape[1..] == b.shape[1..])
    }
}

/// Checks that a model can be batched: every input and output has a dynamic first dimension,
/// and no row's answer depends on the other rows. Dynamic quantization does: its scale is taken
/// over the whole tensor, so stacking requests would change each one's answer.
pub fn check_batchable(graph: &ModelGraph) -> Result<(), String> {
    if let Some(n) = graph.nodes.iter().find(|n| n.op_type == "DynamicQuantizeLinear") {
        return Err(format!(
            "batching would change its answers: DynamicQuantizeLinear `{}` quantizes with a scale taken over \
             the whole batch; serve it unbatched",
            n.name
        ));
    }
    let signature = &graph.signature;
    for spec in signature.inputs.iter().chain(&signature.outputs) {
        if spec.shape.first().is_none_or(|&d| d >= 0) {
            return Err(format!(
                "batching needs a dynamic first (batch) dimension on every input and output; `{}` is {}",
                spec.name,
                spec.shape_text()
            ));
        }
    }
    Ok(())
}

/// The rows a request gives a batched model: every input's first (batch) dimension, which must
/// agree, since the batcher stacks and splits all inputs by the same row ranges.
pub fn batch_rows(inputs: &[Tensor]) -> Result<usize, String> {
    let rows = |t: &Tensor| t.shape.first().copied().unwrap_or(0);
    let Some(first) = inputs.first() else { return Ok(0) };
    match inputs.iter().find(|t| rows(t) != rows(first)) {
        None => Ok(rows(first)),
        Some(other) => Err(format!(
            "inputs disagree on the batch (first) dimension: `{}` has {} rows, `{}` has {}; this model batches \
             requests and needs the same number of rows in every input",
            first.name,
            rows(first),
            other.name,
            rows(other)
        )),
    }
}

/// A worker counted in `stats.workers` from [`Alive::claim`] until this is dropped: held by the
/// worker thread for its whole life (and dropped unused when the thread could not start).
pub struct Alive(Arc<ModelStats>);

impl Alive {
    pub fn claim(stats: &Arc<ModelStats>) -> Alive {
        stats.workers.fetch_add(1, Relaxed);
        Alive(stats.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.workers.fetch_sub(1, Relaxed);
    }
}

/// Runs jobs from `queue` until every sender is gone and the queue is drained. A backend call
/// that panics answers its jobs with an error and is counted; the worker carries on.
pub fn run_worker(queue: Receiver<Job>, session: Arc<dyn Session>, stats: Arc<ModelStats>, batching: Option<Batching>) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match next_job(&queue, &stats) {
                Some(job) => job,
                None => return,
            },
        };
        stats.queue.observe(first.enqueued.elapsed());
        if first.reply.is_closed() {
            continue; // the caller went away while queued
        }
        let Some(b) = &batching else {
            execute(session.as_ref(), &stats, vec![first]);
            continue;
        };
        let deadline = first.enqueued + b.max_queue_delay;
        let mut rows = first.rows();
        let mut jobs = vec![first];
        while rows < b.max_batch_size && !b.preferred_batch_sizes.contains(&rows) {
            let next = match recv_until(&queue, deadline) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            };
            stats.queue.observe(next.enqueued.elapsed());
            if next.reply.is_closed() {
                continue;
            }
            if !jobs[0].stacks_with(&next) || rows + next.rows() > b.max_batch_size {
                carried = Some(next);
                break;
            }
            rows += next.rows();
            jobs.push(next);
        }
        execute(session.as_ref(), &stats, jobs);
    }
}

/// How long an idle worker polls its queue before it sleeps. A sleeping thread costs a futex wake
/// on the next request, tens of microseconds on a small box; a short poll keeps a steady stream
/// of requests off that path (see docs/benchmarks.md).
pub const IDLE_SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// The next job: polled for [`IDLE_SPIN`], then waited for. `None` when the queue is closed.
fn next_job(queue: &Receiver<Job>, stats: &ModelStats) -> Option<Job> {
    let spin_until = Instant::now() + IDLE_SPIN;
    loop {
        match queue.try_recv() {
            Ok(job) => return Some(job),
            Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
            Err(crossbeam_channel::TryRecvError::Empty) if Instant::now() < spin_until => std::hint::spin_loop(),
            Err(crossbeam_channel::TryRecvError::Empty) => {
                stats.sleeping.fetch_add(1, Relaxed);
                let job = queue.recv().ok();
                stats.sleeping.fetch_sub(1, Relaxed);
                return job;
            }
        }
    }
}

/// Sleeping until a deadline wakes late (timer slack, the futex wake): sleep until this long
/// before it, then poll, so a batch never waits much past `max_queue_delay`.
const DEADLINE_SPIN: std::time::Duration = std::time::Duration::from_micros(100);

/// The next job before `deadline`.
fn recv_until(queue: &Receiver<Job>, deadline: Instant) -> Result<Job, RecvTimeoutError> {
    if let Some(sleep_until) = deadline.checked_sub(DEADLINE_SPIN)
        && Instant::now() < sleep_until
    {
        match queue.recv_deadline(sleep_until) {
            Err(RecvTimeoutError::Timeout) => {}
            other => return other,
        }
    }
    loop {
        match queue.try_recv() {
            Ok(job) => return Ok(job),
            Err(crossbeam_channel::TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
            Err(crossbeam_channel::TryRecvError::Empty) if Instant::now() >= deadline => {
                return Err(RecvTimeoutError::Timeout);
            }
            Err(crossbeam_channel::TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
}

/// The backend call, with a panic inside it (a backend bug, a hostile graph) turned into an
/// error for the jobs at hand: the worker, and the model, keep serving.
fn run_guarded(session: &dyn Session, stats: &ModelStats, inputs: &[Tensor]) -> Reply {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.run(inputs))) {
        Ok(result) => result,
        Err(panic) => {
            stats.panics.fetch_add(1, Relaxed);
            let message = outpost_updater::panic_message(&*panic);
            tracing::error!(panic = %message, "the backend panicked on a request; it is answered 500 and the worker carries on");
            Err(BackendError::Run(format!("the backend failed on this request (it panicked: {message})")))
        }
    }
}

/// One backend call for `jobs` (stacked when more than one), each answered with its rows.
fn execute(session: &dyn Session, stats: &ModelStats, mut jobs: Vec<Job>) {
    if jobs.len() == 1 {
        let job = jobs.pop().expect("one job");
        let _ = job.reply.send(run_one(session, stats, &job.inputs));
        return;
    }
    let started = Instant::now();
    let rows: Vec<usize> = jobs.iter().map(Job::rows).collect();
    let total: usize = rows.iter().sum();
    stats.batch_size.observe_value(total as u64);
    let stacked: Vec<Tensor> =
        (0..jobs[0].inputs.len()).map(|i| stack(jobs.iter().map(|j| &j.inputs[i]), total)).collect();
    let result = run_guarded(session, stats, &stacked);
    finish(stats, started);
    match result.and_then(|outputs| split(outputs, &rows)) {
        Ok(per_job) => {
            for (job, outputs) in jobs.into_iter().zip(per_job) {
                let _ = job.reply.send(Ok(outputs));
            }
        }
        Err(e) => {
            let message = e.to_string();
            for job in jobs {
                let _ = job.reply.send(Err(BackendError::Run(message.clone())));
            }
        }
    }
}

/// One backend call for one request's `inputs`, counted in `stats` (a panic is answered and
/// counted): for a worker thread, and for a request's own task ([`crate::executor`]).
pub fn run_one(session: &dyn Session, stats: &ModelStats, inputs: &[Tensor]) -> Reply {
    let started = Instant::now();
    stats.batch_size.observe_value(inputs.first().and_then(|t| t.shape.first().copied()).unwrap_or(0) as u64);
    let result = run_guarded(session, stats, inputs);
    finish(stats, started);
    result
}

fn finish(stats: &ModelStats, started: Instant) {
    stats.compute.observe(started.elapsed());
    stats.executions.fetch_add(1, Relaxed);
}

/// Concatenates tensors along the first dimension.
pub(crate) fn stack<'a>(parts: impl Iterator<Item = &'a Tensor>, total_rows: usize) -> Tensor {
    let mut parts = parts.peekable();
    let first = parts.peek().expect("at least one part");
    let (name, datatype, mut shape) = (first.name.clone(), first.datatype, first.shape.clone());
    shape[0] = total_rows;
    let mut data = Vec::new();
    for p in parts {
        data.extend_from_slice(&p.data);
    }
    Tensor { name, datatype, shape, data }
}

/// Splits each output's first dimension into `rows` ranges, one output set per job.
fn split(outputs: Vec<Tensor>, rows: &[usize]) -> Result<Vec<Vec<Tensor>>, BackendError> {
    let total: usize = rows.iter().sum();
    let mut per_job: Vec<Vec<Tensor>> = rows.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for out in outputs {
        if out.shape.first() != Some(&total) {
            return Err(BackendError::Run(format!(
                "batched output `{}` has shape {:?}, not {total} rows: this model cannot be batched",
                out.name, out.shape
            )));
        }
        let row_bytes = out.data.len().checked_div(total).unwrap_or(0);
        let mut offset = 0;
        for (job, &n) in per_job.iter_mut().zip(rows) {
            let mut shape = out.shape.clone();
            shape[0] = n;
            let data = out.data[offset..offset + n * row_bytes].to_vec();
            offset += n * row_bytes;
            job.push(Tensor { name: out.name.clone(), datatype: out.datatype, shape, data });
        }
    }
    Ok(per_job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Signature, TensorSpec};
    use crate::tensor::DataType;

    /// Doubles its input and counts how many rows each call got.
    struct Doubler {
        signature: Signature,
        calls: std::sync::Mutex<Vec<usize>>,
    }

    impl Session for Doubler {
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
            self.calls.lock().unwrap().push(inputs[0].shape[0]);
            let v: Vec<f32> = inputs[0].to_f64().iter().map(|x| (*x * 2.0) as f32).collect();
            Ok(vec![Tensor::from_f32("y", inputs[0].shape.clone(), &v)])
        }
    }

    fn doubler() -> Arc<Doubler> {
        let spec = |n: &str| TensorSpec { name: n.into(), datatype: DataType::Fp32, shape: vec![-1, 2] };
        Arc::new(Doubler {
            signature: Signature { inputs: vec![spec("x")], outputs: vec![spec("y")] },
            calls: Default::default(),
        })
    }

    fn job(rows: usize, start: f32) -> (Job, oneshot::Receiver<Reply>) {
        let v: Vec<f32> = (0..rows * 2).map(|i| start + i as f32).collect();
        let (tx, rx) = oneshot::channel();
        (Job { inputs: vec![Tensor::from_f32("x", vec![rows, 2], &v)], enqueued: Instant::now(), reply: tx }, rx)
    }

    #[test]
    fn queued_jobs_are_stacked_and_split_back_in_order() {
        let session = doubler();
        let (tx, rx) = crossbeam_channel::bounded(16);
        let mut replies = Vec::new();
        for (rows, start) in [(1, 0.0), (3, 100.0), (2, 200.0)] {
            let (j, r) = job(rows, start);
            tx.send(j).unwrap();
            replies.push((rows, start, r));
        }
        drop(tx);
        let batching = Batching {
            max_batch_size: 8,
            max_queue_delay: std::time::Duration::from_millis(50),
            preferred_batch_sizes: vec![],
            mode: crate::config::BatchingMode::Always,
        };
        run_worker(rx, session.clone(), Arc::default(), Some(batching));
        assert_eq!(*session.calls.lock().unwrap(), vec![6], "one backend call for all three");
        for (rows, start, mut r) in replies {
            let out = r.try_recv().unwrap().unwrap();
            let want: Vec<f64> = (0..rows * 2).map(|i| 2.0 * (start as f64 + i as f64)).collect();
            assert_eq!(out[0].shape, vec![rows, 2]);
            assert_eq!(out[0].to_f64(), want);
        }
    }

    #[test]
    fn a_batch_never_exceeds_the_maximum_and_preferred_sizes_go_at_once() {
        let session = doubler();
        let (tx, rx) = crossbeam_channel::bounded(16);
        let mut replies = Vec::new();
        for rows in [2, 2, 3, 1, 1] {
            let (j, r) = job(rows, 0.0);
            tx.send(j).unwrap();
            replies.push(r);
        }
        drop(tx);
        let batching = Batching {
            max_batch_size: 5,
            max_queue_delay: std::time::Duration::from_millis(50),
            preferred_batch_sizes: vec![4],
            mode: crate::config::BatchingMode::Always,
        };
        run_worker(rx, session.clone(), Arc::default(), Some(batching));
        // 2+2 hits the preferred 4; 3+1 = 4 again; the last 1 alone.
        assert_eq!(*session.calls.lock().unwrap(), vec![4, 4, 1]);
        assert!(replies.iter_mut().all(|r| r.try_recv().unwrap().is_ok()));
    }

    /// Panics on a negative first value, as a backend with a bug would on some input.
    struct Fragile(Arc<Doubler>);

    impl Session for Fragile {
        fn signature(&self) -> &Signature {
            self.0.signature()
        }
        fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
            assert!(inputs[0].to_f64()[0] >= 0.0, "index out of bounds: the len is 0 but the index is 0");
            self.0.run(inputs)
        }
    }

    #[test]
    fn a_backend_that_panics_answers_that_request_and_the_worker_carries_on() {
        let stats = Arc::new(ModelStats::default());
        let (tx, rx) = crossbeam_channel::bounded(16);
        let (bad, mut bad_reply) = job(1, -5.0);
        let (good, mut good_reply) = job(1, 1.0);
        tx.send(bad).unwrap();
        tx.send(good).unwrap();
        drop(tx);
        let alive = Alive::claim(&stats);
        assert_eq!(stats.workers.load(Relaxed), 1);
        let worker_stats = stats.clone();
        std::thread::spawn(move || {
            let _alive = alive;
            run_worker(rx, Arc::new(Fragile(doubler())), worker_stats, None)
        })
        .join()
        .expect("the worker ends when its queue closes, not by a panic");
        let err = bad_reply.try_recv().unwrap().unwrap_err().to_string();
        assert!(err.contains("panicked") && err.contains("index out of bounds"), "{err}");
        assert_eq!(good_reply.try_recv().unwrap().unwrap()[0].to_f64(), vec![2.0, 4.0], "the next request is served");
        assert_eq!(stats.panics.load(Relaxed), 1);
        assert_eq!(stats.workers.load(Relaxed), 0, "a worker that ended is no longer counted");
    }

    #[test]
    fn a_batched_request_whose_inputs_disagree_on_rows_is_refused_naming_them() {
        let t = |name: &str, rows: usize| Tensor::from_f32(name, vec![rows, 4], &vec![0.0; rows * 4]);
        assert_eq!(batch_rows(&[t("a", 2), t("b", 2)]), Ok(2));
        let err = batch_rows(&[t("a", 1), t("b", 2)]).unwrap_err();
        assert!(err.contains("`a` has 1 rows, `b` has 2"), "{err}");
    }

    fn sample(name: &str) -> ModelGraph {
        ModelGraph::read(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(name)).unwrap()
    }

    #[test]
    fn models_without_a_dynamic_batch_dimension_cannot_batch() {
        let mut graph = sample("digits-cnn.onnx");
        assert!(check_batchable(&graph).is_ok());
        graph.signature.outputs[0].shape = vec![1, 10];
        assert!(check_batchable(&graph).unwrap_err().contains("`probabilities` is [1, 10]"));
    }

    #[test]
    fn dynamically_quantized_models_are_not_batched() {
        let e = check_batchable(&sample("digits-cnn-dynamic.onnx")).unwrap_err();
        assert!(e.contains("DynamicQuantizeLinear"), "{e}");
    }
}
