//! One `[[models]]` entry: the file schema, and the validated [`ModelSpec`] the runtime loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::{ConfigError, check_name, invalid};
use super::escalation::{Escalation, EscalationConfig};
use super::shadow::{ShadowConfig, ShadowSettings};
use crate::backend::DEFAULT_BACKEND;
use crate::drift::DriftSettings;

/// Requests that may wait for a model's workers before new ones get 503.
pub const DEFAULT_QUEUE_BOUND: usize = 128;
/// Inferences of one model run at once.
pub const DEFAULT_WORKERS: usize = 1;
/// The version a model reports when the configuration gives none.
pub const DEFAULT_VERSION: &str = "1";
/// Largest batch the dynamic batcher forms, when batching is on and the config gives none.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 32;
/// How long the first request of a batch may wait for others, when the config gives none.
pub const DEFAULT_MAX_QUEUE_DELAY_US: u64 = 500;
/// A model folder's optional settings file in a repository (`REPO/NAME/config.toml`).
pub const REPOSITORY_MODEL_CONFIG: &str = "config.toml";

/// One `[[models]]` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub path: PathBuf,
    /// Default [`DEFAULT_VERSION`].
    pub version: Option<String>,
    /// `tract` or `ort`; default [`DEFAULT_BACKEND`].
    pub backend: Option<String>,
    /// Default [`DEFAULT_QUEUE_BOUND`].
    pub queue_bound: Option<usize>,
    /// Default [`DEFAULT_WORKERS`].
    pub workers: Option<usize>,
    /// Threads inside one inference, where the backend supports it.
    pub intra_op_threads: Option<usize>,
    /// Threads for independent parts of the graph (ort).
    pub inter_op_threads: Option<usize>,
    /// Execution providers to try in order (ort), e.g. `["tensorrt", "cuda", "cpu"]`.
    #[serde(default)]
    pub execution_providers: Vec<String>,
    /// Options per provider, e.g. `[models.provider_options.cuda] device_id = 0`.
    #[serde(default)]
    pub provider_options: BTreeMap<String, BTreeMap<String, toml::Value>>,
    /// Golden file to check at load; default `NAME.golden.json` beside the model, if present.
    pub golden: Option<PathBuf>,
    /// Reference profile for drift; default `NAME.profile.json` beside the model, if present.
    pub profile: Option<PathBuf>,
    /// Skip the golden check even when a golden file is present. Default false.
    #[serde(default)]
    pub skip_golden: bool,
    /// Accept NaN and infinite input values. Default false: they are refused with 400.
    #[serde(default)]
    pub allow_non_finite: bool,
    /// Dynamic batching; off when absent.
    pub batching: Option<BatchingConfig>,
    /// Which versions to serve when `path` is a version folder; default `{ latest = 1 }`.
    pub version_policy: Option<VersionPolicyConfig>,
    /// Send unsure cases to a central model; off when absent.
    pub escalation: Option<EscalationConfig>,
    /// Concrete input shapes to prepare and warm at load, each a set of one shape per input,
    /// e.g. `shapes = [{ x = [1, 3, 48, 320] }, { x = [1, 3, 48, 640] }]`.
    #[serde(default)]
    pub shapes: Vec<crate::shapes::ShapeSet>,
    /// `prepare` (default) or `refuse` a request whose shapes are not in `shapes`.
    pub undeclared_shapes: Option<crate::shapes::Undeclared>,
    /// Plans kept for undeclared shapes (tract); default [`crate::shapes::DEFAULT_PLAN_CACHE`].
    pub plan_cache: Option<usize>,
    /// INT8 models computed exactly on every x86 CPU by ONNX Runtime (ort); default true.
    pub exact_int8: Option<bool>,
    /// Where backend calls run: `auto` (default), `threads` or `inline` (see `crate::executor`).
    #[serde(default)]
    pub executor: ExecutorChoice,
    /// Drift against the reference profile beside the model (`NAME.profile.json`).
    pub drift: Option<DriftConfig>,
    /// A candidate model run on a share of live requests beside this one (`crate::shadow`).
    pub shadow: Option<ShadowConfig>,
}

