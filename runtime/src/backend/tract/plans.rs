//! Plans per concrete input shape, for models whose symbolic dimensions tract cannot analyse
//! all at once: the declared shapes, prepared at load and kept, and a bounded cache of the others,
//! prepared on first use and evicted least recently used first.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tract_onnx::prelude::{
    InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, TractResult, TypedRunnableModel,
};
use tract_onnx::tract_core::ops::konst::Const;

use crate::backend::session::{BackendError, OTHER_BACKEND, PlanStats, Specialised};
use crate::backend::tract::datum::datum_type;
use crate::backend::tract::max_pool;
use crate::backend::tract::quantize_linear;
use crate::backend::tract::small_conv;
use crate::onnx::Signature;

/// A plan for one set of concrete input shapes.
fn concrete_plan(
    model: &InferenceModel,
    signature: &Signature,
    shapes: &[Vec<usize>],
) -> TractResult<Arc<TypedRunnableModel>> {
    let mut model = model.clone();
    for (i, (spec, dims)) in signature.inputs.iter().zip(shapes).enumerate() {
        model.set_input_fact(i, InferenceFact::dt_shape(datum_type(spec.datatype), dims.as_slice()))?;
    }
    optimised_plan(model)
}

/// tract's optimised plan for `model`, with Outpost's operators where tract's own are slow (see
/// [`small_conv`], which takes tract's operator before tract lowers it, [`quantize_linear`] and
/// [`max_pool`]).
pub(crate) fn optimised_plan(model: InferenceModel) -> TractResult<Arc<TypedRunnableModel>> {
    let mut model = model.into_typed()?.into_decluttered()?;
    small_conv::replace(&mut model)?;
    model.optimize()?;
    quantize_linear::vectorise(&mut model)?;
    max_pool::replace(&mut model)?;
    model.into_runnable()
}

/// Plans per concrete input shapes: the declared ones, kept for the session's life, and up to
/// `capacity` others, the least recently used evicted first.
pub(crate) struct Plans {
    model: InferenceModel,
    signature: Signature,
    capacity: usize,
    state: Mutex<PlanCache>,
    /// Held while a plan is prepared, so that two workers never prepare the same shape twice
    /// and lookups of prepared shapes never wait on a preparation.
    preparing: Mutex<()>,
}

#[derive(Default)]
struct PlanCache {
    declared: Vec<(Vec<Vec<usize>>, CachedPlan)>,
    /// Most recently used last.
    recent: Vec<(Vec<Vec<usize>>, CachedPlan)>,
    prepared: u64,
    evicted: u64,
    prepare_ms: u64,
    specialised: Vec<Specialised>,
}

#[derive(Clone)]
pub(crate) struct CachedPlan {
    pub(crate) plan: Arc<TypedRunnableModel>,
    bytes: u64,
}

impl Plans {
    pub(crate) fn new(model: InferenceModel, signature: Signature, capacity: usize) -> Plans {
        Plans { model, signature, capacity, state: Mutex::new(PlanCache::default()), preparing: Mutex::new(()) }
    }

    fn cache(&self) -> MutexGuard<'_, PlanCache> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn lookup(&self, shapes: &[Vec<usize>]) -> Option<Arc<TypedRunnableModel>> {
        let mut cache = self.cache();
        if let Some((_, p)) = cache.declared.iter().find(|(s, _)| s == shapes) {
            return Some(p.plan.clone());
        }
        let i = cache.recent.iter().position(|(s, _)| s == shapes)?;
        let entry = cache.recent.remove(i);
        let plan = entry.1.plan.clone();
        cache.recent.push(entry);
        Some(plan)
    }

    pub(crate) fn prepare(
        &self,
        shapes: &[Vec<usize>],
        declared: bool,
    ) -> Result<Arc<TypedRunnableModel>, BackendError> {
        let _one_at_a_time = self.preparing.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(plan) = self.lookup(shapes) {
            return Ok(plan);
        }
        let entry = self.build(shapes)?;
        let plan = entry.plan.clone();
        self.insert(shapes, entry, declared);
        Ok(plan)
    }

    /// Records a plan for concrete shapes measured against the plan for every shape, and holds
    /// it as a declared plan when it was kept.
    pub(crate) fn specialised(&self, specialised: Specialised, plan: CachedPlan) {
        if specialised.kept {
            self.insert(&specialised.shapes, plan, true);
        }
        self.cache().specialised.push(specialised);
    }

    /// Prepares a plan for `shapes`, counted and logged, not yet held.
    pub(crate) fn build(&self, shapes: &[Vec<usize>]) -> Result<CachedPlan, BackendError> {
        let started = Instant::now();
        let plan = concrete_plan(&self.model, &self.signature, shapes).map_err(|e| {
            BackendError::Run(format!(
                "tract could not prepare the model for input shapes {shapes:?}: {e:#}{OTHER_BACKEND}"
            ))
        })?;
        let elapsed = started.elapsed();
        let entry = CachedPlan { bytes: constant_bytes(&plan), plan };
        tracing::info!(shapes = ?shapes, prepare_ms = elapsed.as_millis() as u64, plan_bytes = entry.bytes, "prepared a plan for new input shapes");
        let mut cache = self.cache();
        cache.prepared += 1;
        cache.prepare_ms += elapsed.as_millis() as u64;
        Ok(entry)
    }

    fn insert(&self, shapes: &[Vec<usize>], entry: CachedPlan, declared: bool) {
        let mut cache = self.cache();
        if declared {
            cache.declared.push((shapes.to_vec(), entry));
        } else {
            if cache.recent.len() >= self.capacity {
                cache.recent.remove(0);
                cache.evicted += 1;
            }
            cache.recent.push((shapes.to_vec(), entry));
        }
    }

    pub(crate) fn stats(&self) -> PlanStats {
        let cache = self.cache();
        let held = cache.declared.iter().chain(&cache.recent);
        PlanStats {
            symbolic: false,
            plans: cache.declared.len() + cache.recent.len(),
            bytes: held.map(|(_, p)| p.bytes).sum(),
            prepared: cache.prepared,
            evicted: cache.evicted,
            prepare_ms: cache.prepare_ms,
            specialised: cache.specialised.clone(),
        }
    }
}

/// Bytes of a plan's constants: its weights as tract holds them after optimisation (packed for
/// its kernels, which the facts' buffer sizes count).
fn constant_bytes(plan: &TypedRunnableModel) -> u64 {
    plan.model()
        .nodes()
        .iter()
        .filter(|n| n.op_is::<Const>())
        .filter_map(|n| n.outputs.first()?.fact.mem_size().to_i64().ok())
        .map(|bytes| bytes.max(0) as u64)
        .sum()
}
