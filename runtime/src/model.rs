//! A served model: its slot in the registry, the loaded session, and the bounded queue in front
//! of its worker threads.
//!
//! Requests never wait on a lock here: the loaded model is read through an `ArcSwap`, and a full
//! queue answers at once. Workers are plain threads (inference is CPU-bound) that take jobs from
//! the queue and answer through a oneshot channel. Dropping a [`LoadedModel`] closes its queue;
//! its workers finish the jobs already taken and exit, so a swap never drops a request.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use crossbeam_channel::{Sender, TrySendError};
use tokio::sync::oneshot;

use crate::backend::{self, BackendError, ProviderChoice, Session, SessionOptions, Signature};
use crate::batcher::{self, Job, Reply};
use crate::config::ModelSpec;
use crate::golden::Golden;
use crate::onnx::ModelGraph;
use crate::stats::ModelStats;
use crate::tensor::Tensor;

/// Where a model is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Ready,
    Unavailable(String),
}

impl ModelState {
    /// The V2 repository-index spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelState::Loading => "LOADING",
            ModelState::Ready => "READY",
            ModelState::Unavailable(_) => "UNAVAILABLE",
        }
    }
}

/// A configured model: its spec, what is loaded now, and its statistics.
pub struct ModelSlot {
    pub spec: ModelSpec,
    pub stats: Arc<ModelStats>,
    current: ArcSwapOption<LoadedModel>,
    state: Mutex<ModelState>,
}

/// A model ready to serve.
pub struct LoadedModel {
    pub signature: Signature,
    pub backend: &'static str,
    /// The execution provider, for backends that have them.
    pub provider: Option<ProviderChoice>,
    queue: Sender<Job>,
}

/// The queue is full (or closed by an unload): the caller answers 503.
#[derive(Debug)]
pub struct QueueFull {
    pub bound: usize,
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model `{name}`: {source}")]
    Model { name: String, source: crate::Error },
}

impl ModelSlot {
    /// An empty slot, in state `Loading`.
    pub fn new(spec: ModelSpec) -> ModelSlot {
        ModelSlot {
            spec,
            stats: Arc::default(),
            current: ArcSwapOption::empty(),
            state: Mutex::new(ModelState::Loading),
        }
    }

    /// The model being served, if any.
    pub fn current(&self) -> Option<Arc<LoadedModel>> {
        self.current.load_full()
    }

    /// Where the model is in its life.
    pub fn state(&self) -> ModelState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_state(&self, s: ModelState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// Loads the model (parse, check, prepare, golden check) and starts serving it. On failure
    /// whatever was served before keeps serving, and the slot records why.
    pub fn load(&self) -> Result<(), LoadError> {
        let started = Instant::now();
        match prepare(&self.spec) {
            Ok(Prepared { session, backend, golden_diff }) => {
                let loaded = LoadedModel::start(&self.spec, session, backend, self.stats.clone());
                self.current.store(Some(Arc::new(loaded)));
                self.set_state(ModelState::Ready);
                tracing::info!(
                    model = %self.spec.name, version = %self.spec.version, backend,
                    golden_max_diff = golden_diff, load_ms = started.elapsed().as_millis() as u64,
                    "model ready"
                );
                Ok(())
            }
            Err(source) => {
                let err = LoadError::Model { name: self.spec.name.clone(), source };
                if self.current().is_none() {
                    self.set_state(ModelState::Unavailable(err.to_string()));
                }
                tracing::error!(model = %self.spec.name, version = %self.spec.version, error = %err, "model not loaded");
                Err(err)
            }
        }
    }

    /// Stops serving the model; requests already queued still finish.
    pub fn unload(&self) {
        self.current.store(None);
        self.set_state(ModelState::Unavailable("unloaded".into()));
        tracing::info!(model = %self.spec.name, "model unloaded");
    }
}

/// A session that passed its warm-up.
struct Prepared {
    session: Arc<dyn Session>,
    backend: &'static str,
    /// Largest difference from the golden outputs, when there were some.
    golden_diff: Option<f64>,
}

/// Parse, check and prepare on the configured backend, then warm up (the golden check).
fn prepare(spec: &ModelSpec) -> Result<Prepared, crate::Error> {
    let backend = backend::by_name(&spec.backend)?;
    let options = SessionOptions {
        intra_op_threads: spec.intra_op_threads,
        inter_op_threads: spec.inter_op_threads,
        providers: spec.providers.clone(),
        provider_options: spec.provider_options.clone(),
        instances: spec.workers,
    };
    let graph = ModelGraph::read(&spec.path)?;
    backend.check(&graph)?;
    if spec.batching.is_some() {
        batcher::check_batchable(&graph).map_err(|reason| BackendError::Refused { path: spec.path.clone(), reason })?;
    }
    let session: Arc<dyn Session> = backend.prepare(&graph, &options)?.into();
    // Warm-up: the golden inputs where they ship, else one all-zero batch of one.
    let golden_diff = match &spec.golden {
        Some(path) => Some(Golden::read(path)?.check(path, session.as_ref())?),
        None => {
            warm_up(session.as_ref())?;
            None
        }
    };
    Ok(Prepared { session, backend: backend.name(), golden_diff })
}

impl LoadedModel {
    fn start(
        spec: &ModelSpec,
        session: Arc<dyn Session>,
        backend: &'static str,
        stats: Arc<ModelStats>,
    ) -> LoadedModel {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(spec.queue_bound);
        for i in 0..spec.workers {
            let rx = rx.clone();
            let session = session.clone();
            let stats = stats.clone();
            let batching = spec.batching.clone();
            let name = format!("infer-{}-{i}", spec.name);
            let spawned =
                std::thread::Builder::new().name(name).spawn(move || batcher::run_worker(rx, session, stats, batching));
            if let Err(e) = spawned {
                tracing::error!(model = %spec.name, error = %e, "could not start an inference thread");
            }
        }
        LoadedModel {
            signature: session.signature().clone(),
            backend,
            provider: session.provider().cloned(),
            queue: tx,
        }
    }

    /// Queues an inference, or says at once that the queue is full.
    pub fn submit(&self, inputs: Vec<Tensor>) -> Result<oneshot::Receiver<Reply>, QueueFull> {
        let (reply, rx) = oneshot::channel();
        let job = Job { inputs, enqueued: Instant::now(), reply };
        match self.queue.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                Err(QueueFull { bound: self.queue.capacity().unwrap_or(0) })
            }
        }
    }
}

fn warm_up(session: &dyn Session) -> Result<(), BackendError> {
    let inputs: Vec<Tensor> = session
        .signature()
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec.shape.iter().map(|&d| d.max(1) as usize).collect();
            let bytes = Tensor::shape_elements(&shape).unwrap_or(0) * spec.datatype.size().unwrap_or(0);
            Tensor { name: spec.name.clone(), datatype: spec.datatype, shape, data: vec![0; bytes] }
        })
        .collect();
    session.run(&inputs).map(drop)
}
