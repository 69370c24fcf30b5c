//! What every backend implements and returns: the [`Backend`] and [`Session`] traits, their
//! options, statistics and errors (apart from `mod.rs`, so the backends depend on this file and
//! not on the module that declares them).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::onnx::{ModelFileError, ModelGraph, Signature};
use crate::tensor::Tensor;

/// What a refusal adds where the build has another backend to offer.
#[cfg(feature = "ort")]
pub(crate) const OTHER_BACKEND: &str =
    "; this build also has ONNX Runtime: serve the model with backend = \"ort\", or \"auto\" to fall back to it";
#[cfg(not(feature = "ort"))]
pub(crate) const OTHER_BACKEND: &str = "";

/// Per-session settings from the model's configuration.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    /// Threads a single inference may use inside the backend; `None` leaves the backend's default.
    pub intra_op_threads: Option<usize>,
    /// Threads running independent parts of the graph at once (ONNX Runtime).
    pub inter_op_threads: Option<usize>,
    /// Execution providers to try in order (ONNX Runtime); empty means CPU.
    pub providers: Vec<String>,
    /// Options per execution provider, as key/value strings.
    pub provider_options: BTreeMap<String, Vec<(String, String)>>,
    /// Inferences that may run at once (the model's workers): backends whose sessions cannot
    /// run concurrently prepare this many.
    pub instances: usize,
    /// Declared input shapes (signature order), prepared at load by backends that plan per shape.
    pub shapes: Vec<Vec<Vec<usize>>>,
    /// Plans a backend that plans per shape keeps for undeclared shapes (at least 1).
    pub plan_cache: usize,
    /// Let ONNX Runtime use its saturating u8s8 kernels on x86 CPUs without VNNI (faster; the
    /// answer then depends on the CPU). Off by default: `exact_int8 = true` in configuration.
    pub fast_int8: bool,
}

/// What a session holds prepared for concrete shapes (backends that plan per shape), for
/// metrics and model statistics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PlanStats {
    /// Whether one plan serves every shape (tract analysed the symbolic dimensions).
    pub symbolic: bool,
    /// Plans held now, declared shapes included.
    pub plans: usize,
    /// Bytes of the constants (weights) those plans hold.
    pub bytes: u64,
    /// Plans prepared since load, and evicted to stay within the bound.
    pub prepared: u64,
    pub evicted: u64,
    /// Time spent preparing plans for new shapes, in milliseconds.
    pub prepare_ms: u64,
    /// The plan for every shape measured at load against plans for the warm-up input's shapes.
    pub specialised: Vec<Specialised>,
}

/// A general plan (symbolic dimensions kept) against one for concrete shapes (the warm-up
/// input's, and one row of it), each timed on that input at load; the concrete plan serves those
/// shapes when it is faster by [`Specialised::MARGIN`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Specialised {
    pub shapes: Vec<Vec<usize>>,
    /// The fastest of a few calls of each plan on the warm-up input, in microseconds.
    pub general_us: u64,
    pub concrete_us: u64,
    /// Whether the concrete plan was kept (it then counts among `plans`).
    pub kept: bool,
}

impl Specialised {
    /// How much faster the concrete plan must be to be kept: it holds its own copy of the
    /// weights, so a tie is not worth the memory.
    pub const MARGIN: f64 = 0.9;
}

/// Which execution provider a session runs on, and why the ones before it were skipped.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProviderChoice {
    pub provider: String,
    pub skipped: Vec<String>,
}

/// A prepared model: thread-safe, run many times.
pub trait Session: Send + Sync {
    /// The model's inputs and outputs.
    fn signature(&self) -> &Signature;
    /// Runs one inference. Inputs are in signature order and already validated against it.
    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError>;
    /// The execution provider, for backends that have them.
    fn provider(&self) -> Option<&ProviderChoice> {
        None
    }
    /// Plans per shape, for backends that prepare them.
    fn plans(&self) -> Option<PlanStats> {
        None
    }
    /// Whether a batch of rows may run slower per row than one row, so that configured batching
    /// is timed at load before it serves ([`crate::batch_choice`]): tract plans a symbolic batch
    /// with less optimisation than one row, and measured no faster per row on its plans for a
    /// batch size either. ONNX Runtime's batches are not timed: on the orientation classifier its
    /// 8 rows took 0.91-1.03 of one row's time 8 times, and batched requests were served 5-15%
    /// faster at 4 clients all the same (the queue's hand-offs spread over the batch).
    fn batch_may_lose(&self) -> bool {
        false
    }
    /// Called once at load with the warm-up input (the golden inputs): a backend whose general
    /// plan may run slower than one for concrete shapes measures both on it (and on its first
    /// row, the shape of a single request) and keeps the faster for those shapes, where the two
    /// answer within `tolerance` of each other. Empty where there was nothing to compare; a
    /// concrete plan that cannot be prepared or run is logged and left out (the general plan
    /// serves those shapes, as before).
    fn specialise(&self, _warm_up: &[Tensor], _tolerance: f64) -> Vec<Specialised> {
        Vec::new()
    }
    /// The same prepared model run on `threads` threads per call, sharing what this session
    /// prepared; `None` where the thread count is fixed when a session is prepared (ONNX
    /// Runtime), so that a new session must be prepared for it.
    fn on_threads(&self, _threads: usize) -> Option<Box<dyn Session>> {
        None
    }
}

/// A way to run ONNX models.
pub trait Backend: Send + Sync {
    /// The name used in configuration, e.g. `tract`.
    fn name(&self) -> &'static str;
    /// Whether this build and host can run the model; the error names what stands in the way.
    fn check(&self, graph: &ModelGraph) -> Result<(), BackendError>;
    /// Prepares a session (after `check`).
    fn prepare(&self, graph: &ModelGraph, options: &SessionOptions) -> Result<Box<dyn Session>, BackendError>;
    /// Whether one inference may run on several threads (`SessionOptions::intra_op_threads`).
    fn has_thread_pool(&self) -> bool {
        false
    }
    /// Whether a long call can run slower on the pool than on one thread, so that the pool is
    /// timed against one thread at load before it serves ([`crate::threads`]): tract splits
    /// each large operator across its pool, and on a network of many small ones the handovers
    /// can cost more than the other cores give. ONNX Runtime's pool is not timed (a long call
    /// gained on it in every measurement, and its timing did not hold still; docs/backends.md).
    fn pool_may_lose(&self) -> bool {
        false
    }
}

/// Why a backend could not load or run a model.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend `{backend}` is not in this build: {how}")]
    NotBuilt { backend: String, how: &'static str },
    #[error("unknown backend `{0}` (known: tract, ort)")]
    Unknown(String),
    #[error("{path}: the {backend} backend does not support operator `{op}` (node `{node}`){hint}")]
    UnsupportedOp { path: PathBuf, backend: &'static str, op: String, node: String, hint: &'static str },
    #[error("{path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("{path}: the {backend} backend could not prepare the model: {message}{hint}")]
    Prepare { path: PathBuf, backend: &'static str, message: String, hint: &'static str },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("{0}")]
    Library(String),
    #[error(transparent)]
    File(#[from] ModelFileError),
}
