//! A configured model: the versions it serves now, each a prepared session behind a bounded
//! queue and its worker threads.
//!
//! The request path never waits on a lock here: the served versions are read through an
//! `ArcSwap`, and a full queue answers at once. Loading (start, the repository API, SIGHUP)
//! prepares and warms new versions beside the ones serving, then swaps the whole set in one
//! store. A request holds the version it started on; when the last holder lets go, the old
//! version's queue closes, its workers finish what they took and exit, and its session is freed.
//! A version that fails to load or warm up never replaces the one serving.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::backend::{self, BackendError, PlanStats, ProviderChoice, Session, SessionOptions, Signature};
use crate::batch_choice::{self, BatchChoice};
use crate::batcher::{self, Reply};
use crate::choice::BackendChoice;
use crate::config::ModelSpec;
use crate::drift::{Drift, Profile};
use crate::escalation::Escalator;
use crate::executor::{self, Executor, ExecutorInfo, NotRun};
use crate::onnx::ModelGraph;
use crate::repository::{self, Fingerprint, VersionFiles};
use crate::stats::ModelStats;
use crate::tensor::Tensor;
use crate::threads::ThreadChoice;
use crate::warm_up::{Warm, warm_up};

/// Where a model or version is in its life, as the repository index shows it.
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

/// One configured model (by name) and the versions it serves.
pub struct ModelSlot {
    pub spec: ModelSpec,
    served: ArcSwap<Vec<Arc<ServedVersion>>>,
    status: Mutex<Status>,
    /// Statistics per version, kept across reloads of the same version.
    stats: Mutex<BTreeMap<String, Arc<ModelStats>>>,
    /// Serialises loads and unloads of this model (the cold path).
    changing: Mutex<()>,
    /// Escalation to the central model, when configured (started at the first load).
    escalator: OnceLock<Arc<Escalator>>,
}

#[derive(Default)]
struct Status {
    loading: bool,
    unloaded: bool,
    /// The last failure per version (or for the model as a whole, under ""), cleared on success.
    failures: BTreeMap<String, String>,
}

/// A version being served.
pub struct ServedVersion {
    pub version: String,
    pub files: VersionFiles,
    fingerprint: Fingerprint,
    pub stats: Arc<ModelStats>,
    pub signature: Signature,
    pub backend: &'static str,
    /// Why this backend (`backend = "auto"`: measured, or the only one that serves the model).
    pub backend_choice: BackendChoice,
    /// The execution provider, for backends that have them.
    pub provider: Option<ProviderChoice>,
    /// The threads one inference gets, for backends with a pool.
    pub threads: Option<ThreadChoice>,
    /// Drift against the version's reference profile, when it has one.
    pub drift: Option<Drift>,
    /// The declared input shapes, resolved against the model (signature order).
    pub shapes: Vec<Vec<Vec<usize>>>,
    /// Where its backend calls run, and why.
    pub executor: ExecutorInfo,
    /// Whether it batches, where batching is configured, and why.
    pub batching: Option<BatchChoice>,
    session: Arc<dyn Session>,
    run: Executor,
}

/// Why a model or one of its versions could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model `{name}`: {reason}")]
    Versions { name: String, reason: String },
    #[error("model `{name}` version {version}: {source}")]
    Version { name: String, version: String, source: crate::error::Error },
}

/// One line of the repository index.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexEntry {
    pub version: Option<String>,
    pub state: ModelState,
}

impl ModelSlot {
    /// An empty slot (nothing served yet, state `LOADING`).
    pub fn new(spec: ModelSpec) -> ModelSlot {
        ModelSlot {
            spec,
            served: ArcSwap::from_pointee(Vec::new()),
            status: Mutex::new(Status { loading: true, ..Status::default() }),
            stats: Mutex::default(),
            changing: Mutex::new(()),
            escalator: OnceLock::new(),
        }
    }

