//! The agent's settings.

use std::path::PathBuf;
use std::time::Duration;

use crate::mqtt::{BrokerConfig, Topics};

/// Settings of the agent (the runtime's `[mqtt]` section).
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub broker: BrokerConfig,
    pub device_id: String,
    pub fleet: String,
    pub group: String,
    pub topics: Topics,
    /// Where downloads are kept until applied (resumable across restarts).
    pub downloads: PathBuf,
    pub report_interval: Duration,
    /// Chunk requests in flight at once.
    pub window: usize,
    pub chunk_timeout: Duration,
    /// Tries per chunk (timeouts, bad chunks, server errors) before the transfer fails.
    pub chunk_tries: u32,
    /// Download cap in bytes per second (0: none).
    pub max_bytes_per_second: u64,
    /// The transfer fails when less than this arrives per second over `watchdog_window`.
    pub min_bytes_per_second: u64,
    pub watchdog_window: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Wait after a failed transfer before the next try (doubling), and how many tries.
    pub retry_after: Duration,
    pub max_attempts: u32,
}
