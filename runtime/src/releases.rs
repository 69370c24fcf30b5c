//! Signed releases in the runtime: the runtime's side of `outpost-updater`'s [`ModelHost`]
//! (stage = load, warm up and golden-check beside what serves; activate = swap the slots), and
//! the daemon's update service (the store, opened and locked for the daemon's life).

use std::path::Path;
use std::sync::{Arc, Mutex};

use outpost_updater::apply::{Applied, Updater};
use outpost_updater::host::{ModelHost, StageError, StageStep, StagedModel, staged_models};
use outpost_updater::release::Target;
use outpost_updater::store::{Store, StoreBusy};
use outpost_updater::{Refusal, envelope::Envelope};
use serde_json::{Value, json};

use crate::config::{Config, ModelConfig, ModelSpec, UpdatesConfig};
use crate::error::Error;
use crate::model::{LoadError, ModelSlot};
use crate::registry::Registry;

/// Stages release models beside the serving ones, and makes them the registry's release.
pub struct RuntimeHost {
    registry: Arc<Registry>,
}

/// The runtime's model specs for a release's models (their config keys are the `[[models]]`
/// keys; name, path, version, golden and profile come from the release).
pub fn release_specs(models: &[StagedModel]) -> Result<Vec<ModelSpec>, StageError> {
    let mut configs = Vec::new();
    for m in models {
        let mut obj = m.config.clone();
        obj.insert("name".into(), json!(m.name));
        obj.insert("path".into(), json!(m.model));
        obj.insert("version".into(), json!(m.version));
        if let Some(g) = &m.golden {
            obj.insert("golden".into(), json!(g));
        }
        if let Some(p) = &m.profile {
            obj.insert("profile".into(), json!(p));
        }
        let config: ModelConfig =
            serde_json::from_value(Value::Object(obj)).map_err(|e| StageError::new(&m.name, StageStep::Config, e))?;
        configs.push(config);
    }
    let config = Config { models: configs, ..Config::default() };
    config.validate().map(|v| v.models).map_err(|e| {
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        StageError::new(names.join(", "), StageStep::Config, e)
    })
}

/// The updater's view of a model that did not load: which step, with the runtime's error.
fn stage_error(e: LoadError) -> StageError {
    match e {
        LoadError::Versions { name, reason } => StageError::new(name, StageStep::Load, reason),
        LoadError::Version { name, version, source } => {
            let step = match &source {
                Error::Golden(_) => StageStep::Golden,
                Error::Config(_) => StageStep::Config,
                Error::ModelFile(_) | Error::Backend(_) | Error::Profile(_) => StageStep::Load,
            };
            StageError::new(name, step, source).of_version(version)
        }
    }
}

impl ModelHost for RuntimeHost {
    type Staged = Vec<Arc<ModelSlot>>;

    fn stage(&self, models: &[StagedModel]) -> Result<Self::Staged, StageError> {
        let specs = release_specs(models)?;
        let slots: Vec<Arc<ModelSlot>> = specs.into_iter().map(|s| Arc::new(ModelSlot::new(s))).collect();
        for slot in &slots {
            // An untrusted model that makes the backend panic (a hostile graph) is refused like
            // one that fails its golden check; the serving release is untouched.
            let failures = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| slot.load())).map_err(|panic| {
                StageError::new(&slot.spec.name, StageStep::Panic, outpost_updater::panic_message(&*panic))
            })?;
            if let Some(first) = failures.into_iter().next() {
                // Dropping the staged slots stops their workers: nothing else saw them.
                return Err(stage_error(first));
            }
        }
        Ok(slots)
    }

    fn activate(&self, staged: Self::Staged) {
        let names: Vec<&str> = staged.iter().map(|s| s.spec.name.as_str()).collect();
        tracing::info!(models = ?names, "release models serving");
        self.registry.set_release(staged);
    }

    fn shadow(&self, staged: Self::Staged) -> Result<(), StageError> {
        let names: Vec<String> = staged.iter().map(|s| s.spec.name.clone()).collect();
        self.registry
            .set_candidates(staged)
            .map_err(|reason| StageError::new(names.join(", "), StageStep::Load, reason))
    }

    fn take_shadow(&self) -> Option<Self::Staged> {
        self.registry.take_candidates()
    }
}