    /// Escalation to the central model, when configured and started.
    pub fn escalator(&self) -> Option<&Arc<Escalator>> {
        self.escalator.get()
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The versions served now, lowest first.
    pub fn served(&self) -> Arc<Vec<Arc<ServedVersion>>> {
        self.served.load_full()
    }

    /// The version a request names, or the highest one served.
    pub fn version(&self, version: Option<&str>) -> Option<Arc<ServedVersion>> {
        let served = self.served.load();
        match version {
            None => served.last().cloned(),
            Some(v) => served.iter().find(|s| s.version == v).cloned(),
        }
    }

    /// Whether the model serves at least one version with a worker running.
    pub fn is_ready(&self) -> bool {
        self.served.load().iter().any(|v| v.stats.workers.load(Relaxed) > 0)
    }

    /// The model's state as one word and, when unavailable, why.
    pub fn state(&self) -> ModelState {
        if self.is_ready() {
            return ModelState::Ready;
        }
        if !self.served.load().is_empty() {
            return ModelState::Unavailable("no inference worker is running".into());
        }
        let status = self.status();
        if status.loading {
            ModelState::Loading
        } else if status.unloaded {
            ModelState::Unavailable("unloaded".into())
        } else {
            ModelState::Unavailable(status.failures.values().next().cloned().unwrap_or_else(|| "not loaded".into()))
        }
    }

    /// The repository index lines: each version served, and each that failed and is not served.
    pub fn index(&self) -> Vec<IndexEntry> {
        let served = self.served();
        let mut entries: Vec<IndexEntry> =
            served.iter().map(|s| IndexEntry { version: Some(s.version.clone()), state: ModelState::Ready }).collect();
        let status = self.status();
        for (version, reason) in &status.failures {
            if version.is_empty() || !served.iter().any(|s| &s.version == version) {
                let version = (!version.is_empty()).then(|| version.clone());
                entries.push(IndexEntry { version, state: ModelState::Unavailable(reason.clone()) });
            }
        }
        drop(status);
        if entries.is_empty() {
            entries.push(IndexEntry { version: None, state: self.state() });
        }
        entries
    }

    /// How many versions (or the model as a whole) failed their last load.
    pub fn failures(&self) -> usize {
        self.status().failures.len()
    }

    /// Statistics of every version seen, by version.
    pub fn stats(&self) -> BTreeMap<String, Arc<ModelStats>> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn stats_for(&self, version: &str) -> Arc<ModelStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).entry(version.to_owned()).or_default().clone()
    }

    /// Brings the served versions in line with the model's source: loads and warms new or
    /// changed versions beside the serving ones, then swaps the set at once; drops versions the
    /// source no longer names. A version that fails keeps its previous session serving, if it
    /// had one. Returns the failures.
    pub fn load(&self) -> Vec<LoadError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let name = &self.spec.name;
        if let Some(config) = &self.spec.escalation
            && self.escalator.get().is_none()
        {
            match Escalator::start(config) {
                Ok(e) => {
                    let _ = self.escalator.set(e);
                }
                Err(io) => {
                    let reason = format!("cannot start escalation: {io}");
                    let mut status = self.status();
                    status.loading = false;
                    status.failures.insert(String::new(), reason.clone());
                    return vec![LoadError::Versions { name: name.clone(), reason }];
                }
            }
        }
        let wanted = match repository::versions(&self.spec) {
            Ok(v) => v,
            Err(reason) => {
                let mut status = self.status();
                status.loading = false;
                status.failures.insert(String::new(), reason.clone());
                tracing::error!(model = %name, error = %reason, "model not loaded");
                return vec![LoadError::Versions { name: name.clone(), reason }];
            }
        };
        let current = self.served();
        let mut next: Vec<Arc<ServedVersion>> = Vec::with_capacity(wanted.len());
        let mut failures = Vec::new();
        let mut reasons = BTreeMap::new();
        for files in wanted {
            let fingerprint = files.fingerprint();
            let existing = current.iter().find(|s| s.version == files.version);
            if let Some(s) = existing.filter(|s| s.fingerprint == fingerprint && s.files == files) {
                next.push(s.clone());
                continue;
            }
            let started = Instant::now();
            match prepare(&self.spec, &files) {
                Ok(p) => {
                    tracing::info!(
                        model = %name, version = %files.version, backend = p.backend,
                        provider = p.session.provider().map(|c| c.provider.as_str()),
                        golden_max_diff = p.golden_diff, load_ms = started.elapsed().as_millis() as u64,
                        "model version ready"
                    );
                    let stats = self.stats_for(&files.version);
                    next.push(Arc::new(ServedVersion::start(&self.spec, files, fingerprint, p, stats)));
                }
                Err(source) => {
                    let err = LoadError::Version { name: name.clone(), version: files.version.clone(), source };
                    tracing::error!(model = %name, version = %files.version, error = %err, kept_serving = existing.is_some(), "model version not loaded");
                    reasons.insert(files.version.clone(), err.to_string());
                    if let Some(s) = existing {
                        next.push(s.clone());
                    }
                    failures.push(err);
                }
            }
        }
        if !failures.is_empty() {
            // A version that failed never replaces what serves: keep every version serving now
            // that the new set would drop, until a load succeeds.
            for c in current.iter() {
                if !next.iter().any(|n| n.version == c.version) {
                    next.push(c.clone());
                }
            }
        }
        next.sort_by(|a, b| repository::version_order(&a.version).cmp(&repository::version_order(&b.version)));
        let removed: Vec<&str> =
            current.iter().filter(|c| !next.iter().any(|n| Arc::ptr_eq(c, n))).map(|c| c.version.as_str()).collect();
        if !removed.is_empty() {
            tracing::info!(model = %name, versions = ?removed, "replaced versions finish their in-flight requests, then close");
        }
        self.served.store(Arc::new(next));
        let mut status = self.status();
        *status = Status { loading: false, unloaded: false, failures: reasons };
        failures
    }

    /// Stops serving every version; requests already queued still finish.
    pub fn unload(&self) {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        self.served.store(Arc::new(Vec::new()));
        *self.status() = Status { loading: false, unloaded: true, failures: BTreeMap::new() };
        tracing::info!(model = %self.spec.name, "model unloaded");
    }
}

