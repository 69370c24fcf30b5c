//! The `[updates]` section: the release store, the device's identity, and `[updates.mqtt]`
//! validated into the MQTT agent's settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use outpost_updater::mqtt::agent::AgentConfig;
use outpost_updater::mqtt::{BrokerConfig, DEFAULT_PREFIX, Topics, valid_id};

use serde::Deserialize;

/// `[updates]`: the on-disk store of signed releases and the device's identity. The active
/// release's models are served at start, in place of configured models of the same name.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdatesConfig {
    /// The store (blobs, documents, the trusted state); e.g. /var/lib/outpost.
    pub state_dir: PathBuf,
    /// The fleet and group this device belongs to; releases for others are refused.
    pub fleet: String,
    #[serde(default = "default_group")]
    pub group: String,
    /// Pull releases over MQTT (`[updates.mqtt]`).
    pub mqtt: Option<MqttConfig>,
}

fn default_group() -> String {
    "default".into()
}

/// `[updates.mqtt]`: the agent that hears this device's desired release, downloads it in
/// chunks and reports state. Durations in seconds unless the name says otherwise.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `host:port` (port 1883, or 8883 with `ca_file`, when missing).
    pub broker: String,
    /// This device's id: its MQTT client id, its topics, and by default its user name.
    pub device_id: String,
    pub username: Option<String>,
    /// A file holding the MQTT password (kept out of this file, which is often world-readable).
    pub password_file: Option<PathBuf>,
    /// Connect with TLS, trusting only this CA (PEM).
    pub ca_file: Option<PathBuf>,
    /// Send the password to a broker off loopback without TLS (in clear) all the same.
    #[serde(default)]
    pub allow_plaintext_password: bool,
    pub topic_prefix: Option<String>,
    pub report_interval_secs: Option<u64>,
    pub keep_alive_secs: Option<u64>,
    /// Chunk requests in flight at once (default 4).
    pub chunk_window: Option<usize>,
    pub chunk_timeout_secs: Option<u64>,
    /// Tries per chunk before the download fails (default 5).
    pub chunk_tries: Option<u32>,
    /// Download cap (default: none).
    pub max_bytes_per_second: Option<u64>,
    /// Minimum throughput over `watchdog_secs` before the download fails (default 64 B/s over 60 s).
    pub min_bytes_per_second: Option<u64>,
    pub watchdog_secs: Option<u64>,
    pub reconnect_min_ms: Option<u64>,
    pub reconnect_max_secs: Option<u64>,
    /// First wait after a failed download (doubling per attempt), and the attempts per offer.
    pub retry_after_secs: Option<u64>,
    pub max_attempts: Option<u32>,
    /// Labels reported in `state` (say `site = "berlin"`, `ring = "canary"`): the console's
    /// rollouts can select devices by them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The agent's settings from the config (password not read yet: see [`read_password`]).
/// Errors name the key under `updates.mqtt`.
pub fn agent_config(u: &UpdatesConfig, m: &MqttConfig) -> Result<AgentConfig, (&'static str, String)> {
    fn range<T: PartialOrd + std::fmt::Display + Copy>(
        key: &'static str,
        v: Option<T>,
        default: T,
        lo: T,
        hi: T,
    ) -> Result<T, (&'static str, String)> {
        let v = v.unwrap_or(default);
        if v < lo || v > hi {
            return Err((key, format!("must be between {lo} and {hi}")));
        }
        Ok(v)
    }
    if !valid_id(&m.device_id) {
        return Err(("device_id", "letters, digits, - _ . only (at most 64)".into()));
    }
    let prefix = m.topic_prefix.clone().unwrap_or_else(|| DEFAULT_PREFIX.into());
    if prefix.is_empty() || prefix.contains(['+', '#']) || prefix.starts_with('$') {
        return Err(("topic_prefix", "a topic without wildcards, not starting with $".into()));
    }
    let mut broker = BrokerConfig::new(&m.broker, &m.device_id, m.ca_file.clone()).map_err(|e| ("broker", e))?;
    broker.username = Some(m.username.clone().unwrap_or_else(|| m.device_id.clone()));
    broker.keep_alive = Duration::from_secs(range("keep_alive_secs", m.keep_alive_secs, 30, 5, 3600)?);
    let max_bps = m.max_bytes_per_second.unwrap_or(0);
    let min_bps = range("min_bytes_per_second", m.min_bytes_per_second, 64, 0, 1 << 30)?;
    if max_bps != 0 && max_bps < min_bps.max(64) {
        return Err((
            "max_bytes_per_second",
            format!("0 (no cap) or at least min_bytes_per_second and 64, not {max_bps}"),
        ));
    }
    let reconnect_min = range("reconnect_min_ms", m.reconnect_min_ms, 500, 10, 600_000)?;
    let reconnect_max = range("reconnect_max_secs", m.reconnect_max_secs, 60, 1, 3600)?;
    Ok(AgentConfig {
        broker,
        device_id: m.device_id.clone(),
        fleet: u.fleet.clone(),
        group: u.group.clone(),
        topics: Topics::new(&prefix, &u.fleet),
        downloads: u.state_dir.join("downloads"),
        report_interval: Duration::from_secs(range("report_interval_secs", m.report_interval_secs, 60, 1, 86_400)?),
        window: range("chunk_window", m.chunk_window, 4, 1, 64)?,
        chunk_timeout: Duration::from_secs(range("chunk_timeout_secs", m.chunk_timeout_secs, 10, 1, 600)?),
        chunk_tries: range("chunk_tries", m.chunk_tries, 5, 1, 100)?,
        max_bytes_per_second: max_bps,
        min_bytes_per_second: min_bps,
        watchdog_window: Duration::from_secs(range("watchdog_secs", m.watchdog_secs, 60, 1, 3600)?),
        reconnect_min: Duration::from_millis(reconnect_min),
        reconnect_max: Duration::from_secs(reconnect_max),
        retry_after: Duration::from_secs(range("retry_after_secs", m.retry_after_secs, 60, 1, 86_400)?),
        max_attempts: range("max_attempts", m.max_attempts, 5, 1, 1000)?,
    })
}