/// The update service of one process: the locked store and the runtime it stages into.
pub struct ReleaseService {
    updater: Mutex<Updater>,
    host: RuntimeHost,
}

/// Why the update service could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Busy(#[from] StoreBusy),
    #[error("{0}")]
    Refused(#[from] Refusal),
}

impl ReleaseService {
    /// Opens and locks the store; releases it applies serve from `registry`.
    pub fn open(config: &UpdatesConfig, registry: &Arc<Registry>) -> Result<Arc<ReleaseService>, OpenError> {
        let store = Store::open(&config.state_dir)?;
        let target = Target { fleet: config.fleet.clone(), group: config.group.clone() };
        Ok(Arc::new(ReleaseService {
            updater: Mutex::new(Updater { store, target }),
            host: RuntimeHost { registry: registry.clone() },
        }))
    }

    fn updater(&self) -> std::sync::MutexGuard<'_, Updater> {
        self.updater.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks the active release's blobs (falling back to the previous release when they are
    /// damaged) without loading anything. Returns what was found.
    pub fn check_store(&self) -> Result<Option<String>, String> {
        self.updater().store.check_at_start().map(|c| c.fell_back).map_err(|e| e.to_string())
    }

    /// At start: checks the active release's blobs (falling back to the previous release when
    /// they are damaged) and serves its models. Returns what was found, for the log.
    pub fn serve_active(&self) -> Result<Option<String>, String> {
        let updater = self.updater();
        let check = updater.store.check_at_start().map_err(|e| e.to_string())?;
        if let Some((sha, doc)) = check.active {
            let staged = self
                .host
                .stage(&staged_models(&updater.store, &doc))
                .map_err(|e| format!("release {} ({}) does not load: {e}", doc.number, outpost_updater::short(&sha)))?;
            self.host.activate(staged);
            tracing::info!(number = doc.number, release = outpost_updater::short(&sha), "serving the active release");
        }
        match updater.restore_candidate(&self.host) {
            Ok(Some(said)) => tracing::info!("{said}"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "the candidate release is not staged"),
        }
        Ok(check.fell_back)
    }

    /// Runs `f` with the updater (one caller at a time).
    pub fn with_updater<R>(&self, f: impl FnOnce(&Updater) -> R) -> R {
        f(&self.updater())
    }

    /// Provisions the first trusted root.
    pub fn provision(&self, root: &Path) -> Result<String, Refusal> {
        let bytes = std::fs::read(root).map_err(|e| {
            Refusal::new(outpost_updater::error::RefusalKind::Missing, format!("{}: {e}", root.display()))
        })?;
        let updater = self.updater();
        let root = updater.store.provision(&Envelope::parse(&bytes)?, &updater.target.fleet)?;
        Ok(format!("trusting root version {} of fleet {}", root.doc.version, root.doc.fleet))
    }

    /// Applies a release directory (one update at a time).
    pub fn apply(&self, dir: &Path) -> Result<Applied, Refusal> {
        self.updater().apply_dir(dir, &self.host)
    }

    /// Verifies and stages a release directory as the candidate: its models run as shadows
    /// of the serving ones until [`ReleaseService::promote`] or [`ReleaseService::drop_candidate`].
    pub fn stage_candidate(&self, dir: &Path) -> Result<Applied, Refusal> {
        self.updater().stage_candidate_dir(dir, &self.host)
    }

    /// Activates the candidate release.
    pub fn promote(&self) -> Result<Applied, Refusal> {
        self.updater().promote(&self.host)
    }

    /// Drops the candidate release; returns its number.
    pub fn drop_candidate(&self) -> Result<u64, Refusal> {
        self.updater().drop_candidate(&self.host)
    }

    /// Activates the previous release in place of the active one (once; see
    /// [`outpost_updater::revert`]).
    pub fn revert(&self) -> Result<Applied, Refusal> {
        self.updater().revert(&self.host)
    }