/// A session that passed its warm-up.
struct Prepared {
    session: Arc<dyn Session>,
    backend: &'static str,
    /// Largest difference from the golden outputs, when there were some.
    golden_diff: Option<f64>,
    /// The declared input shapes, resolved against the model (signature order).
    shapes: Vec<Vec<Vec<usize>>>,
    /// The input the warm-up ran, when it had one (for measuring the backend).
    probe: Option<Vec<Tensor>>,
    choice: BackendChoice,
    /// The threads one inference gets, for backends with a pool.
    threads: Option<ThreadChoice>,
    /// The reference profile, when one ships with the version.
    profile: Option<Profile>,
}

/// Parse, check and prepare on the configured backend, then warm up (the golden check). With
/// `backend = "auto"` (the default), on every backend the build has, and the fastest on the
/// model's warm-up input serves it (see [`crate::choice`]); a backend that refuses the model at
/// any step (an operator it lacks, a graph it cannot plan, a golden mismatch) is left out.
fn prepare(spec: &ModelSpec, files: &VersionFiles) -> Result<Prepared, crate::error::Error> {
    let graph = ModelGraph::read(&files.model)?;
    let profile = files.profile.as_deref().map(|p| Profile::read(p, &graph.signature)).transpose()?;
    let prepared = prepare_backend(spec, files, &graph)?;
    Ok(Prepared { profile, ..prepared })
}

