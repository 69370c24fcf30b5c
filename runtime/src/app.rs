//! The server's shared state: the models and the server's limits, and the update service and
//! MQTT agent once they start.

use std::sync::{Arc, OnceLock};

use crate::budget::Budget;
use crate::escalation::Sink;
use crate::registry::Registry;
use crate::{config, releases};

/// Everything a request handler needs: the models and the server's limits.
pub struct App {
    pub registry: Arc<Registry>,
    pub max_body_bytes: usize,
    /// The bytes all requests in flight may hold together.
    pub inflight: Budget,
    /// Inference requests in the server now, from their handler's start to its end: one alone
    /// may run its call inline ([`crate::executor`]).
    pub infer_requests: std::sync::atomic::AtomicUsize,
    pub auth_token: Option<String>,
    /// Host names besides addresses and `localhost` requests may name (`server.allowed_hosts`).
    pub allowed_hosts: Vec<String>,
    /// Where uploaded hard examples go; `None`: this server does not collect them.
    pub hard_example_sink: Option<Arc<Sink>>,
    /// Signed releases, when `[updates]` is configured and the store is open.
    pub updates: OnceLock<Arc<releases::ReleaseService>>,
    /// The MQTT agent, when `[updates.mqtt]` is configured (started once models are ready).
    pub agent: OnceLock<outpost_updater::mqtt::agent::Agent>,
    /// Set while the start has yet to serve the active release (its models load after the
    /// configured ones): the server is not ready until they serve, or until they fail to.
    pub release_pending: std::sync::atomic::AtomicBool,
}

impl App {
    /// The server state for a validated configuration (models not yet loaded).
    pub fn new(config: &config::Validated) -> Arc<App> {
        #[cfg(feature = "ort")]
        if let Some(path) = &config.ort_library {
            crate::backend::ort::set_library(path);
        }
        Arc::new(App {
            registry: Arc::new(Registry::new(config.models.clone())),
            max_body_bytes: config.max_body_bytes,
            inflight: Budget::new(config.max_inflight_bytes),
            infer_requests: std::sync::atomic::AtomicUsize::new(0),
            auth_token: config.auth_token.clone(),
            allowed_hosts: config.allowed_hosts.clone(),
            hard_example_sink: config.hard_example_sink.clone().map(|dir| {
                Arc::new(Sink::new(dir, config.hard_example_sink_max_items, config.hard_example_sink_max_bytes))
            }),
            updates: OnceLock::new(),
            agent: OnceLock::new(),
            release_pending: Default::default(),
        })
    }
}
