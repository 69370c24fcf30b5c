//! Inference backends: prepare a model once, run it many times.
//!
//! A [`Backend`] turns an ONNX file into a [`Session`]; `check` says whether this build and host
//! can run a model at all, naming the operator when it cannot, so a bad model is refused at load
//! time and never at the first request. Backends sit behind Cargo features; asking for one the
//! build lacks is a [`BackendError::NotBuilt`] that says how to get it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::onnx::ModelGraph;
use crate::tensor::{DataType, Tensor};

#[cfg(feature = "ort")]
pub mod ort;
#[cfg(feature = "tract")]
mod tract;

/// One input or output of a model, as V2 metadata shows it: dynamic dimensions are -1.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// Whether `shape` fits this spec: same rank, fixed dimensions equal.
    pub fn accepts_shape(&self, shape: &[usize]) -> bool {
        shape.len() == self.shape.len()
            && self.shape.iter().zip(shape).all(|(&want, &got)| want < 0 || want as usize == got)
    }

    /// The shape as V2 metadata and error messages write it, e.g. `[-1, 64]`.
    pub fn shape_text(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("[{}]", dims.join(", "))
    }
}

/// A model's inputs and outputs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

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
}

/// A way to run ONNX models.
pub trait Backend: Send + Sync {
    /// The name used in configuration, e.g. `tract`.
    fn name(&self) -> &'static str;
    /// Whether this build and host can run the model; the error names what stands in the way.
    fn check(&self, graph: &ModelGraph) -> Result<(), BackendError>;
    /// Prepares a session (after `check`).
    fn prepare(&self, graph: &ModelGraph, options: &SessionOptions) -> Result<Box<dyn Session>, BackendError>;
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
}

/// The backend named in configuration, or why it cannot be had.
pub fn by_name(name: &str) -> Result<Box<dyn Backend>, BackendError> {
    match name {
        #[cfg(feature = "tract")]
        "tract" => Ok(Box::new(tract::Tract)),
        #[cfg(not(feature = "tract"))]
        "tract" => Err(BackendError::NotBuilt {
            backend: name.into(),
            how: "rebuild with `--features tract` (it is on by default)",
        }),
        #[cfg(feature = "ort")]
        "ort" => Ok(Box::new(ort::Ort)),
        #[cfg(not(feature = "ort"))]
        "ort" => Err(BackendError::NotBuilt {
            backend: name.into(),
            how: "rebuild with `--features ort` (a glibc build; ONNX Runtime's libonnxruntime.so is loaded at run time)",
        }),
        other => Err(BackendError::Unknown(other.into())),
    }
}

/// The backend used when configuration names none: tract when the build has it.
#[cfg(feature = "tract")]
pub const DEFAULT_BACKEND: &str = "tract";
/// The backend used when configuration names none: tract when the build has it.
#[cfg(not(feature = "tract"))]
pub const DEFAULT_BACKEND: &str = "ort";

/// The backend value that tries each built backend in [`AUTO_ORDER`] until one serves the model.
pub const AUTO: &str = "auto";
/// Tract first (pure Rust, no library to find), then ONNX Runtime where the build has it.
#[cfg(feature = "ort")]
pub const AUTO_ORDER: &[&str] = &["tract", "ort"];
/// Tract first (pure Rust, no library to find), then ONNX Runtime where the build has it.
#[cfg(not(feature = "ort"))]
pub const AUTO_ORDER: &[&str] = &["tract"];

/// Execution provider names the ort backend knows, in the order a GPU box would try them.
pub const PROVIDERS: [&str; 5] = ["tensorrt", "cuda", "openvino", "qnn", "cpu"];

/// Loads a model file and prepares it on the named backend: parse, `check`, `prepare`.
pub fn load(backend: &dyn Backend, path: &Path, options: &SessionOptions) -> Result<Box<dyn Session>, crate::Error> {
    let graph = ModelGraph::read(path)?;
    backend.check(&graph)?;
    Ok(backend.prepare(&graph, options)?)
}
