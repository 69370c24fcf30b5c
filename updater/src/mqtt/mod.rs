//! Outpost over MQTT 5: the device agent (desired release in, state out, blobs pulled in
//! chunks), the blob server and the publisher. Topics, under a prefix (default `outpost/v1`):
//!
//! ```text
//! {prefix}/{fleet}/devices/{id}/desired         retained offer (signed release + roots); console writes
//! {prefix}/{fleet}/devices/{id}/state           retained report; the device writes, its will marks it offline
//! {prefix}/{fleet}/devices/{id}/blobs/request   chunk requests; the device writes
//! {prefix}/{fleet}/devices/{id}/blobs/reply     chunk replies; blob servers write
//! ```
//!
//! Blob servers take a fleet's requests through the shared subscription
//! `$share/{group}/{prefix}/{fleet}/devices/+/blobs/request`, so several share one fleet, and reply
//! on the requesting device's own reply topic (derived from the request topic, which the broker
//! lets only that device write), so a device can read only its own replies.

pub mod agent;
pub mod blobserver;
pub mod chunks;
pub mod partial;
pub mod publish;
pub mod report;

use std::path::PathBuf;
use std::time::Duration;

use rumqttc::v5::MqttOptions;

use crate::offer::MAX_OFFER_BYTES;

/// The default topic prefix.
pub const DEFAULT_PREFIX: &str = "outpost/v1";

/// Largest MQTT packet Outpost accepts (advertised to the broker, which then never sends more):
/// an offer, or a chunk of the largest allowed size, plus headers.
pub const MAX_PACKET_BYTES: u32 = (MAX_OFFER_BYTES + 4096) as u32;

/// Publishes awaiting their acknowledgement, at most (per connection).
pub const MAX_INFLIGHT: u16 = 256;

/// Topics of one fleet.
#[derive(Clone, Debug)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, fleet: &str) -> Topics {
        Topics { base: format!("{}/{fleet}", prefix.trim_end_matches('/')) }
    }
    pub fn desired(&self, id: &str) -> String {
        format!("{}/devices/{id}/desired", self.base)
    }
    pub fn state(&self, id: &str) -> String {
        format!("{}/devices/{id}/state", self.base)
    }
    pub fn chunk_request(&self, id: &str) -> String {
        format!("{}/devices/{id}/blobs/request", self.base)
    }
    pub fn chunk_reply(&self, id: &str) -> String {
        format!("{}/devices/{id}/blobs/reply", self.base)
    }
}

/// The blob servers' shared subscription to a fleet's chunk requests.
pub fn chunk_request_filter(prefix: &str, fleet: &str, share_group: &str) -> String {
    format!("$share/{share_group}/{}/{fleet}/devices/+/blobs/request", prefix.trim_end_matches('/'))
}

/// The reply topic for a request topic (`.../devices/{id}/blobs/request` → `.../reply`).
pub fn reply_topic_for(request_topic: &str) -> Option<String> {
    let base = request_topic.strip_suffix("/blobs/request")?;
    let (_, id) = base.rsplit_once("/devices/")?;
    valid_id(id).then(|| format!("{base}/blobs/reply"))
}

/// Device ids, fleets and share groups: letters, digits, `-`, `_`, `.`; never MQTT wildcards
/// or separators, so an id can only ever name its own topics.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// How to reach the broker.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS, trusting only this CA (PEM); none: plain TCP.
    pub ca_file: Option<PathBuf>,
    pub keep_alive: Duration,
    /// Largest packet accepted (advertised to the broker, which drops larger ones for us).
    pub max_packet: u32,
}

