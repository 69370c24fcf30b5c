//! The seam between the updater and the runtime it updates: the models of a release as the
//! runtime gets them to stage, what the updater needs from the runtime, and why staging failed.

use std::error::Error;
use std::fmt;
use std::path::PathBuf;

use crate::release::ReleaseDoc;
use crate::store::Store;

/// A model of a release, as the runtime gets it to stage.
#[derive(Clone, Debug)]
pub struct StagedModel {
    pub name: String,
    pub version: String,
    pub model: PathBuf,
    pub golden: Option<PathBuf>,
    /// The reference profile drift is measured against, when the release ships one.
    pub profile: Option<PathBuf>,
    pub config: serde_json::Map<String, serde_json::Value>,
}

/// What the updater needs from the runtime. Staging loads and checks models beside what serves
/// (nothing served changes); activation swaps them in at once; dropping a staged set rolls it
/// back.
pub trait ModelHost {
    type Staged;
    /// Load, warm up and run the golden inputs of every model; the first failure when any fails.
    fn stage(&self, models: &[StagedModel]) -> Result<Self::Staged, StageError>;
    /// Serve the staged models in place of the previous release's.
    fn activate(&self, staged: Self::Staged);
    /// Run the staged models beside the serving ones as shadow candidates, in place of any
    /// before them (nothing served changes); an error when they cannot shadow what serves.
    fn shadow(&self, staged: Self::Staged) -> Result<(), StageError>;
    /// Stop the shadow candidates and hand them back (to activate them), if there are any.
    fn take_shadow(&self) -> Option<Self::Staged>;
}

/// Which step of staging a model failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageStep {
    /// The release's settings for the model are not a valid model configuration.
    Config,
    /// The model file could not be read or loaded by the backend, or failed its warm-up.
    Load,
    /// The model loaded but its outputs on the golden inputs are not the golden outputs.
    Golden,
    /// The backend panicked on the model (a hostile or broken graph).
    Panic,
}

impl fmt::Display for StageStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StageStep::Config => "configuration",
            StageStep::Load => "load",
            StageStep::Golden => "golden check",
            StageStep::Panic => "backend panic",
        })
    }
}

/// Why a release's models cannot serve: the model, the step, and the runtime's own error as
/// the source (so a caller can tell a golden mismatch from a file the backend refused).
#[derive(Debug, thiserror::Error)]
#[error("model `{model}`{}: {step}: {source}", .version.as_ref().map(|v| format!(" version `{v}`")).unwrap_or_default())]
pub struct StageError {
    pub model: String,
    pub version: Option<String>,
    pub step: StageStep,
    #[source]
    pub source: Box<dyn Error + Send + Sync + 'static>,
}

impl StageError {
    pub fn new(
        model: impl Into<String>,
        step: StageStep,
        source: impl Into<Box<dyn Error + Send + Sync>>,
    ) -> StageError {
        StageError { model: model.into(), version: None, step, source: source.into() }
    }

    pub fn of_version(mut self, version: impl Into<String>) -> StageError {
        self.version = Some(version.into());
        self
    }
}

/// The staged models of a stored release (paths into the store).
pub fn staged_models(store: &Store, doc: &ReleaseDoc) -> Vec<StagedModel> {
    doc.models
        .iter()
        .map(|m| StagedModel {
            name: m.name.clone(),
            version: m.version.clone(),
            model: store.blob_path(&m.blob.sha256),
            golden: m.golden.as_ref().map(|g| store.blob_path(&g.sha256)),
            profile: m.profile.as_ref().map(|p| store.blob_path(&p.sha256)),
            config: m.config.clone(),
        })
        .collect()
}
