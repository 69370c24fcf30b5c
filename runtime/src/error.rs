//! The runtime library's error: what loading a model or reading a config can fail with.

use crate::{backend, config, drift, golden, onnx};

/// Errors of the runtime library, with their sources kept.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    ModelFile(#[from] onnx::ModelFileError),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    Golden(#[from] golden::GoldenError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Profile(#[from] drift::ProfileError),
}
