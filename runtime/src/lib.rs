//! Outpost's local inference runtime.
//!
//! `outpost` loads ONNX models on a [`Backend`](backend::Backend), puts a bounded queue and worker
//! threads in front of each ([`model`]), and answers the KServe V2 HTTP API ([`v2`]). Everything
//! the daemon does is here so tests can drive it without spawning a process:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use outpost_runtime::{App, config::Config};
//! let config = Config::from_model_dir("models".as_ref())?.validate()?;
//! let app = App::new(&config);
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! let load = app.clone();
//! tokio::task::spawn_blocking(move || load.registry.load_all());
//! outpost_runtime::server::serve(listener, app, std::future::pending()).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod agent;
pub mod backend;
pub mod batcher;
pub mod config;
pub mod escalation;
pub mod golden;
pub mod model;
pub mod onnx;
pub mod registry;
pub mod repository;
pub mod server;
pub mod shapes;
pub mod stats;
#[cfg(target_os = "linux")]
pub mod systemd;
pub mod tensor;
pub mod update;
pub mod v2;

use std::sync::Arc;

/// Everything a request handler needs: the models and the server's limits.
pub struct App {
    pub registry: registry::Registry,
    pub max_body_bytes: usize,
    pub auth_token: Option<String>,
    /// Where uploaded hard examples go; `None`: this server does not collect them.
    pub hard_example_sink: Option<std::path::PathBuf>,
    /// Signed releases, when `[updates]` is configured and the store is open.
    pub updates: std::sync::OnceLock<Arc<update::Updates>>,
    /// The MQTT agent, when `[updates.mqtt]` is configured (started once models are ready).
    pub agent: std::sync::OnceLock<outpost_updater::mqtt::agent::Agent>,
}

impl App {
    /// The server state for a validated configuration (models not yet loaded).
    pub fn new(config: &config::Validated) -> Arc<App> {
        #[cfg(feature = "ort")]
        if let Some(path) = &config.ort_library {
            backend::ort::set_library(path);
        }
        Arc::new(App {
            registry: registry::Registry::new(config.models.clone()),
            max_body_bytes: config.max_body_bytes,
            auth_token: config.auth_token.clone(),
            hard_example_sink: config.hard_example_sink.clone(),
            updates: std::sync::OnceLock::new(),
            agent: std::sync::OnceLock::new(),
        })
    }
}

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
}
