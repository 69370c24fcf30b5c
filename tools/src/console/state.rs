//! What the console's HTTP handlers share: the database, the blob store, the trusted roots.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use outpost_updater::mqtt::blobserver::ServerStats;
use rusqlite::Connection;

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
}

impl Console {
    pub fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }
}
