//! `outpost.toml`: what the daemon serves and how.
//!
//! The file is read into [`Config`] (serde, unknown keys refused), then checked into
//! [`Validated`] before anything binds a port. Every error names the key, e.g.
//! `models[1].queue_bound: must be between 1 and 65536`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

mod discovery;
mod error;
mod escalation;
mod model;
mod secret;
mod shadow;
mod updates;

pub use error::ConfigError;
use error::{check_name, invalid};
pub use escalation::{
    DEFAULT_BREAKER_COOLDOWN_MS, DEFAULT_BREAKER_FAILURES, DEFAULT_CENTRAL_CONCURRENCY, DEFAULT_CENTRAL_TIMEOUT_MS,
    DEFAULT_QUEUE_MAX_BYTES, DEFAULT_QUEUE_MAX_ITEMS, Escalation, EscalationConfig, Policy, QueueLimits,
};
pub use model::{
    Batching, BatchingConfig, BatchingMode, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_DELAY_US, DEFAULT_QUEUE_BOUND,
    DEFAULT_VERSION, DEFAULT_WORKERS, ExecutorChoice, GoldenSource, ModelConfig, ModelSpec, REPOSITORY_MODEL_CONFIG,
    Source, VersionPolicy, VersionPolicyConfig,
};
pub use shadow::{
    DEFAULT_SHADOW_MAX_IN_FLIGHT, DEFAULT_SHADOW_MAX_PER_SECOND, DEFAULT_SHADOW_SHARE, DEFAULT_SHADOW_VERSION,
    ShadowConfig, ShadowSettings,
};
pub use updates::{MqttConfig, UpdatesConfig, agent_config};

/// Where V2 clients expect a server.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";
/// Largest request body accepted (binary tensors included).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;
/// How long SIGTERM waits for in-flight requests before exiting anyway.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 30;
/// The most threads `server.http_threads` may name.
pub const MAX_HTTP_THREADS: usize = 256;
/// Examples the hard-example sink holds at most by default.
pub const DEFAULT_SINK_MAX_ITEMS: u64 = 100_000;
/// Bytes the hard-example sink holds at most by default (1 GiB).
pub const DEFAULT_SINK_MAX_BYTES: u64 = 1 << 30;
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

/// `[server]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind; default [`DEFAULT_LISTEN`].
    pub listen: Option<String>,
    /// Where hard examples uploaded by edges (`POST /v2/hard-examples`) are kept; none: refused.
    pub hard_example_sink: Option<PathBuf>,
    /// The most examples the sink holds; default [`DEFAULT_SINK_MAX_ITEMS`].
    pub hard_example_sink_max_items: Option<u64>,
    /// The most bytes the sink holds; default [`DEFAULT_SINK_MAX_BYTES`].
    pub hard_example_sink_max_bytes: Option<u64>,
    /// Bearer token required on every endpoint but liveness; mandatory off loopback.
    pub auth_token: Option<String>,
    /// The same, read from the first line of this file (keep it mode 0600, out of the
    /// world-readable configuration).
    pub auth_token_file: Option<PathBuf>,
    /// Host names (besides IP addresses and `localhost`) clients may call this server by; a
    /// request naming any other host is refused (DNS rebinding). Default: none.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Default [`DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: Option<usize>,
    /// Bytes all requests in flight may hold together (bodies and the tensors decoded from
    /// them); past it a request gets 503 at once. Default: five times `max_body_bytes`.
    pub max_inflight_bytes: Option<u64>,
    /// Default [`DEFAULT_DRAIN_TIMEOUT_SECS`].
    pub drain_timeout_secs: Option<u64>,
    /// Threads that serve HTTP (parse, encode, the async tasks); default [`default_http_threads`].
    pub http_threads: Option<usize>,
    /// A model repository (`REPO/NAME/<version>/model.onnx`): its models are served besides
    /// any `[[models]]`.
    pub model_repository: Option<PathBuf>,
    /// ONNX Runtime's `libonnxruntime.so`, for models on the `ort` backend; default: the
    /// `ORT_DYLIB_PATH` environment variable, else `libonnxruntime.so` found by the dynamic
    /// loader's search.
    pub ort_library: Option<PathBuf>,
}

/// A configuration that passed validation, with defaults filled in.
#[derive(Clone, Debug)]
pub struct Validated {
    pub listen: SocketAddr,
    pub hard_example_sink: Option<PathBuf>,
    pub hard_example_sink_max_items: u64,
    pub hard_example_sink_max_bytes: u64,
    pub ort_library: Option<PathBuf>,
    pub auth_token: Option<String>,
    pub allowed_hosts: Vec<String>,
    pub max_body_bytes: usize,
    pub max_inflight_bytes: u64,
    pub drain_timeout: Duration,
    pub http_threads: usize,
    pub models: Vec<ModelSpec>,
    pub updates: Option<UpdatesConfig>,
}

