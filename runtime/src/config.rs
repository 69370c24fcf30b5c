//! `outpost.toml`: what the daemon serves and how.
//!
//! The file is read into [`Config`] (serde, unknown keys refused), then checked into
//! [`Validated`] before anything binds a port. Every error names the key, e.g.
//! `models[1].queue_bound: must be between 1 and 65536`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::backend::DEFAULT_BACKEND;

/// Where V2 clients expect a server.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";
/// Largest request body accepted (binary tensors included).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;
/// How long SIGTERM waits for in-flight requests before exiting anyway.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 30;
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
/// Folder served by `outpost serve` with no arguments.
pub const DEFAULT_MODEL_DIR: &str = "models";

/// The configuration file as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// Signed releases: where the device keeps them and who it is.
    pub updates: Option<UpdatesConfig>,
}

/// `[updates]`: the on-disk store of signed releases and the device's identity. The active
/// release's models are served at start, in place of configured models of the same name.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdatesConfig {
    /// The store (blobs, documents, the trusted state); e.g. /var/lib/outpost.
    pub state_dir: PathBuf,
    /// The fleet and group this device belongs to; releases for others are refused.
    pub fleet: String,
    #[serde(default = "default_group")]
    pub group: String,
    /// Pull releases over MQTT (`[updates.mqtt]`).
    pub mqtt: Option<MqttConfig>,
}

fn default_group() -> String {
    "default".into()
}

/// `[updates.mqtt]`: the agent that hears this device's desired release, downloads it in
/// chunks and reports state. Durations in seconds unless the name says otherwise.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `host:port` (port 1883, or 8883 with `ca_file`, when missing).
    pub broker: String,
    /// This device's id: its MQTT client id, its topics, and by default its user name.
    pub device_id: String,
    pub username: Option<String>,
    /// A file holding the MQTT password (kept out of this file, which is often world-readable).
    pub password_file: Option<PathBuf>,
    /// Connect with TLS, trusting only this CA (PEM).
    pub ca_file: Option<PathBuf>,
    pub topic_prefix: Option<String>,
    pub report_interval_secs: Option<u64>,
    pub keep_alive_secs: Option<u64>,
    /// Chunk requests in flight at once (default 4).
    pub chunk_window: Option<usize>,
    pub chunk_timeout_secs: Option<u64>,
    /// Tries per chunk before the download fails (default 5).
    pub chunk_tries: Option<u32>,
    /// Download cap (default: none).
    pub max_bytes_per_second: Option<u64>,
    /// Minimum throughput over `watchdog_secs` before the download fails (default 64 B/s over 60 s).
    pub min_bytes_per_second: Option<u64>,
    pub watchdog_secs: Option<u64>,
    pub reconnect_min_ms: Option<u64>,
    pub reconnect_max_secs: Option<u64>,
    /// First wait after a failed download (doubling per attempt), and the attempts per offer.
    pub retry_after_secs: Option<u64>,
    pub max_attempts: Option<u32>,
    /// Labels reported in `state` (say `site = "berlin"`, `ring = "canary"`): the console's
    /// rollouts can select devices by them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `[server]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind; default [`DEFAULT_LISTEN`].
    pub listen: Option<String>,
    /// Where hard examples uploaded by edges (`POST /v2/hard-examples`) are kept; none: refused.
    pub hard_example_sink: Option<PathBuf>,
    /// Bearer token required on every endpoint but liveness; mandatory off loopback.
    pub auth_token: Option<String>,
    /// Default [`DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: Option<usize>,
    /// Default [`DEFAULT_DRAIN_TIMEOUT_SECS`].
    pub drain_timeout_secs: Option<u64>,
    /// A model repository (`REPO/NAME/<version>/model.onnx`): its models are served besides
    /// any `[[models]]`.
    pub model_repository: Option<PathBuf>,
    /// ONNX Runtime's `libonnxruntime.so`, for models on the `ort` backend; default: the
    /// `ORT_DYLIB_PATH` environment variable.
    pub ort_library: Option<PathBuf>,
}

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
}

