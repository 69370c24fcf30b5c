//! The models this server is configured with, by name. The set is fixed at start; what each slot
//! serves changes through load, unload and (later) updates.

use std::sync::Arc;

use crate::config::ModelSpec;
use crate::model::{LoadError, ModelSlot};

/// Every configured model, in configuration order.
pub struct Registry {
    slots: Vec<Arc<ModelSlot>>,
}

impl Registry {
    /// Empty slots for the given models (nothing loaded yet).
    pub fn new(specs: Vec<ModelSpec>) -> Registry {
        Registry { slots: specs.into_iter().map(|s| Arc::new(ModelSlot::new(s))).collect() }
    }

    /// The slot of a model.
    pub fn get(&self, name: &str) -> Option<&Arc<ModelSlot>> {
        self.slots.iter().find(|s| s.spec.name == name)
    }

    /// All slots in configuration order.
    pub fn slots(&self) -> &[Arc<ModelSlot>] {
        &self.slots
    }

    /// Loads every model, on as many threads as there are models (loading is CPU-bound and
    /// independent). Returns the failures.
    pub fn load_all(&self) -> Vec<LoadError> {
        // Loading starts background work (draining hard examples) on the caller's runtime.
        let runtime = tokio::runtime::Handle::try_current().ok();
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .slots
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
        self.slots.iter().all(|s| s.is_ready())
    }
}