impl Config {
    /// Checks everything that can be checked before loading models.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        let s = &self.server;
        let listen_text = s.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| invalid("server.listen", format!("`{listen_text}` is not an address like 127.0.0.1:8000")))?;
        let auth_token = secret::inline_or_file(
            "server.auth_token",
            s.auth_token.as_ref(),
            "server.auth_token_file",
            s.auth_token_file.as_deref(),
        )?;
        if let Some(t) = &auth_token
            && (t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(invalid("server.auth_token", "must be at least 16 characters, without spaces"));
        }
        if !listen.ip().is_loopback() && auth_token.is_none() {
            return Err(invalid(
                "server.auth_token",
                format!("required when listening on {listen} (not loopback): set a bearer token (or auth_token_file)"),
            ));
        }
        if s.allowed_hosts.len() > 64 {
            return Err(invalid("server.allowed_hosts", "at most 64 names"));
        }
        for name in &s.allowed_hosts {
            let plain = name
                .split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            if !plain || name.len() > 253 {
                return Err(invalid("server.allowed_hosts", format!("`{}` is not a host name", name.escape_debug())));
            }
        }
        let hard_example_sink_max_items = s.hard_example_sink_max_items.unwrap_or(DEFAULT_SINK_MAX_ITEMS);
        let hard_example_sink_max_bytes = s.hard_example_sink_max_bytes.unwrap_or(DEFAULT_SINK_MAX_BYTES);
        if hard_example_sink_max_items == 0 || hard_example_sink_max_bytes == 0 {
            return Err(invalid("server.hard_example_sink_max_items", "the sink's bounds must be above 0"));
        }
        let max_body_bytes = s.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if !(1024..=(1 << 30)).contains(&max_body_bytes) {
            return Err(invalid("server.max_body_bytes", "must be between 1024 and 1073741824"));
        }
        // The largest JSON body must fit alone, or it could never be served.
        let largest = crate::budget::request_cost(max_body_bytes as u64, false);
        let max_inflight_bytes = s.max_inflight_bytes.unwrap_or(largest);
        if max_inflight_bytes < largest {
            return Err(invalid(
                "server.max_inflight_bytes",
                format!(
                    "must be at least {largest} (five times max_body_bytes: a JSON body of that size and the \
                     tensors it holds); lower max_body_bytes to go lower"
                ),
            ));
        }
        let drain = s.drain_timeout_secs.unwrap_or(DEFAULT_DRAIN_TIMEOUT_SECS);
        if drain > 3600 {
            return Err(invalid("server.drain_timeout_secs", "must be at most 3600"));
        }
        let http_threads = s.http_threads.unwrap_or_else(default_http_threads);
        if !(1..=MAX_HTTP_THREADS).contains(&http_threads) {
            return Err(invalid("server.http_threads", format!("must be between 1 and {MAX_HTTP_THREADS}")));
        }
        if let Some(u) = &self.updates {
            check_name(&u.fleet).map_err(|r| invalid("updates.fleet", r))?;
            check_name(&u.group).map_err(|r| invalid("updates.group", r))?;
            if let Some(m) = &u.mqtt {
                let agent = agent_config(u, m).map_err(|(k, r)| invalid(format!("updates.mqtt.{k}"), r))?;
                if m.password_file.is_some() && m.ca_file.is_none() {
                    secret::check_plaintext(
                        "updates.mqtt.password_file",
                        &agent.broker.host,
                        m.allow_plaintext_password,
                        "updates.mqtt.allow_plaintext_password",
                    )?;
                }
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
            models.push(m.validate(&key)?);
        }
        Ok(Validated {
            listen,
            hard_example_sink: s.hard_example_sink.clone(),
            hard_example_sink_max_items,
            hard_example_sink_max_bytes,
            ort_library: s.ort_library.clone(),
            auth_token,
            allowed_hosts: s.allowed_hosts.clone(),
            max_body_bytes,
            max_inflight_bytes,
            drain_timeout: Duration::from_secs(drain),
            http_threads,
            models,
            updates: self.updates.clone(),
        })
    }
}