/// Time the central model has to answer before the local answer goes out, when not configured.
pub const DEFAULT_CENTRAL_TIMEOUT_MS: u64 = 500;
/// Central calls in flight at once per model, when not configured.
pub const DEFAULT_CENTRAL_CONCURRENCY: usize = 8;
/// Consecutive central failures that open the circuit breaker, when not configured.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// How long an open breaker waits before one probe, when not configured.
pub const DEFAULT_BREAKER_COOLDOWN_MS: u64 = 5_000;
/// Hard examples kept on disk at most, when not configured.
pub const DEFAULT_QUEUE_MAX_ITEMS: usize = 10_000;
/// Bytes of hard examples kept on disk at most, when not configured.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 64 << 20;

/// `[models.escalation]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationConfig {
    /// The central V2 server, `http://host:port` or `https://host:port`.
    pub central_url: String,
    /// PEM file of the certificate authorities that sign the central's certificate (https).
    pub central_ca: Option<PathBuf>,
    pub central_model: String,
    pub central_version: Option<String>,
    /// Bearer token for the central.
    pub central_token: Option<String>,
    /// The output holding class scores; default the model's first output.
    pub output: Option<String>,
    /// Apply softmax to the scores first (for models that output logits).
    #[serde(default)]
    pub softmax: bool,
    /// `max_probability` (default), `margin` or `entropy`.
    pub policy: Option<String>,
    /// Escalate when the confidence is below this (0..1).
    pub threshold: f64,
    pub timeout_ms: Option<u64>,
    pub max_concurrency: Option<usize>,
    pub breaker_failures: Option<u32>,
    pub breaker_cooldown_ms: Option<u64>,
    /// Keep hard examples here while the central is unreachable; none: not kept.
    pub queue_dir: Option<PathBuf>,
    pub queue_max_items: Option<usize>,
    pub queue_max_bytes: Option<u64>,
}

/// How unsure a model is, from its class scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The top probability.
    MaxProbability,
    /// Top-1 minus top-2 probability.
    Margin,
    /// 1 − entropy / ln(classes): Sedna's cross-entropy filter, as a confidence.
    Entropy,
}

impl Policy {
    /// Every policy, for sweeps.
    pub const ALL: [Policy; 3] = [Policy::MaxProbability, Policy::Margin, Policy::Entropy];

    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::MaxProbability => "max_probability",
            Policy::Margin => "margin",
            Policy::Entropy => "entropy",
        }
    }
}

/// Validated escalation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Escalation {
    /// `host:port` of the central.
    pub central_authority: String,
    /// The CA file when the central speaks https; `None`: plain http.
    pub central_tls_ca: Option<PathBuf>,
    pub central_model: String,
    pub central_version: Option<String>,
    pub central_token: Option<String>,
    pub output: Option<String>,
    pub softmax: bool,
    pub policy: Policy,
    pub threshold: f64,
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub queue: Option<QueueLimits>,
}

/// Where hard examples are kept and how many.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueLimits {
    pub dir: PathBuf,
    pub max_items: usize,
    pub max_bytes: u64,
}