    /// The trusted state and the last update's outcome.
    pub fn status(&self) -> Value {
        let updater = self.updater();
        let store = &updater.store;
        let current = store.current().ok().flatten();
        let summary = |sha: Option<&String>| {
            let d = store.release(sha?).ok()?;
            let models: Vec<Value> = d.models.iter().map(|m| json!({"name": m.name, "version": m.version})).collect();
            Some(json!({"number": d.number, "models": models}))
        };
        let last =
            std::fs::read(store.dir().join("status.json")).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        json!({
            "fleet": updater.target.fleet,
            "group": updater.target.group,
            "provisioned": current.is_some(),
            "active": summary(current.as_ref().and_then(|c| c.active.as_ref())),
            // What `outpost update revert` returns to.
            "previous": summary(current.as_ref().and_then(|c| c.previous.as_ref())),
            "candidate": summary(current.as_ref().and_then(|c| c.candidate.as_ref())),
            "last_number": current.as_ref().and_then(|c| c.last_number),
            "last_update": last,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use outpost_updater::host::{ModelHost, StageStep, StagedModel};

    use super::RuntimeHost;
    use crate::registry::Registry;

    fn staged(model: &str, golden: &str, config: serde_json::Value) -> StagedModel {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        StagedModel {
            name: "m".into(),
            version: "7".into(),
            model: dir.join(model),
            golden: Some(dir.join(golden)),
            profile: None,
            config: config.as_object().unwrap().clone(),
        }
    }

    fn stage_error(m: StagedModel) -> outpost_updater::host::StageError {
        let host = RuntimeHost { registry: Arc::new(Registry::new(Vec::new())) };
        host.stage(&[m]).err().expect("staging fails")
    }

    #[test]
    fn a_failed_stage_keeps_its_step_and_the_runtimes_error() {
        let e = stage_error(staged("digits-edge.onnx", "digits-central.golden.json", serde_json::json!({})));
        assert_eq!((e.model.as_str(), e.version.as_deref(), e.step), ("m", Some("7"), StageStep::Golden), "{e}");
        let source = e.source.downcast_ref::<crate::error::Error>().expect("the runtime's error");
        assert!(matches!(source, crate::error::Error::Golden(_)), "{source:?}");

        let e = stage_error(staged("digits-test.csv", "digits-edge.golden.json", serde_json::json!({})));
        assert_eq!(e.step, StageStep::Load, "{e}");

        let e =
            stage_error(staged("digits-edge.onnx", "digits-edge.golden.json", serde_json::json!({"queue_bound": "x"})));
        assert_eq!(e.step, StageStep::Config, "{e}");
        assert!(e.to_string().starts_with("model `m`: configuration: "), "{e}");
    }

    #[test]
    fn a_release_profile_turns_drift_on_and_one_that_does_not_fit_fails_the_stage() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let dir = std::env::temp_dir().join(format!("outpost-release-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A profile built from the golden inputs (16 rows) on tract.
        let golden = crate::golden::Golden::read(&models.join("digits-edge.golden.json")).unwrap();
        let inputs: Vec<_> = golden.inputs.iter().map(|t| t.to_tensor().unwrap()).collect();
        let session = crate::backend::load(
            &*crate::backend::by_name("tract").unwrap(),
            &models.join("digits-edge.onnx"),
            &Default::default(),
        )
        .unwrap();
        let outputs = session.run(&inputs).unwrap();
        let profile = crate::drift::Profile::build(session.signature(), &[(inputs, outputs)]).unwrap();
        assert_eq!(profile.rows, 16);
        let good = dir.join("good.json");
        std::fs::write(&good, serde_json::to_vec(&profile).unwrap()).unwrap();

        let host = RuntimeHost { registry: Arc::new(Registry::new(Vec::new())) };
        let with = |p: &Path| StagedModel {
            profile: Some(p.to_owned()),
            ..staged("digits-edge.onnx", "digits-edge.golden.json", serde_json::json!({"drift": {"window": 50}}))
        };
        let slots = host.stage(&[with(&good)]).expect("stages");
        let served = slots[0].served();
        let drift = served[0].drift.as_ref().expect("drift on").report();
        assert_eq!((drift.window, drift.rows), (50, 0));

        // A golden file is not a profile: refused at load, naming the file.
        let e = stage_error(with(&models.join("digits-edge.golden.json")));
        assert_eq!(e.step, StageStep::Load, "{e}");
        assert!(
            e.to_string().contains("reference profile") && e.to_string().contains("digits-edge.golden.json"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