fn prepare_backend(
    spec: &ModelSpec,
    files: &VersionFiles,
    graph: &ModelGraph,
) -> Result<Prepared, crate::error::Error> {
    if spec.backend != backend::AUTO {
        return prepare_on(&*backend::by_name(&spec.backend)?, spec, files, graph);
    }
    let mut served = Vec::new();
    let mut refusals = Vec::new();
    for name in backend::AUTO_ORDER {
        let attempt =
            backend::by_name(name).map_err(crate::error::Error::from).and_then(|b| prepare_on(&*b, spec, files, graph));
        match attempt {
            Ok(p) => served.push(p),
            Err(e) => refusals.push((*name, e)),
        }
    }
    if served.is_empty() {
        // The first backend's error as it is (its kind tells a caller which step failed); the
        // others' are logged.
        let mut refusals = refusals.into_iter();
        let Some((_, first)) = refusals.next() else {
            let none =
                || BackendError::Refused { path: files.model.clone(), reason: "no backend in this build".into() };
            return Err(backend::by_name(backend::FIRST_BACKEND).err().unwrap_or_else(none).into());
        };
        let others: Vec<String> = refusals.map(|(n, e)| format!("{n}: {e}")).collect();
        if !others.is_empty() {
            tracing::warn!(model = %spec.name, version = %files.version, refused = %others.join("; "), "backend auto: no backend serves this model");
        }
        return Err(first);
    }
    let sessions: Vec<(&'static str, &dyn Session)> = served.iter().map(|p| (p.backend, p.session.as_ref())).collect();
    let (best, choice) = crate::choice::choose(&sessions, served[0].probe.as_deref());
    let mut chosen = served.swap_remove(best);
    tracing::info!(
        model = %spec.name, version = %files.version, backend = chosen.backend, by = choice.by,
        p50_us = ?choice.p50_us, refused = %refusals.iter().map(|(n, e)| format!("{n}: {e}")).collect::<Vec<_>>().join("; "),
        "backend auto: serving on the fastest backend that serves the model"
    );
    chosen.choice = choice;
    Ok(chosen)
}

fn prepare_on(
    backend: &dyn backend::Backend,
    spec: &ModelSpec,
    files: &VersionFiles,
    graph: &ModelGraph,
) -> Result<Prepared, crate::error::Error> {
    let refused = |reason: String| BackendError::Refused { path: files.model.clone(), reason };
    let shapes = spec.shapes.resolve(&graph.signature).map_err(refused)?;
    let options = SessionOptions {
        intra_op_threads: spec.intra_op_threads,
        inter_op_threads: spec.inter_op_threads,
        providers: spec.providers.clone(),
        provider_options: spec.provider_options.clone(),
        instances: spec.workers,
        shapes: shapes.clone(),
        plan_cache: spec.shapes.plan_cache,
        fast_int8: spec.fast_int8,
    };
    backend.check(graph)?;
    if spec.batching.is_some() {
        batcher::check_batchable(graph).map_err(refused)?;
    }
    let warm = {
        let _loading = crate::choice::loading();
        warm_up(spec, files, &shapes, backend.prepare(graph, &options)?.into())?
    };
    let (warm, threads) = match spec.intra_op_threads {
        Some(n) if n > 1 && !backend.has_thread_pool() => {
            tracing::warn!(
                model = %spec.name, backend = backend.name(), intra_op_threads = n,
                "this build runs each call of this backend on one thread; intra_op_threads is ignored"
            );
            (warm, None)
        }
        _ if !backend.has_thread_pool() => (warm, None),
        Some(n) => (warm, Some(ThreadChoice::configured(n))),
        None => choose_threads(backend, spec, files, graph, &options, warm)?,
    };
    Ok(Prepared {
        session: warm.session,
        backend: backend.name(),
        golden_diff: warm.golden_diff,
        shapes,
        probe: warm.probe,
        choice: BackendChoice::configured(),
        threads,
        profile: None,
    })
}

/// The thread count for a backend with a pool when configuration names none (see
/// [`crate::threads`]): the warm session has the default pool; a one-thread session (the same
/// prepared model where the backend can share it, else a new one) is measured on the warm-up
/// input, and a long call on the pool too where the pool may lose; the one-thread session
/// replaces the warm one unless the pool is chosen. Only on the CPU: an accelerator's provider
/// does the work itself, and some (TensorRT) take minutes to build.
fn choose_threads(
    backend: &dyn backend::Backend,
    spec: &ModelSpec,
    files: &VersionFiles,
    graph: &ModelGraph,
    options: &SessionOptions,
    warm: Warm,
) -> Result<(Warm, Option<ThreadChoice>), crate::error::Error> {
    let pool = crate::threads::available();
    let on_cpu = warm.session.provider().is_none_or(|p| p.provider == "cpu");
    let Some(probe) = warm.probe.as_deref().filter(|_| on_cpu && pool > 1) else {
        let choice = if pool > 1 { None } else { Some(ThreadChoice::one_cpu()) };
        return Ok((warm, choice));
    };
    let one: Arc<dyn Session> = match warm.session.on_threads(1) {
        Some(shared) => shared.into(),
        None => {
            let _loading = crate::choice::loading();
            backend.prepare(graph, &SessionOptions { intra_op_threads: Some(1), ..options.clone() })?.into()
        }
    };
    let choice = crate::choice::threads(warm.session.as_ref(), one.as_ref(), backend.pool_may_lose(), probe);
    tracing::info!(
        model = %spec.name, version = %files.version, backend = backend.name(), threads = choice.threads,
        one_thread_p50_us = choice.one_thread_p50_us, pool_p50_us = ?choice.pool_p50_us,
        "intra-op threads: the call measured on one thread and the pool"
    );
    if choice.threads == pool {
        return Ok((warm, Some(choice)));
    }
    // The session that serves passes the same warm-up and golden check as every other.
    let _loading = crate::choice::loading();
    Ok((warm_up(spec, files, &options.shapes, one)?, Some(choice)))
}

impl ServedVersion {
    fn start(
        spec: &ModelSpec,
        files: VersionFiles,
        fingerprint: Fingerprint,
        p: Prepared,
        stats: Arc<ModelStats>,
    ) -> ServedVersion {
        let measured = p.choice.p50_us.iter().find(|(name, _)| *name == p.backend).map(|&(_, us)| us);
        let batching = batch_choice::decide(spec.batching.as_ref(), p.session.as_ref(), p.probe.as_deref());
        if let Some(b) = &batching
            && let Some(why) = b.why_unbatched()
        {
            tracing::warn!(
                model = %spec.name, version = %files.version, backend = p.backend, by = b.by, rows = b.rows,
                batch_p50_us = b.batch_p50_us, one_row_p50_us = b.one_row_p50_us,
                "batching is configured, but {why}: served unbatched (batching.mode = \"always\" batches regardless)"
            );
        }
        let served = batch_choice::served(spec.batching.as_ref(), batching.as_ref());
        let executor = executor::decide(spec, served.as_ref(), p.session.as_ref(), p.probe.as_deref(), measured);
        let name = format!("infer-{}-{}", spec.name, files.version);
        let run = Executor::start(spec, served, &name, p.session.clone(), stats.clone(), &executor);
        ServedVersion {
            version: files.version.clone(),
            files,
            fingerprint,
            stats,
            signature: p.session.signature().clone(),
            backend: p.backend,
            backend_choice: p.choice,
            executor,
            batching,
            provider: p.session.provider().cloned(),
            threads: p.threads,
            drift: p.profile.map(|profile| Drift::new(profile, p.session.signature(), spec.drift)),
            shapes: p.shapes,
            session: p.session,
            run,
        }
    }

    /// The plans the session holds per input shape, for backends that plan per shape.
    pub fn plans(&self) -> Option<PlanStats> {
        self.session.plans()
    }

    /// Runs one inference on this version's executor (a worker thread, or this task when the
    /// request is `alone` in the server and the executor allows it).
    pub async fn infer(&self, inputs: Vec<Tensor>, alone: bool) -> Result<Reply, NotRun> {
        self.run.infer(inputs, alone).await
    }
}
