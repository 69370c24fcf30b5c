//! The device's retained `state` report, as one type: the agent (runtime or simulator) writes
//! it, the console reads it. Every field a newer or older device may leave out has a default,
//! and fields this version does not know are ignored, so a mixed fleet reports to one console.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a device's update stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateState {
    #[default]
    Idle,
    /// Checking an offer against the trusted root, before a byte is fetched.
    Verifying,
    Downloading,
    /// Staging, health-checking and activating the downloaded release.
    Applying,
    /// The transfer failed for now; it is retried (`retry_in_secs`).
    Failed,
    /// The offer was refused for good in this device's trusted state.
    Refused,
    /// A state a newer agent reports that this version does not know.
    #[serde(other)]
    Unknown,
}

impl UpdateState {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::Idle => "idle",
            UpdateState::Verifying => "verifying",
            UpdateState::Downloading => "downloading",
            UpdateState::Applying => "applying",
            UpdateState::Failed => "failed",
            UpdateState::Refused => "refused",
            UpdateState::Unknown => "unknown",
        }
    }
}

/// The whole retained report. The offline will carries only `device`, `fleet` and `online`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StateReport {
    pub device: String,
    pub fleet: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub online: bool,
    /// The active release (none before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseRef>,
    /// The candidate release, staged and running as shadows (none when there is none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<ReleaseRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateStatus>,
    #[serde(flatten)]
    pub body: DeviceReport,
    /// Counts up by one per report of this process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

impl StateReport {
    /// The retained message a device leaves when it goes (and the broker's will for it).
    pub fn offline(device: &str, fleet: &str) -> StateReport {
        StateReport { device: device.into(), fleet: fleet.into(), online: false, ..StateReport::default() }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRef {
    pub id: String,
    pub number: u64,
}

/// The device's own part of its report: what runs and how it does.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceReport {
    /// The program and its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelReport>,
    /// Requests since the previous report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<StatsReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModelReport {
    pub name: String,
    #[serde(default)]
    pub versions: Vec<String>,
    /// READY, LOADING, UNAVAILABLE, FAILED (the V2 repository index's states).
    #[serde(default)]
    pub state: String,
    /// Drift of each served version that ships a reference profile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<ModelDrift>,
    /// The shadow candidate run beside the model, when one is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ModelShadow>,
}

/// A shadow candidate compared with the model serving, since the candidate loaded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelShadow {
    /// The candidate's version label.
    pub candidate: String,
    /// Sampled requests compared, failed, and skipped for the candidate's rate or in-flight bound.
    #[serde(default)]
    pub compared: u64,
    #[serde(default)]
    pub failed: u64,
    #[serde(default)]
    pub skipped: u64,
    /// Rows compared, and the share whose top class agrees with the active model's.
    #[serde(default)]
    pub rows: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    /// Mean absolute difference of the class scores per row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_abs_diff: Option<f64>,
    /// The candidate's call, median and 99th percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// A served version's drift against its reference profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelDrift {
    pub version: String,
    /// Windows closed since the version loaded, and those whose score passed the threshold.
    #[serde(default)]
    pub windows: u64,
    #[serde(default)]
    pub alerts: u64,
    #[serde(default)]
    pub threshold: f64,
    /// The last closed window's population stability index per signal (`confidence`, `class`,
    /// `input:NAME`); empty until a window closes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub psi: BTreeMap<String, f64>,
}

/// Request figures over one report interval (per model in `models`, keyed `name/version`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatsReport {
    pub count: u64,
    #[serde(default)]
    pub failures: u64,
    #[serde(default)]
    pub rejected: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// Escalated among the answers that were decided (none decided: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation_rate: Option<f64>,
    #[serde(default)]
    pub central_failures: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_confidence: Option<f64>,
    /// Set by the simulator: the figures are not a model's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub simulated: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, StatsReport>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load1: Option<f64>,
    #[serde(default)]
    pub uptime_secs: u64,
}

/// The update state machine, as reported.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    /// The offer this state is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<OfferRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ErrorReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied: Option<AppliedReport>,
    /// Chunk replies the transfer had no room for (since the process started).
    #[serde(default)]
    pub dropped_replies: u64,
}

/// An offer: the release it names and which of the console's offers of it this is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferRef {
    pub id: String,
    /// None when the offer's release document could not be read.
    #[serde(default)]
    pub number: Option<u64>,
    #[serde(default)]
    pub attempt: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorReport {
    pub kind: String,
    pub reason: String,
    #[serde(default)]
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
}

/// The last release applied, and what it took.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppliedReport {
    pub number: u64,
    pub release: String,
    /// Each model and the version it now serves.
    #[serde(default)]
    pub models: Vec<(String, String)>,
    #[serde(default)]
    pub download_ms: u64,
    #[serde(default)]
    pub apply_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Progress>,
    #[serde(default)]
    pub at: String,
}

impl AppliedReport {
    /// The report of a release applied (or a candidate promoted) now.
    pub fn of(applied: crate::apply::Applied, download_ms: u64, transfer: Option<Progress>) -> AppliedReport {
        AppliedReport {
            number: applied.number,
            release: applied.release,
            models: applied.models,
            download_ms,
            apply_ms: applied.millis,
            transfer,
            at: crate::time::format(std::time::SystemTime::now()),
        }
    }
}

/// Progress of the current transfer. `chunks_resumed` were found on disk (earlier attempt or
/// process); `chunks_fetched` arrived in this attempt; each chunk is written once.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offline_will_round_trips_with_nothing_but_its_three_fields() {
        let doc = serde_json::to_value(StateReport::offline("d1", "f")).unwrap();
        assert_eq!(doc, serde_json::json!({"device": "d1", "fleet": "f", "online": false}));
        let back: StateReport = serde_json::from_value(doc).unwrap();
        assert!(!back.online && back.update.is_none() && back.release.is_none());
    }

    #[test]
    fn an_update_state_this_version_does_not_know_reads_as_unknown() {
        let u: UpdateStatus = serde_json::from_str(r#"{"state": "rebooting", "novel": 1}"#).unwrap();
        assert_eq!(u.state, UpdateState::Unknown);
        let u: UpdateStatus = serde_json::from_str(r#"{"state": "applying"}"#).unwrap();
        assert_eq!(u.state.as_str(), "applying");
    }

    #[test]
    fn a_field_of_the_wrong_type_is_an_error_naming_it() {
        let e = serde_json::from_str::<StateReport>(r#"{"device": "d", "fleet": "f", "online": "yes"}"#).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
    }
}
