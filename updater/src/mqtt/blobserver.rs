//! The blob server: answers chunk requests from content-addressed directories. It holds no
//! state per device, so any number of instances share a fleet through an MQTT 5 shared
//! subscription; the broker hands each request to one of them.
//!
//! It trusts nothing it is asked: the object must be a SHA-256 name found in one of its
//! directories (as `NAME`, `blobs/NAME` or `deltas/NAME`), the range must lie inside the file
//! and be at most `max_chunk` bytes, and the reply goes only to the requesting device's own
//! reply topic.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};
use tokio::sync::mpsc;

use super::chunks::{ChunkReply, ChunkRequest, MAX_REQUEST_BYTES};
use super::{Backoff, BrokerConfig, chunk_request_filter, reply_topic_for};
use crate::release::CHUNK_SIZES;
use crate::release_dir::ReleaseDir;

#[derive(Clone, Debug)]
pub struct BlobServerConfig {
    pub broker: BrokerConfig,
    pub prefix: String,
    /// The fleets served (one shared subscription each).
    pub fleets: Vec<String>,
    pub share_group: String,
    pub dirs: Vec<PathBuf>,
}

/// What a server has done, for its log and its tests.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub served: AtomicU64,
    pub bytes: AtomicU64,
    pub refused: AtomicU64,
    pub dropped: AtomicU64,
}

impl BlobServerConfig {
    fn find(&self, object: &str) -> Option<PathBuf> {
        self.dirs
            .iter()
            .find_map(|d| Some(d.join(object)).filter(|p| p.is_file()).or_else(|| ReleaseDir(d).find(object)))
    }

    /// The answer to one request.
    pub fn answer(&self, req: &ChunkRequest) -> Result<Bytes, String> {
        if req.length as u64 > *CHUNK_SIZES.end() {
            return Err(format!("chunk of {} bytes is over {}", req.length, CHUNK_SIZES.end()));
        }
        let path = self.find(&req.object).ok_or("no such object")?;
        let file = std::fs::File::open(&path).map_err(|e| format!("object unreadable: {}", e.kind()))?;
        let len = file.metadata().map_err(|e| e.kind().to_string())?.len();
        let end =
            req.offset.checked_add(req.length as u64).filter(|end| *end <= len).ok_or("range outside the object")?;
        let mut buf = vec![0u8; (end - req.offset) as usize];
        file.read_exact_at(&mut buf, req.offset).map_err(|e| format!("object unreadable: {}", e.kind()))?;
        Ok(buf.into())
    }
}

/// Serves until the connection task ends (never, on its own: it reconnects with backoff).
pub async fn serve(cfg: BlobServerConfig, stats: Arc<ServerStats>) -> Result<(), String> {
    // Requests are small: the broker is told to drop anything larger before it reaches us.
    let mut broker = cfg.broker.clone();
    broker.max_packet = 4096;
    let (client, mut eventloop) = AsyncClient::new(broker.options()?, 256);
    let (tx, mut rx) = mpsc::channel::<(String, Bytes)>(1024);
    let filters: Vec<String> =
        cfg.fleets.iter().map(|f| chunk_request_filter(&cfg.prefix, f, &cfg.share_group)).collect();
    let sub_client = client.clone();
    let broker = cfg.broker.clone();
    tokio::spawn(async move {
        let mut backoff = Backoff::new(std::time::Duration::from_millis(200), std::time::Duration::from_secs(30));
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    tracing::info!(broker = %format!("{}:{}", broker.host, broker.port), ?filters, "blob server connected");
                    for filter in &filters {
                        if let Err(e) = sub_client.try_subscribe(filter.as_str(), QoS::AtLeastOnce) {
                            tracing::warn!(error = %e, "subscribe not queued");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => super::check_suback(&ack),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    // Never wait here: this task must keep polling the connection. Requests
                    // beyond the queue are dropped; their devices ask again.
                    if p.payload.len() > MAX_REQUEST_BYTES {
                        continue;
                    }
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send((topic, p.payload)) {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "blob server lost the broker");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    });
    while let Some((topic, payload)) = rx.recv().await {
        let Some(reply_topic) = reply_topic_for(&topic) else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let req = match ChunkRequest::parse(&payload) {
            Ok(r) => r,
            Err(e) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(topic, error = %e, "bad chunk request ignored");
                continue;
            }
        };
        let result = cfg.answer(&req);
        match &result {
            Ok(data) => {
                stats.served.fetch_add(1, Ordering::Relaxed);
                stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        let reply = ChunkReply { id: req.id, object: req.object, offset: req.offset, result };
        // A reply that cannot be queued (the broker away or slow) is dropped: the device asks
        // again after its timeout. Waiting here could stall the connection task's queue.
        if client.try_publish(reply_topic, QoS::AtLeastOnce, false, reply.encode()).is_err() {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}