impl EscalationConfig {
    fn validate(&self, key: &dyn Fn(&str) -> String) -> Result<Escalation, ConfigError> {
        let (authority, tls) = if let Some(rest) = self.central_url.strip_prefix("http://") {
            (rest.trim_end_matches('/'), false)
        } else if let Some(rest) = self.central_url.strip_prefix("https://") {
            (rest.trim_end_matches('/'), true)
        } else {
            return Err(invalid(key("escalation.central_url"), "must look like http://host:port or https://host:port"));
        };
        let central_tls_ca = match (tls, &self.central_ca) {
            (true, None) => {
                return Err(invalid(
                    key("escalation.central_ca"),
                    "required for an https central_url: a PEM file of the CAs that sign the central's certificate",
                ));
            }
            (true, Some(ca)) if !ca.is_file() => {
                return Err(invalid(key("escalation.central_ca"), format!("{} is not a file", ca.display())));
            }
            (true, Some(ca)) => Some(ca.clone()),
            (false, Some(_)) => {
                return Err(invalid(key("escalation.central_ca"), "applies to an https central_url only"));
            }
            (false, None) => None,
        };
        if authority.is_empty() || authority.contains('/') || authority.parse::<hyper::http::uri::Authority>().is_err()
        {
            return Err(invalid(key("escalation.central_url"), "must look like http://host:port (no path)"));
        }
        check_name(&self.central_model).map_err(|r| invalid(key("escalation.central_model"), r))?;
        if let Some(v) = &self.central_version {
            check_name(v).map_err(|r| invalid(key("escalation.central_version"), r))?;
        }
        let policy = match &self.policy {
            None => Policy::MaxProbability,
            Some(p) => Policy::parse(p).ok_or_else(|| {
                invalid(key("escalation.policy"), format!("`{p}` is not a policy (max_probability, margin, entropy)"))
            })?,
        };
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(invalid(key("escalation.threshold"), "must be between 0 and 1"));
        }
        let timeout = self.timeout_ms.unwrap_or(DEFAULT_CENTRAL_TIMEOUT_MS);
        if !(1..=60_000).contains(&timeout) {
            return Err(invalid(key("escalation.timeout_ms"), "must be between 1 and 60000"));
        }
        let max_concurrency = self.max_concurrency.unwrap_or(DEFAULT_CENTRAL_CONCURRENCY);
        if !(1..=1024).contains(&max_concurrency) {
            return Err(invalid(key("escalation.max_concurrency"), "must be between 1 and 1024"));
        }
        let breaker_failures = self.breaker_failures.unwrap_or(DEFAULT_BREAKER_FAILURES);
        if breaker_failures == 0 {
            return Err(invalid(key("escalation.breaker_failures"), "must be at least 1"));
        }
        let queue = match &self.queue_dir {
            None => None,
            Some(dir) => {
                let max_items = self.queue_max_items.unwrap_or(DEFAULT_QUEUE_MAX_ITEMS);
                let max_bytes = self.queue_max_bytes.unwrap_or(DEFAULT_QUEUE_MAX_BYTES);
                if max_items == 0 || max_bytes == 0 {
                    return Err(invalid(key("escalation.queue_max_items"), "queue limits must be above 0"));
                }
                Some(QueueLimits { dir: dir.clone(), max_items, max_bytes })
            }
        };
        Ok(Escalation {
            central_authority: authority.to_owned(),
            central_tls_ca,
            central_model: self.central_model.clone(),
            central_version: self.central_version.clone(),
            central_token: self.central_token.clone(),
            output: self.output.clone(),
            softmax: self.softmax,
            policy,
            threshold: self.threshold,
            timeout: Duration::from_millis(timeout),
            max_concurrency,
            breaker_failures,
            breaker_cooldown: Duration::from_millis(self.breaker_cooldown_ms.unwrap_or(DEFAULT_BREAKER_COOLDOWN_MS)),
            queue,
        })
    }
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
}

/// Validated batching settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Batching {
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    pub preferred_batch_sizes: Vec<usize>,
}

/// A configuration that passed validation, with defaults filled in.
#[derive(Clone, Debug)]
pub struct Validated {
    pub listen: SocketAddr,
    pub hard_example_sink: Option<PathBuf>,
    pub ort_library: Option<PathBuf>,
    pub auth_token: Option<String>,
    pub max_body_bytes: usize,
    pub drain_timeout: Duration,
    pub models: Vec<ModelSpec>,
    pub updates: Option<UpdatesConfig>,
}

/// A model folder's optional settings file in a repository (`REPO/NAME/config.toml`).
pub const REPOSITORY_MODEL_CONFIG: &str = "config.toml";

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
    pub allow_non_finite: bool,
    pub batching: Option<Batching>,
    pub escalation: Option<Escalation>,
    pub shapes: crate::shapes::Shapes,
    /// ONNX Runtime may use its saturating u8s8 kernels (`exact_int8 = false`).
    pub fast_int8: bool,
}

/// A configuration error: the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

