//! Outpost's local inference runtime.
//!
//! `outpost` loads ONNX models on a [`Backend`](backend::Backend), puts a bounded queue and worker
//! threads in front of each ([`model`]), and answers the KServe V2 HTTP API ([`http`], its wire
//! format in [`v2`]). Everything
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
pub mod app;
pub mod backend;
pub mod batch_choice;
pub mod batcher;
pub mod budget;
pub mod choice;
pub mod config;
pub mod drift;
pub mod error;
pub mod escalation;
pub mod executor;
pub mod golden;
pub mod http;
pub mod model;
pub mod onnx;
pub mod registry;
pub mod releases;
pub mod repository;
pub mod server;
pub mod shadow;
pub mod shapes;
pub mod stats;
#[cfg(target_os = "linux")]
pub mod systemd;
pub mod tensor;
pub mod threads;
pub mod v2;
mod warm_up;

pub use app::App;
pub use error::Error;
