//! What the console's HTTP handlers share: the database, the blob store, the trusted roots.

use crate::console::db::Connection;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use outpost_updater::mqtt::blobserver::ServerStats;

use super::catalog;

/// What the HTTP handlers share.
pub struct Console {
    pub db: Mutex<Connection>,
    pub objects: PathBuf,
    pub roots: catalog::Roots,
    pub token: String,
    pub blob_stats: Arc<ServerStats>,
    pub bad_states: std::sync::atomic::AtomicU64,
    /// Set once the state subscriptions are acknowledged (the retained states follow).
    pub states_ready: std::sync::atomic::AtomicBool,
    /// This console's name in the rollout lease (its MQTT client id prefix).
    pub holder: String,
    /// Whether this console holds the lease: [`LEASE_UNKNOWN`], [`LEASE_HELD`] or [`LEASE_ELSEWHERE`].
    pub lease: std::sync::atomic::AtomicU8,
}

/// Not asked yet (the console has just started): states are recorded.
pub const LEASE_UNKNOWN: u8 = 0;
/// This console steps rollouts and records states.
pub const LEASE_HELD: u8 = 1;
/// Another console does: this one serves the API, the page and chunks only.
pub const LEASE_ELSEWHERE: u8 = 2;

impl Console {
    pub fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }
}
