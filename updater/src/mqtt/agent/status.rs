//! The agent's status as it reports it: the connection, the update and its progress.

use serde::Serialize;
use serde_json::Value;

/// Progress of the current transfer. `chunks_resumed` were found on disk (earlier attempt or
/// process); `chunks_fetched` arrived in this attempt; each chunk is written once.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Progress {
    pub objects: usize,
    pub delta_objects: usize,
    pub full_objects: usize,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub chunks_resumed: u64,
    pub chunks_fetched: u64,
    pub chunks_retried: u64,
    pub chunks_corrupt: u64,
    pub unrequested: u64,
    /// Chunk requests sent: one per missing chunk, plus `chunks_retried` (timeouts, bad chunks,
    /// server errors), plus `reasked` (in flight when the link dropped). A chunk once written
    /// is never asked for again.
    pub requests: u64,
    pub reasked: u64,
    /// Answers to a chunk already in (a request asked twice, both answered).
    pub duplicates: u64,
    pub bytes_received: u64,
    pub millis: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ErrorReport {
    pub kind: String,
    pub reason: String,
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
}

/// The update state machine, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct UpdateStatus {
    /// idle, verifying, downloading, applying, failed, refused.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ErrorReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_applied: Option<Value>,
}

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
