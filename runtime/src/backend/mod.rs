//! Inference backends: prepare a model once, run it many times.
//!
//! A [`Backend`] turns an ONNX file into a [`Session`]; `check` says whether this build and host
//! can run a model at all, naming the operator when it cannot, so a bad model is refused at load
//! time and never at the first request. Backends sit behind Cargo features; asking for one the
//! build lacks is a [`BackendError::NotBuilt`] that says how to get it.

pub(crate) mod session;

use std::path::Path;

pub use self::session::{Backend, BackendError, PlanStats, ProviderChoice, Session, SessionOptions, Specialised};
use crate::onnx::ModelGraph;
pub use crate::onnx::{Signature, TensorSpec};

#[cfg(feature = "ort")]
pub mod ort;
#[cfg(feature = "tract")]
mod tract;

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

/// The backend used when configuration names none: `auto`, the fastest that serves the model.
pub const DEFAULT_BACKEND: &str = AUTO;

/// The backend value that prepares the model on each built backend in [`AUTO_ORDER`] and serves
/// it on the fastest of those that accept it (see `crate::choice`).
pub const AUTO: &str = "auto";
/// The backend `outpost inspect` and `outpost infer` use unless told: the build's first (a build
/// without backends names tract, which then says how to get it).
pub const FIRST_BACKEND: &str = if AUTO_ORDER.is_empty() { "tract" } else { AUTO_ORDER[0] };
/// The backends this build has.
pub const AUTO_ORDER: &[&str] = &[
    #[cfg(feature = "tract")]
    "tract",
    #[cfg(feature = "ort")]
    "ort",
];

/// Execution provider names the ort backend knows, in the order a GPU box would try them.
pub const PROVIDERS: [&str; 5] = ["tensorrt", "cuda", "openvino", "qnn", "cpu"];

/// Loads a model file and prepares it on the named backend: parse, `check`, `prepare`.
pub fn load(backend: &dyn Backend, path: &Path, options: &SessionOptions) -> Result<Box<dyn Session>, BackendError> {
    let graph = ModelGraph::read(path)?;
    backend.check(&graph)?;
    backend.prepare(&graph, options)
}