/// `[models.drift]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    /// Rows per window; default [`crate::drift::DEFAULT_WINDOW`].
    pub window: Option<u64>,
    /// Population stability index past which a window is reported; default
    /// [`crate::drift::DEFAULT_THRESHOLD`].
    pub threshold: Option<f64>,
}

/// `models[].executor`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorChoice {
    /// Inline when the call is short and cannot grow past the measured one; else threads.
    #[default]
    Auto,
    /// The version's worker threads, through its queue.
    Threads,
    /// The request's own task.
    Inline,
}

/// `version_policy`: exactly one of `latest = N`, `specific = [..]`, `all = true`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionPolicyConfig {
    pub latest: Option<usize>,
    pub specific: Option<Vec<u64>>,
    pub all: Option<bool>,
}

/// Which versions of a version folder are served.
#[derive(Clone, Debug, PartialEq)]
pub enum VersionPolicy {
    /// The N highest version numbers.
    Latest(usize),
    /// Exactly these.
    Specific(Vec<u64>),
    All,
}

/// Where a model's versions come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// One file, served as one version.
    File { path: PathBuf, version: String },
    /// A folder of versions: `DIR/<number>/model.onnx`, each with its golden file beside it.
    Directory { path: PathBuf, policy: VersionPolicy },
}

/// Where a model's golden outputs come from.
#[derive(Clone, Debug, PartialEq)]
pub enum GoldenSource {
    /// `NAME.golden.json` beside `NAME.onnx`, when present.
    Beside,
    File(PathBuf),
    Skip,
}

/// `[models.batching]`: stack concurrent requests into one backend call.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Default [`DEFAULT_MAX_BATCH_SIZE`] rows.
    pub max_batch_size: Option<usize>,
    /// Default [`DEFAULT_MAX_QUEUE_DELAY_US`].
    pub max_queue_delay_us: Option<u64>,
    /// Sizes at which a batch goes at once, without waiting out the delay.
    #[serde(default)]
    pub preferred_batch_sizes: Vec<usize>,
    /// Default `auto`: on tract, batch only where a batch of copies of the warm-up input's first
    /// row measured at load takes at most 0.9 of its rows one at a time ([`crate::batch_choice`]).
    #[serde(default)]
    pub mode: BatchingMode,
}

/// `batching.mode`: whether configured batching is measured at load first ([`crate::batch_choice`]).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BatchingMode {
    /// On tract, batch where a batch measured at load saves a tenth of its rows' time; on other
    /// backends, batch ([`crate::batch_choice`]).
    #[default]
    Auto,
    /// Batch without measuring.
    Always,
}

/// Validated batching settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Batching {
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    pub preferred_batch_sizes: Vec<usize>,
    pub mode: BatchingMode,
}

impl Batching {
    /// Whether a batch waits for rows to join it (`max_queue_delay_us` above 0); without a wait
    /// the worker takes only what is already queued.
    pub fn waits(&self) -> bool {
        !self.max_queue_delay.is_zero()
    }
}

/// A validated model entry.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub name: String,
    pub source: Source,
    pub backend: String,
    pub queue_bound: usize,
    pub workers: usize,
    pub intra_op_threads: Option<usize>,
    pub inter_op_threads: Option<usize>,
    pub providers: Vec<String>,
    pub provider_options: BTreeMap<String, Vec<(String, String)>>,
    pub golden: GoldenSource,
    /// The reference profile named in configuration (else the one beside the model, if any).
    pub profile: Option<PathBuf>,
    pub allow_non_finite: bool,
    pub batching: Option<Batching>,
    pub escalation: Option<Escalation>,
    pub shapes: crate::shapes::Shapes,
    /// ONNX Runtime may use its saturating u8s8 kernels (`exact_int8 = false`).
    pub fast_int8: bool,
    pub executor: ExecutorChoice,
    pub drift: DriftSettings,
    /// The candidate run beside this model on a share of its requests, when configured.
    pub shadow: Option<ShadowSettings>,
}

