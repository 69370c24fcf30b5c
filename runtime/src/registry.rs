//! The models this server serves, by name: those of the configuration, and those of the active
//! release (which take the place of configured models of the same name). What each slot serves
//! changes through load and unload; the set of slots changes when a release is activated.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::{ModelSpec, ShadowSettings, Source};
use crate::model::{LoadError, ModelSlot};
use crate::shadow::Shadow;

/// Every configured model, in configuration order.
pub struct Registry {
    /// The configured models.
    base: Vec<Arc<ModelSlot>>,
    /// What is served: the release's models, then the configured models it does not replace.
    slots: ArcSwap<Vec<Arc<ModelSlot>>>,
    /// The shadow candidates running, one per model at most, as the request path reads them.
    shadows: ArcSwap<Vec<Arc<Shadow>>>,
    /// Where they come from (changed under this lock, then published to `shadows`).
    shadow_sources: Mutex<ShadowSources>,
}

/// The shadows of the configuration (`[models.shadow]`) and of a candidate release, whose take
/// the place of a configured one of the same model.
#[derive(Default)]
struct ShadowSources {
    configured: Vec<Arc<Shadow>>,
    release: Option<CandidateRelease>,
}

/// A candidate release's models as staged, and the shadows of those that a serving model of the
/// same name has.
struct CandidateRelease {
    staged: Vec<Arc<ModelSlot>>,
    shadows: Vec<Arc<Shadow>>,
}

impl ShadowSources {
    fn running(&self) -> Vec<Arc<Shadow>> {
        let mut all: Vec<Arc<Shadow>> = self.release.as_ref().map(|r| r.shadows.clone()).unwrap_or_default();
        let configured: Vec<Arc<Shadow>> =
            self.configured.iter().filter(|c| !all.iter().any(|r| r.model == c.model)).cloned().collect();
        all.extend(configured);
        all
    }
}

impl Registry {
    /// Empty slots for the given models (nothing loaded yet).
    pub fn new(specs: Vec<ModelSpec>) -> Registry {
        let base: Vec<Arc<ModelSlot>> = specs.into_iter().map(|s| Arc::new(ModelSlot::new(s))).collect();
        Registry {
            slots: ArcSwap::from_pointee(base.clone()),
            base,
            shadows: ArcSwap::from_pointee(Vec::new()),
            shadow_sources: Mutex::default(),
        }
    }

    /// The slot of a model.
    pub fn get(&self, name: &str) -> Option<Arc<ModelSlot>> {
        self.slots.load().iter().find(|s| s.spec.name == name).cloned()
    }

    /// The shadow candidate of a model, when one is loaded.
    pub fn shadow(&self, model: &str) -> Option<Arc<Shadow>> {
        self.shadows.load().iter().find(|s| s.model == model).cloned()
    }

    /// Every shadow candidate loaded.
    pub fn shadows(&self) -> Arc<Vec<Arc<Shadow>>> {
        self.shadows.load_full()
    }

    /// All slots served now: the release's, then the configured ones.
    pub fn slots(&self) -> Arc<Vec<Arc<ModelSlot>>> {
        self.slots.load_full()
    }

    /// Serves a release's (loaded) models in place of the previous release's, at once; a
    /// configured model of the same name steps aside. Requests already holding a version of a
    /// replaced slot finish on it.
    pub fn set_release(&self, release: Vec<Arc<ModelSlot>>) {
        let mut next = release;
        let kept: Vec<Arc<ModelSlot>> =
            self.base.iter().filter(|b| !next.iter().any(|r| r.spec.name == b.spec.name)).cloned().collect();
        next.extend(kept);
        self.slots.store(Arc::new(next));
    }

    /// Loads every model, on as many threads as there are models (loading is CPU-bound and
    /// independent), then the shadow candidates not loaded yet of the models that loaded.
    /// Returns the failures.
    pub fn load_all(&self) -> Vec<LoadError> {
        let mut failures = self.load_slots();
        failures.extend(self.load_shadows());
        failures
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, ShadowSources> {
        self.shadow_sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn load_shadows(&self) -> Vec<LoadError> {
        let mut sources = self.sources();
        let mut failures = Vec::new();
        for slot in self.slots().iter() {
            let Some(settings) = &slot.spec.shadow else { continue };
            let Some(active) = slot.version(None) else { continue };
            if sources.configured.iter().any(|s| s.model == slot.spec.name) {
                continue;
            }
            match Shadow::load(&slot.spec, settings, &active.signature.inputs) {
                Ok(shadow) => {
                    tracing::info!(model = %slot.spec.name, candidate = %settings.version, share = settings.share, "shadow candidate ready");
                    sources.configured.push(Arc::new(shadow));
                }
                Err(e) => {
                    tracing::error!(model = %slot.spec.name, error = %e, "shadow candidate not loaded; the model serves without it");
                    failures.push(e);
                }
            }
        }
        self.shadows.store(Arc::new(sources.running()));
        failures
    }

    /// Runs a candidate release's (loaded) models as shadows of the serving models of the same
    /// names, in place of any candidate release before it; a model the serving set does not have
    /// waits for promotion with nothing to compare. The sampling bounds are the serving model's
    /// `[models.shadow]` ones, else the defaults. An error when a candidate does not take its
    /// model's inputs (nothing changes then).
    pub fn set_candidates(&self, staged: Vec<Arc<ModelSlot>>) -> Result<(), String> {
        let mut shadows = Vec::new();
        for candidate in &staged {
            let name = &candidate.spec.name;
            let (Some(slot), Some(served)) = (self.get(name), candidate.version(None)) else { continue };
            let Some(active) = slot.version(None) else { continue };
            let path = match &candidate.spec.source {
                Source::File { path, .. } | Source::Directory { path, .. } => path.clone(),
            };
            let settings = ShadowSettings::for_candidate(path, served.version.clone(), slot.spec.shadow.as_ref());
            let shadow = Shadow::attach(name, candidate.clone(), &settings, &active.signature.inputs)
                .map_err(|reason| format!("model `{name}`: the candidate cannot shadow the serving model: {reason}"))?;
            tracing::info!(model = %name, candidate = %settings.version, share = settings.share, "candidate release model runs as a shadow");
            shadows.push(Arc::new(shadow));
        }
        let mut sources = self.sources();
        sources.release = Some(CandidateRelease { staged, shadows });
        self.shadows.store(Arc::new(sources.running()));
        Ok(())
    }

    /// Stops the candidate release's shadows and hands its models back, if there is one.
    pub fn take_candidates(&self) -> Option<Vec<Arc<ModelSlot>>> {
        let mut sources = self.sources();
        let taken = sources.release.take().map(|r| r.staged);
        self.shadows.store(Arc::new(sources.running()));
        taken
    }

    fn load_slots(&self) -> Vec<LoadError> {
        // Loading starts background work (draining hard examples) on the caller's runtime.
        let runtime = tokio::runtime::Handle::try_current().ok();
        let slots = self.slots();
        std::thread::scope(|scope| {
            let handles: Vec<_> = slots
                .iter()
                .map(|slot| {
                    let runtime = runtime.clone();
                    scope.spawn(move || {
                        let _entered = runtime.as_ref().map(|r| r.enter());
                        slot.load()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        })
    }

    /// Ready when every configured model is loaded and has passed its warm-up.
    pub fn is_ready(&self) -> bool {
        self.slots.load().iter().all(|s| s.is_ready())
    }
}