impl Config {
    /// Reads and parses a file (not yet validated). Relative model paths are taken from the
    /// file's folder.
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for m in &mut config.models {
            if m.path.is_relative() {
                m.path = base.join(&m.path);
            }
            if let Some(g) = m.golden.as_mut().filter(|g| g.is_relative()) {
                *g = base.join(&*g);
            }
        }
        if let Some(u) = config.updates.as_mut() {
            if u.state_dir.is_relative() {
                u.state_dir = base.join(&u.state_dir);
            }
            if let Some(m) = u.mqtt.as_mut() {
                for p in [&mut m.password_file, &mut m.ca_file].into_iter().flatten() {
                    if p.is_relative() {
                        *p = base.join(&*p);
                    }
                }
            }
        }
        if let Some(repo) = &config.server.model_repository {
            let repo = base.join(repo);
            config.models.extend(Config::from_repository(&repo)?.models);
        }
        Ok(config)
    }

    /// A configuration serving every `*.onnx` in `dir` (sorted by name) on defaults.
    pub fn from_model_dir(dir: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read { path: dir.to_owned(), source };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "onnx") && p.is_file())
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(invalid("models", format!("no *.onnx file in {}", dir.display())));
        }
        Ok(Config { models: paths.iter().map(|p| ModelConfig::for_path(p, None)).collect(), ..Config::default() })
    }

    /// A configuration serving every model folder of a repository (`REPO/NAME/<version>/model.onnx`,
    /// with optional `REPO/NAME/config.toml` holding that model's `[[models]]` keys but `name`
    /// and `path`), sorted by name.
    pub fn from_repository(repo: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read { path: repo.to_owned(), source };
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo)
            .map_err(read_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        if dirs.is_empty() {
            return Err(invalid("models", format!("no model folder in repository {}", repo.display())));
        }
        let mut models = Vec::new();
        for dir in dirs {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let file = dir.join(REPOSITORY_MODEL_CONFIG);
            let mut table = match std::fs::read_to_string(&file) {
                Ok(text) => toml::from_str::<toml::Table>(&text)
                    .map_err(|e| ConfigError::Parse { path: file.clone(), message: e.to_string() })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
                Err(source) => return Err(ConfigError::Read { path: file, source }),
            };
            for key in ["name", "path", "version"] {
                if table.contains_key(key) {
                    return Err(ConfigError::Parse {
                        path: file,
                        message: format!("`{key}` comes from the folder layout and cannot be set here"),
                    });
                }
            }
            table.insert("name".into(), name.into());
            table.insert("path".into(), dir.to_string_lossy().into_owned().into());
            let model: ModelConfig = table
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse { path: file, message: e.to_string() })?;
            models.push(model);
        }
        Ok(Config { models, ..Config::default() })
    }

    /// Checks everything that can be checked before loading models.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        let s = &self.server;
        let listen_text = s.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| invalid("server.listen", format!("`{listen_text}` is not an address like 127.0.0.1:8000")))?;
        if let Some(t) = &s.auth_token
            && (t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(invalid("server.auth_token", "must be at least 16 characters, without spaces"));
        }
        if !listen.ip().is_loopback() && s.auth_token.is_none() {
            return Err(invalid(
                "server.auth_token",
                format!("required when listening on {listen} (not loopback): set a bearer token"),
            ));
        }
        let max_body_bytes = s.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if !(1024..=(1 << 30)).contains(&max_body_bytes) {
            return Err(invalid("server.max_body_bytes", "must be between 1024 and 1073741824"));
        }
        let drain = s.drain_timeout_secs.unwrap_or(DEFAULT_DRAIN_TIMEOUT_SECS);
        if drain > 3600 {
            return Err(invalid("server.drain_timeout_secs", "must be at most 3600"));
        }
        if let Some(u) = &self.updates {
            check_name(&u.fleet).map_err(|r| invalid("updates.fleet", r))?;
            check_name(&u.group).map_err(|r| invalid("updates.group", r))?;
            if let Some(m) = &u.mqtt {
                crate::agent::agent_config(u, m).map_err(|(k, r)| invalid(format!("updates.mqtt.{k}"), r))?;
            }
        }
        if self.models.is_empty() && self.updates.is_none() {
            return Err(invalid(
                "models",
                "no model is configured: add a [[models]] entry (or [updates] to serve releases)",
            ));
        }
        let mut names = HashSet::new();
        let mut models = Vec::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = |field: &str| format!("models[{i}].{field}");
            check_name(&m.name).map_err(|r| invalid(key("name"), r))?;
            if !names.insert(m.name.as_str()) {
                return Err(invalid(key("name"), format!("`{}` is configured twice", m.name)));
            }
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
                    return Err(invalid(
                        key("execution_providers"),
                        format!("unknown provider `{p}` (known: {known})"),
                    ));
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
                    })
                }
            };
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
            models.push(ModelSpec {
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
                allow_non_finite: m.allow_non_finite,
                batching,
                shapes,
                fast_int8: m.exact_int8 == Some(false),
            });
        }
        Ok(Validated {
            listen,
            hard_example_sink: s.hard_example_sink.clone(),
            ort_library: s.ort_library.clone(),
            auth_token: s.auth_token.clone(),
            max_body_bytes,
            drain_timeout: Duration::from_secs(drain),
            models,
            updates: self.updates.clone(),
        })
    }
}