impl ModelConfig {
    /// A model entry on defaults; the name defaults to the file stem.
    pub fn for_path(path: &Path, name: Option<&str>) -> ModelConfig {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        ModelConfig { name: name.map_or(stem, str::to_owned), path: path.to_owned(), ..ModelConfig::default() }
    }

    /// Checks this entry (its name already checked by the caller); `key` names a field of it in
    /// errors, e.g. `models[1].queue_bound`.
    pub(crate) fn validate(&self, key: &dyn Fn(&str) -> String) -> Result<ModelSpec, ConfigError> {
        let m = self;
        if m.path.as_os_str().is_empty() {
            return Err(invalid(key("path"), "is empty"));
        }
        let source = if m.path.is_dir() {
            if m.version.is_some() {
                return Err(invalid(key("version"), "versions of a version folder come from its subfolders"));
            }
            if m.golden.is_some() {
                return Err(invalid(key("golden"), "a version folder keeps each version's golden file beside it"));
            }
            if m.profile.is_some() {
                return Err(invalid(key("profile"), "a version folder keeps each version's profile beside it"));
            }
            let policy = match &m.version_policy {
                None => VersionPolicy::Latest(1),
                Some(VersionPolicyConfig { latest: Some(n), specific: None, all: None }) if *n >= 1 => {
                    VersionPolicy::Latest(*n)
                }
                Some(VersionPolicyConfig { latest: None, specific: Some(v), all: None }) if !v.is_empty() => {
                    VersionPolicy::Specific(v.clone())
                }
                Some(VersionPolicyConfig { latest: None, specific: None, all: Some(true) }) => VersionPolicy::All,
                Some(_) => {
                    return Err(invalid(
                        key("version_policy"),
                        "give exactly one of `latest = N` (N >= 1), `specific = [versions]`, `all = true`",
                    ));
                }
            };
            Source::Directory { path: m.path.clone(), policy }
        } else {
            if m.version_policy.is_some() {
                return Err(invalid(key("version_policy"), "applies to a version folder; this path is a file"));
            }
            let version = m.version.clone().unwrap_or_else(|| DEFAULT_VERSION.into());
            check_name(&version).map_err(|r| invalid(key("version"), r))?;
            Source::File { path: m.path.clone(), version }
        };
        let backend = m.backend.clone().unwrap_or_else(|| DEFAULT_BACKEND.into());
        if !["tract", "ort", "auto"].contains(&backend.as_str()) {
            return Err(invalid(key("backend"), format!("`{backend}` is not a backend (tract, ort, auto)")));
        }
        let queue_bound = m.queue_bound.unwrap_or(DEFAULT_QUEUE_BOUND);
        if !(1..=65536).contains(&queue_bound) {
            return Err(invalid(key("queue_bound"), "must be between 1 and 65536"));
        }
        let workers = m.workers.unwrap_or(DEFAULT_WORKERS);
        if !(1..=256).contains(&workers) {
            return Err(invalid(key("workers"), "must be between 1 and 256"));
        }
        if m.intra_op_threads == Some(0) {
            return Err(invalid(key("intra_op_threads"), "must be at least 1"));
        }
        if m.inter_op_threads == Some(0) {
            return Err(invalid(key("inter_op_threads"), "must be at least 1"));
        }
        if backend == "tract" && (!m.execution_providers.is_empty() || !m.provider_options.is_empty()) {
            return Err(invalid(
                key("execution_providers"),
                "execution providers apply to backend = \"ort\" (or \"auto\") only",
            ));
        }
        for p in &m.execution_providers {
            if !crate::backend::PROVIDERS.contains(&p.as_str()) {
                let known = crate::backend::PROVIDERS.join(", ");
                return Err(invalid(key("execution_providers"), format!("unknown provider `{p}` (known: {known})")));
            }
        }
        let mut provider_options = BTreeMap::new();
        for (p, opts) in &m.provider_options {
            if !m.execution_providers.contains(p) {
                return Err(invalid(
                    key(&format!("provider_options.{p}")),
                    "names a provider not in execution_providers",
                ));
            }
            let mut pairs = Vec::new();
            for (k, v) in opts {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => v.to_string(),
                    _ => {
                        return Err(invalid(
                            key(&format!("provider_options.{p}.{k}")),
                            "must be a string, number or boolean",
                        ));
                    }
                };
                pairs.push((k.clone(), text));
            }
            provider_options.insert(p.clone(), pairs);
        }
        let golden = match (&m.golden, m.skip_golden) {
            (Some(_), true) => {
                return Err(invalid(key("skip_golden"), "cannot be true when `golden` is set"));
            }
            (Some(g), false) if !g.is_file() => {
                return Err(invalid(key("golden"), format!("{} is not a file", g.display())));
            }
            (Some(g), false) => GoldenSource::File(g.clone()),
            (None, true) => GoldenSource::Skip,
            (None, false) => GoldenSource::Beside,
        };
        if let Some(p) = m.profile.as_ref().filter(|p| !p.is_file()) {
            return Err(invalid(key("profile"), format!("{} is not a file", p.display())));
        }
        let batching = match &m.batching {
            None => None,
            Some(b) => {
                let max_batch_size = b.max_batch_size.unwrap_or(DEFAULT_MAX_BATCH_SIZE);
                if !(1..=4096).contains(&max_batch_size) {
                    return Err(invalid(key("batching.max_batch_size"), "must be between 1 and 4096"));
                }
                let delay = b.max_queue_delay_us.unwrap_or(DEFAULT_MAX_QUEUE_DELAY_US);
                if delay > 1_000_000 {
                    return Err(invalid(key("batching.max_queue_delay_us"), "must be at most 1000000 (1 s)"));
                }
                if let Some(p) = b.preferred_batch_sizes.iter().find(|&&p| p == 0 || p > max_batch_size) {
                    return Err(invalid(
                        key("batching.preferred_batch_sizes"),
                        format!("{p} is not between 1 and max_batch_size ({max_batch_size})"),
                    ));
                }
                Some(Batching {
                    max_batch_size,
                    max_queue_delay: Duration::from_micros(delay),
                    preferred_batch_sizes: b.preferred_batch_sizes.clone(),
                    mode: b.mode,
                })
            }
        };
        if m.executor == ExecutorChoice::Inline && batching.as_ref().is_some_and(Batching::waits) {
            return Err(invalid(
                key("executor"),
                "\"inline\" cannot batch with a wait: a batch is gathered by a worker thread \
                 (max_queue_delay_us = 0, or executor = \"threads\" or \"auto\")",
            ));
        }
        let escalation = match &m.escalation {
            None => None,
            Some(e) => Some(e.validate(&key)?),
        };
        let shapes = crate::shapes::Shapes {
            declared: m.shapes.clone(),
            undeclared: m.undeclared_shapes.unwrap_or_default(),
            plan_cache: m.plan_cache.unwrap_or(crate::shapes::DEFAULT_PLAN_CACHE),
        };
        shapes.validate().map_err(|reason| invalid(key("shapes"), reason))?;
        let mut drift = DriftSettings::default();
        if let Some(d) = &m.drift {
            drift.window = d.window.unwrap_or(drift.window);
            if !(1..=100_000_000).contains(&drift.window) {
                return Err(invalid(key("drift.window"), "must be between 1 and 100000000 rows"));
            }
            drift.threshold = d.threshold.unwrap_or(drift.threshold);
            if !(drift.threshold.is_finite() && drift.threshold > 0.0) {
                return Err(invalid(key("drift.threshold"), "must be a number above 0"));
            }
        }
        let shadow = match &m.shadow {
            None => None,
            Some(c) => Some(c.validate(&key)?),
        };
        Ok(ModelSpec {
            name: m.name.clone(),
            source,
            escalation,
            backend,
            queue_bound,
            workers,
            intra_op_threads: m.intra_op_threads,
            inter_op_threads: m.inter_op_threads,
            providers: m.execution_providers.clone(),
            provider_options,
            golden,
            profile: m.profile.clone(),
            allow_non_finite: m.allow_non_finite,
            batching,
            shapes,
            fast_int8: m.exact_int8 == Some(false),
            executor: m.executor,
            drift,
            shadow,
        })
    }
}