/// The HTTP threads when `server.http_threads` is not set: half the CPUs this process may use
/// (its affinity and cgroup quota), at least one and at most [`MAX_HTTP_THREADS`]. The other half is left to the models' calls:
/// their worker threads and intra-op pools run beside the HTTP threads, and on 2 vCPUs two HTTP
/// threads and a model's worker outnumbered the cores: one HTTP thread served 15-31% more requests/s
/// at 8 and 32 clients (docs/benchmarks.md, "One HTTP thread per two CPUs").
pub fn default_http_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, MAX_HTTP_THREADS))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
        assert_eq!(v.models[0].backend, "auto");
        assert_eq!(v.models[0].queue_bound, DEFAULT_QUEUE_BOUND);
        assert_eq!(v.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(v.http_threads, default_http_threads());
    }

    #[test]
    fn http_threads_are_half_the_cpus_unless_set() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(default_http_threads(), (cpus / 2).clamp(1, MAX_HTTP_THREADS));
        assert_eq!(parse(&format!("[server]\nhttp_threads = 3\n{ONE}")).unwrap().http_threads, 3);
        for bad in [0, MAX_HTTP_THREADS + 1] {
            let e = err(&format!("[server]\nhttp_threads = {bad}\n{ONE}"));
            assert!(e.starts_with("server.http_threads: must be between 1 and 256"), "{e}");
        }
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
            err(&format!("{ONE}backend = \"tract\"\nexecution_providers = [\"cuda\"]\n"))
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
    fn tokens_can_be_read_from_files_relative_to_the_config() {
        let dir = std::env::temp_dir().join(format!("outpost-config-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "0123456789abcdef-from-a-file\n").unwrap();
        std::fs::write(dir.join("central-token"), "central-secret\n").unwrap();
        let file = dir.join("outpost.toml");
        let write = |text: &str| std::fs::write(&file, text).unwrap();
        write(
            "[server]\nlisten = \"0.0.0.0:8000\"\nauth_token_file = \"token\"\n\
             [[models]]\nname = \"m\"\npath = \"m.onnx\"\n[models.escalation]\n\
             central_url = \"http://127.0.0.1:8001\"\ncentral_model = \"c\"\nthreshold = 0.9\ncentral_token_file = \"central-token\"\n",
        );
        let v = Config::read(&file).unwrap().validate().unwrap();
        assert_eq!(v.auth_token.as_deref(), Some("0123456789abcdef-from-a-file"));
        let esc = v.models[0].escalation.as_ref().unwrap();
        assert_eq!(esc.central_token.as_deref(), Some("central-secret"));
        let err = |text: &str| {
            write(text);
            Config::read(&file).unwrap().validate().unwrap_err().to_string()
        };
        let both = err(
            "[server]\nauth_token = \"0123456789abcdef\"\nauth_token_file = \"token\"\n[[models]]\nname = \"m\"\npath = \"m.onnx\"\n",
        );
        assert!(both.starts_with("server.auth_token_file: give `server.auth_token` or this, not both"), "{both}");
        let missing = err("[server]\nauth_token_file = \"nowhere\"\n[[models]]\nname = \"m\"\npath = \"m.onnx\"\n");
        assert!(missing.starts_with("server.auth_token_file: cannot read") && missing.contains("nowhere"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
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

    #[test]
    fn secrets_do_not_leave_the_box_in_clear_unless_allowed() {
        let esc = |url: &str, extra: &str| {
            format!(
                "{ONE}[models.escalation]\ncentral_url = \"{url}\"\ncentral_model = \"c\"\nthreshold = 0.9\n\
                 central_token = \"t0123456789\"\n{extra}"
            )
        };
        let e = err(&esc("http://central.example:8001", ""));
        assert!(e.starts_with("models[0].escalation.central_token: would be sent in clear to central.example"), "{e}");
        assert!(parse(&esc("http://central.example:8001", "allow_plaintext_token = true\n")).is_ok());
        for local in ["http://127.0.0.1:8001", "http://localhost:8001", "http://[::1]:8001"] {
            assert!(parse(&esc(local, "")).is_ok(), "{local}");
        }

        let dir = std::env::temp_dir().join(format!("outpost-config-plain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("password"), "secret\n").unwrap();
        let mqtt = |broker: &str, extra: &str| {
            let text = format!(
                "{ONE}[updates]\nstate_dir = \"s\"\nfleet = \"f\"\n[updates.mqtt]\nbroker = \"{broker}\"\n\
                 device_id = \"d1\"\npassword_file = \"password\"\n{extra}"
            );
            let file = dir.join("outpost.toml");
            std::fs::write(&file, text).unwrap();
            Config::read(&file).unwrap().validate().map_err(|e| e.to_string())
        };
        let e = mqtt("broker.example:1883", "").unwrap_err();
        assert!(e.starts_with("updates.mqtt.password_file: would be sent in clear to broker.example"), "{e}");
        assert!(mqtt("broker.example:1883", "allow_plaintext_password = true\n").is_ok());
        assert!(mqtt("127.0.0.1:1883", "").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
