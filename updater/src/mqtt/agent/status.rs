//! The agent's connection status, for the local status API (the update's status is part of
//! the state report: `crate::mqtt::report`).

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectionStatus {
    pub connected: bool,
    pub connects: u64,
    pub failures: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_retry_ms: Option<u64>,
}