impl BrokerConfig {
    /// Parses `host:port` (port 1883 when missing, 8883 with a CA).
    pub fn new(address: &str, client_id: &str, ca_file: Option<PathBuf>) -> Result<BrokerConfig, String> {
        let default_port = if ca_file.is_some() { 8883 } else { 1883 };
        let (host, port) = match address.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("broker `{address}`: bad port"))?),
            None => (address, default_port),
        };
        if host.is_empty() {
            return Err(format!("broker `{address}`: no host"));
        }
        Ok(BrokerConfig {
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port,
            client_id: client_id.to_owned(),
            username: None,
            password: None,
            ca_file,
            keep_alive: Duration::from_secs(30),
            max_packet: MAX_PACKET_BYTES,
        })
    }

    /// rumqttc options: MQTT 5, clean start (subscriptions are renewed at every connect and the
    /// retained `desired` comes again), the packet limit raised to fit an offer or a chunk.
    pub fn options(&self) -> Result<MqttOptions, String> {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_keep_alive(self.keep_alive);
        o.set_clean_start(true);
        o.set_max_packet_size(Some(self.max_packet));
        // rumqttc sizes its table of unacknowledged publishes by this limit up front, u16::MAX
        // by default: about 14 MB per connection. Outpost never has more than a window of
        // chunk requests and a report or two in flight.
        o.set_outgoing_inflight_upper_limit(MAX_INFLIGHT);
        o.set_connection_timeout(10);
        // Chunk requests and replies are small, latency-bound exchanges: no Nagle delay.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(10);
        o.set_network_options(net);
        if let Some(user) = &self.username {
            o.set_credentials(user, self.password.clone().unwrap_or_default());
        }
        if let Some(ca) = &self.ca_file {
            let tls = crate::tls::client_config(Some(ca)).map_err(|e| format!("broker TLS: {e}"))?;
            o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.into())));
        }
        Ok(o)
    }
}

/// Logs subscriptions the broker refused (an ACL that does not grant them): without this, a
/// refused subscription would look like a quiet topic.
pub fn check_suback(ack: &rumqttc::v5::mqttbytes::v5::SubAck) {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
    for code in &ack.return_codes {
        if !matches!(code, SubscribeReasonCode::Success(_)) {
            tracing::error!(?code, "the broker refused a subscription (check its ACL)");
        }
    }
}

/// Exponential backoff with jitter: each wait is drawn from [d/2, d] where d doubles from `min`
/// up to `max`, so a fleet that lost its broker does not reconnect in lockstep.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max: max.max(min), attempt: 0 }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.min.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        half + half.mul_f64(random_unit())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// A uniform random number in [0, 1).
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_reply_routing() {
        let t = Topics::new("outpost/v1/", "demo");
        assert_eq!(t.desired("d1"), "outpost/v1/demo/devices/d1/desired");
        assert_eq!(reply_topic_for(&t.chunk_request("d1")).as_deref(), Some(t.chunk_reply("d1").as_str()));
        assert_eq!(reply_topic_for("outpost/v1/demo/devices/+/blobs/request"), None);
        assert_eq!(reply_topic_for("outpost/v1/demo/devices/d1/state"), None);
        assert_eq!(
            chunk_request_filter("outpost/v1", "demo", "blobs"),
            "$share/blobs/outpost/v1/demo/devices/+/blobs/request"
        );
        assert!(!valid_id("a/b") && !valid_id("#") && !valid_id("") && valid_id("edge-01.x_y"));
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits[3] >= Duration::from_millis(400) && waits[3] <= Duration::from_millis(800));
        assert!(waits[5..].iter().all(|w| *w >= Duration::from_millis(500) && *w <= Duration::from_secs(1)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn broker_addresses() {
        let b = BrokerConfig::new("127.0.0.1:1884", "d1", None).unwrap();
        assert_eq!((b.host.as_str(), b.port), ("127.0.0.1", 1884));
        assert_eq!(BrokerConfig::new("broker", "d1", Some("ca.pem".into())).unwrap().port, 8883);
        assert!(BrokerConfig::new("broker:x", "d1", None).is_err());
        assert!(BrokerConfig::new(":1883", "d1", None).is_err());
    }
}