impl ModelConfig {
    /// A model entry on defaults; the name defaults to the file stem.
    pub fn for_path(path: &Path, name: Option<&str>) -> ModelConfig {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        ModelConfig { name: name.map_or(stem, str::to_owned), path: path.to_owned(), ..ModelConfig::default() }
    }
}

/// Model names and versions appear in URL paths and metric labels: keep them plain.
fn check_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!("`{s}` must be 1-128 characters of A-Z, a-z, 0-9, '-', '_', '.' (not starting with '.')"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Validated, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: "t".into(), message: e.to_string() })?;
        config.validate()
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const ONE: &str = "[[models]]\nname = \"m\"\npath = \"m.onnx\"\n";

    #[test]
    fn provider_options_become_strings() {
        let v = parse(&format!(
            "{ONE}backend = \"ort\"\nexecution_providers = [\"cuda\", \"cpu\"]\n[models.provider_options.cuda]\ndevice_id = 0\n"
        ))
        .unwrap();
        assert_eq!(v.models[0].providers, vec!["cuda", "cpu"]);
        assert_eq!(v.models[0].provider_options["cuda"], vec![("device_id".to_string(), "0".to_string())]);
    }

    #[test]
    fn defaults_fill_in() {
        let v = parse(ONE).unwrap();
        assert_eq!(v.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(v.models[0].source, Source::File { path: "m.onnx".into(), version: "1".into() });
        assert_eq!(v.models[0].backend, "tract");
        assert_eq!(v.models[0].queue_bound, DEFAULT_QUEUE_BOUND);
        assert_eq!(v.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(&format!("{ONE}queue_bound = 0\n")).starts_with("models[0].queue_bound:"));
        assert!(err(&format!("{ONE}workers = 1000\n")).starts_with("models[0].workers:"));
        assert!(err(&format!("{ONE}backend = \"onnx\"\n")).starts_with("models[0].backend:"));
        assert!(err(&format!("{ONE}name = \"x\"\n")).contains("duplicate key"));
        assert!(err(&format!("{ONE}[[models]]\nname = \"m\"\npath = \"n.onnx\"\n")).contains("configured twice"));
        assert!(err("[[models]]\nname = \"a/b\"\npath = \"m.onnx\"\n").starts_with("models[0].name:"));
        assert!(err(&format!("[server]\nlisten = \"nowhere\"\n{ONE}")).starts_with("server.listen:"));
        assert!(err(&format!("[server]\nlisten = \"0.0.0.0:8000\"\n{ONE}")).starts_with("server.auth_token:"));
        assert!(
            err(&format!("[server]\nlisten = \"0.0.0.0:8000\"\nauth_token = \"short\"\n{ONE}"))
                .starts_with("server.auth_token:")
        );
        assert!(err(&format!("[server]\nmax_body_bytes = 10\n{ONE}")).starts_with("server.max_body_bytes:"));
        assert!(err("").starts_with("models:"));
        assert!(
            err(&format!("{ONE}execution_providers = [\"cuda\"]\n"))
                .contains("apply to backend = \"ort\" (or \"auto\") only")
        );
        let e = err(&format!("{ONE}backend = \"ort\"\nexecution_providers = [\"cuda\", \"gpu\"]\n"));
        assert!(e.contains("unknown provider `gpu`"), "{e}");
        let e = err(&format!(
            "{ONE}backend = \"ort\"\nexecution_providers = [\"cpu\"]\n[models.provider_options.cuda]\ndevice_id = 0\n"
        ));
        assert!(e.starts_with("models[0].provider_options.cuda:"), "{e}");
    }

    #[test]
    fn batching_is_validated() {
        let v = parse(&format!("{ONE}[models.batching]\nmax_batch_size = 16\n")).unwrap();
        let b = v.models[0].batching.clone().unwrap();
        assert_eq!((b.max_batch_size, b.max_queue_delay), (16, Duration::from_micros(DEFAULT_MAX_QUEUE_DELAY_US)));
        let e = err(&format!("{ONE}[models.batching]\nmax_batch_size = 8\npreferred_batch_sizes = [4, 16]\n"));
        assert!(e.starts_with("models[0].batching.preferred_batch_sizes: 16 is not between"), "{e}");
        assert!(
            err(&format!("{ONE}[models.batching]\nmax_batch_size = 0\n"))
                .starts_with("models[0].batching.max_batch_size")
        );
        assert!(err(&format!("{ONE}[models.batching]\nmax_delay = 3\n")).contains("unknown field `max_delay`"));
    }

    #[test]
    fn escalation_is_validated() {
        let esc = |extra: &str| {
            format!(
                "{ONE}[models.escalation]\ncentral_url = \"http://127.0.0.1:8001\"\ncentral_model = \"c\"\nthreshold = 0.9\n{extra}"
            )
        };
        let v = parse(&esc("")).unwrap();
        let e = v.models[0].escalation.clone().unwrap();
        assert_eq!(
            (e.central_authority.as_str(), e.policy, e.threshold),
            ("127.0.0.1:8001", Policy::MaxProbability, 0.9)
        );
        assert!(err(&esc("policy = \"vibes\"\n")).starts_with("models[0].escalation.policy: `vibes`"));
        assert!(err(&esc("timeout_ms = 0\n")).starts_with("models[0].escalation.timeout_ms"));
        let https = esc("").replace("http://", "https://");
        assert!(err(&https).starts_with("models[0].escalation.central_ca: required for an https central_url"));
        let bad = esc("").replace("http://127.0.0.1:8001", "http://host:8001/path");
        assert!(err(&bad).starts_with("models[0].escalation.central_url"));
        let bad = esc("").replace("threshold = 0.9", "threshold = 1.5");
        assert!(err(&bad).starts_with("models[0].escalation.threshold"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = err(&format!("{ONE}queue_size = 3\n"));
        assert!(e.contains("unknown field `queue_size`"), "{e}");
        let e = err(&format!("[sever]\n{ONE}"));
        assert!(e.contains("unknown field `sever`"), "{e}");
    }

    #[test]
    fn off_loopback_needs_a_token() {
        let v =
            parse(&format!("[server]\nlisten = \"0.0.0.0:8000\"\nauth_token = \"0123456789abcdef\"\n{ONE}")).unwrap();
        assert!(v.auth_token.is_some());
    }

    #[test]
    fn the_sample_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../outpost.toml");
        let v = Config::read(&path).unwrap().validate().unwrap();
        assert!(v.models.iter().any(|m| m.name == "digits-edge" && m.golden == GoldenSource::Beside));
    }

    #[test]
    fn model_dir_serves_every_onnx_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let v = Config::from_model_dir(&dir).unwrap().validate().unwrap();
        let names: Vec<&str> = v.models.iter().map(|m| m.name.as_str()).collect();
        assert!(names.contains(&"digits-edge") && names.contains(&"digits-cnn"), "{names:?}");
        assert!(!names.contains(&"digits-edge-qsoftmax"), "hazards/ is not served");
    }
}
