//! The device agent: hears its retained `desired` offer, verifies it before fetching a byte,
//! pulls what the store lacks in chunks (a delta when it holds the base), applies it through
//! the same health-gated path as a release directory, and reports a retained `state`.
//!
//! Three tasks share one MQTT connection: the connection task (polls the event loop, routes
//! messages, reconnects with capped, jittered backoff), the update task (one offer at a time)
//! and the report task (on change, at most once a second, and every `report_interval`).
//! Nothing blocks on the broker: while it is away the device serves what it has, a transfer
//! pauses (its chunks stay on disk) and resumes when the broker is back.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::{AsyncClient, Event};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc, watch};

use super::chunks::{ChunkReply, ChunkRequest};
use super::partial::{Partial, WriteError};
use super::{Backoff, BrokerConfig, Topics};
use crate::Refusal;
use crate::apply::{Applied, Transfer, Updater};
use crate::offer::Offer;
use crate::release::ReleaseDoc;
use crate::time;

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

/// What the agent needs from the device.
pub trait Device: Send + Sync + 'static {
    /// Runs `f` with the device's updater (store and target), one caller at a time.
    fn with_updater<R>(&self, f: impl FnOnce(&Updater) -> R) -> R;
    /// Applies a release directory (verify, stage, health check, commit, activate).
    fn apply(&self, dir: &Path) -> Result<Applied, Refusal>;
    /// The device's part of its report: `runtime`, `models`, `stats` (since the last call),
    /// `resources`.
    fn report(&self) -> Map<String, Value>;
}

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

struct Shared<D> {
    cfg: AgentConfig,
    device: Arc<D>,
    client: AsyncClient,
    update: Mutex<UpdateStatus>,
    conn: Mutex<ConnectionStatus>,
    report_now: Notify,
    seq: AtomicU64,
    dropped_replies: AtomicU64,
    /// The largest reply the current transfer can use (0: no transfer).
    reply_max: AtomicU64,
    /// Set by [`Agent::shutdown`]: no more reports, offers or reconnects.
    stopping: AtomicBool,
}

/// Chunk replies queued between the connection and the transfer at most.
const REPLY_QUEUE: usize = 64;

/// A running agent.
pub struct Agent {
    view: Arc<dyn View>,
}

/// What the handle sees of the running agent (its device type erased).
trait View: Send + Sync {
    fn status(&self) -> Value;
    /// The client, state topic and offline payload, when connected.
    fn goodbye(&self) -> Option<(AsyncClient, String, Vec<u8>)>;
}

impl<D: Device> View for Shared<D> {
    fn status(&self) -> Value {
        json!({"connection": *lock(&self.conn), "update": *lock(&self.update)})
    }

    fn goodbye(&self) -> Option<(AsyncClient, String, Vec<u8>)> {
        self.stopping.store(true, Ordering::SeqCst);
        let c = &self.cfg;
        lock(&self.conn).connected.then(|| (self.client.clone(), c.topics.state(&c.device_id), offline_payload(c)))
    }
}

impl Agent {
    /// The connection and update status (for the local status API).
    pub fn status(&self) -> Value {
        self.view.status()
    }

    /// Says goodbye: a retained offline state, then a clean disconnect (so the will is not
    /// sent). Bounded by `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        if let Some((client, topic, payload)) = self.view.goodbye() {
            let bye = async {
                let _ = client.publish(topic, QoS::AtLeastOnce, true, payload).await;
                let _ = client.disconnect().await;
            };
            let _ = tokio::time::timeout(timeout, bye).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn offline_payload(cfg: &AgentConfig) -> Vec<u8> {
    serde_json::to_vec(&json!({"device": cfg.device_id, "fleet": cfg.fleet, "online": false})).expect("json")
}

/// Starts the agent's tasks on the current tokio runtime.
pub fn start<D: Device>(cfg: AgentConfig, device: Arc<D>) -> Result<Agent, String> {
    let mut options = cfg.broker.options()?;
    let will = LastWill::new(cfg.topics.state(&cfg.device_id), offline_payload(&cfg), QoS::AtLeastOnce, true, None);
    options.set_last_will(will);
    let (client, eventloop) = AsyncClient::new(options, 64);
    let shared = Arc::new(Shared {
        device,
        client,
        update: Mutex::new(UpdateStatus {
            state: "idle",
            release: None,
            progress: None,
            attempt: 0,
            retry_in_secs: None,
            last_error: None,
            last_applied: None,
        }),
        conn: Mutex::new(ConnectionStatus::default()),
        report_now: Notify::new(),
        seq: AtomicU64::new(0),
        dropped_replies: AtomicU64::new(0),
        reply_max: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        cfg,
    });
    let (desired_tx, desired_rx) = watch::channel::<Option<Bytes>>(None);
    let (connected_tx, connected_rx) = watch::channel(false);
    let (replies_tx, replies_rx) = mpsc::channel::<Bytes>(REPLY_QUEUE);
    tokio::spawn(run_connection(shared.clone(), eventloop, desired_tx, connected_tx, replies_tx));
    tokio::spawn(run_updates(shared.clone(), desired_rx, replies_rx, connected_rx.clone()));
    tokio::spawn(run_reports(shared.clone(), connected_rx));
    Ok(Agent { view: shared })
}

async fn run_connection<D: Device>(
    s: Arc<Shared<D>>,
    mut eventloop: rumqttc::v5::EventLoop,
    desired: watch::Sender<Option<Bytes>>,
    connected: watch::Sender<bool>,
    replies: mpsc::Sender<Bytes>,
) {
    let id = &s.cfg.device_id;
    let (desired_topic, reply_topic) = (s.cfg.topics.desired(id), s.cfg.topics.chunk_reply(id));
    let mut backoff = Backoff::new(s.cfg.reconnect_min, s.cfg.reconnect_max);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                {
                    let mut c = lock(&s.conn);
                    c.connected = true;
                    c.connects += 1;
                    c.next_retry_ms = None;
                }
                tracing::info!(broker = %format!("{}:{}", s.cfg.broker.host, s.cfg.broker.port), "MQTT connected");
                for topic in [&desired_topic, &reply_topic] {
                    if let Err(e) = s.client.try_subscribe(topic.as_str(), QoS::AtLeastOnce) {
                        tracing::warn!(error = %e, topic, "subscribe not queued");
                    }
                }
                connected.send_replace(true);
                s.report_now.notify_one();
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic == desired_topic.as_bytes() {
                    let offer = (!p.payload.is_empty()).then_some(p.payload);
                    desired.send_if_modified(|cur| {
                        let changed = *cur != offer;
                        *cur = offer;
                        changed
                    });
                } else if p.topic == reply_topic.as_bytes() {
                    // Only replies that could be a chunk of the transfer under way are queued
                    // (none when there is none), so queued replies never hold more than
                    // REPLY_QUEUE chunks of memory, whatever a server sends.
                    let max = s.reply_max.load(Ordering::Relaxed) as usize;
                    if p.payload.len() > max || replies.try_send(p.payload).is_err() {
                        s.dropped_replies.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => super::check_suback(&ack),
            Ok(_) => {}
            Err(_) if s.stopping.load(Ordering::SeqCst) => return,
            Err(e) => {
                connected.send_replace(false);
                let wait = backoff.next_delay();
                {
                    let mut c = lock(&s.conn);
                    c.connected = false;
                    c.failures += 1;
                    c.last_error = Some(e.to_string());
                    c.next_retry_ms = Some(wait.as_millis() as u64);
                }
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "MQTT connection lost or refused; serving on");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn run_reports<D: Device>(s: Arc<Shared<D>>, connected: watch::Receiver<bool>) {
    let mut last = Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(s.cfg.report_interval) => {}
            _ = s.report_now.notified() => {}
        }
        if let Some(wait) = Duration::from_secs(1).checked_sub(last.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if s.stopping.load(Ordering::SeqCst) {
            return;
        }
        if !*connected.borrow() {
            continue;
        }
        let s2 = s.clone();
        let Ok(doc) = tokio::task::spawn_blocking(move || s2.state_doc()).await else { continue };
        let topic = s.cfg.topics.state(&s.cfg.device_id);
        if let Err(e) = s.client.try_publish(topic, QoS::AtLeastOnce, true, serde_json::to_vec(&doc).expect("json")) {
            tracing::debug!(error = %e, "state report not queued");
        }
        last = Instant::now();
    }
}

/// Why a transfer stopped.
#[derive(Debug)]
enum Failure {
    /// A new offer arrived: start over with it.
    Superseded,
    Failed {
        kind: &'static str,
        reason: String,
    },
    /// The release itself cannot be transferred (no chunk hashes for a large object).
    Refused(Refusal),
}

fn failed(kind: &'static str, reason: impl Into<String>) -> Failure {
    Failure::Failed { kind, reason: reason.into() }
}

enum Outcome {
    Done,
    Superseded,
    Failed,
}

async fn run_updates<D: Device>(
    s: Arc<Shared<D>>,
    mut desired: watch::Receiver<Option<Bytes>>,
    mut replies: mpsc::Receiver<Bytes>,
    mut connected: watch::Receiver<bool>,
) {
    let mut pending = false;
    let mut attempts = 0u32;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        if !pending {
            let changed = match retry_at {
                Some(at) => tokio::select! {
                    r = desired.changed() => { if r.is_err() { return; } true }
                    _ = tokio::time::sleep_until(at) => false,
                },
                None => {
                    if desired.changed().await.is_err() {
                        return;
                    }
                    true
                }
            };
            if changed {
                attempts = 0;
            }
        }
        pending = false;
        retry_at = None;
        if s.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Some(bytes) = desired.borrow_and_update().clone() else {
            // The offer was withdrawn (an empty retained message): stop and say so.
            s.clean_downloads(None);
            s.set_state(|u| {
                u.state = "idle";
                u.progress = None;
                u.retry_in_secs = None;
            });
            continue;
        };
        attempts += 1;
        lock(&s.update).attempt = attempts;
        match s.handle(&bytes, &mut desired, &mut replies, &mut connected).await {
            Outcome::Done => attempts = 0,
            Outcome::Superseded => {
                pending = true;
                attempts = 0;
            }
            Outcome::Failed => {
                // Doubling from retry_after; past max_attempts, once an hour (a fleet's blob
                // servers may be down for a while: a device must not stay stuck until restarted).
                let hour = Duration::from_secs(3600);
                let wait = if attempts < s.cfg.max_attempts {
                    s.cfg.retry_after.saturating_mul(1 << (attempts - 1).min(10)).min(hour)
                } else {
                    tracing::warn!(attempts, "download keeps failing; trying again hourly");
                    hour
                };
                let wait = wait.mul_f64(0.75 + 0.25 * super::random_unit());
                lock(&s.update).retry_in_secs = Some(wait.as_secs());
                retry_at = Some(tokio::time::Instant::now() + wait);
                s.report_now.notify_one();
            }
        }
    }
}

/// An offer refused for good in this device's trusted state (kept across restarts, so a
/// retained offer is not examined again): keyed by the offer's exact bytes and the trusted root
/// and last release number, so neither another offer of the same release (say with junk roots
/// beside it) nor a change of the device's state inherits it.
#[derive(serde::Serialize, serde::Deserialize)]
struct RefusedRecord {
    key: String,
    release: String,
    kind: String,
    reason: String,
    at: String,
}

impl<D: Device> Shared<D> {
    fn set_state(&self, f: impl FnOnce(&mut UpdateStatus)) {
        f(&mut lock(&self.update));
        self.report_now.notify_one();
    }

    fn error_report(kind: &str, reason: &str, release: Option<&str>) -> ErrorReport {
        ErrorReport {
            kind: kind.into(),
            reason: reason.into(),
            at: time::format(SystemTime::now()),
            release: release.map(str::to_owned),
        }
    }

    fn refused_path(&self) -> PathBuf {
        self.cfg.downloads.join("refused.json")
    }

    fn refused_record(&self, key: &str) -> Option<RefusedRecord> {
        let bytes = std::fs::read(self.refused_path()).ok()?;
        serde_json::from_slice::<RefusedRecord>(&bytes).ok().filter(|r| r.key == key)
    }

    /// Reports a refusal; records it under `key` unless it may pass later without a new offer
    /// (the device not provisioned yet, its storage failing, its clock behind).
    fn refuse(&self, key: Option<&str>, id: Option<&str>, release: Option<Value>, r: &Refusal) {
        use crate::error::RefusalKind::{Expired, Missing, Storage};
        tracing::warn!(kind = r.kind.as_str(), reason = %r.detail, "offer refused; nothing changed");
        if let (Some(key), Some(id)) = (key, id)
            && !matches!(r.kind, Missing | Storage | Expired)
        {
            let rec = RefusedRecord {
                key: key.into(),
                release: id.into(),
                kind: r.kind.as_str().into(),
                reason: r.detail.clone(),
                at: time::format(SystemTime::now()),
            };
            let _ = std::fs::create_dir_all(&self.cfg.downloads);
            let _ = std::fs::write(self.refused_path(), serde_json::to_vec(&rec).expect("json"));
        }
        self.set_state(|u| {
            u.state = "refused";
            u.release = release;
            u.progress = None;
            u.retry_in_secs = None;
            u.last_error = Some(Self::error_report(r.kind.as_str(), &r.detail, id));
        });
    }

    /// Removes downloads of other releases.
    fn clean_downloads(&self, keep: Option<&str>) {
        if let Ok(entries) = std::fs::read_dir(&self.cfg.downloads) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() && Some(name.as_str()) != keep {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    async fn blocking<R: Send + 'static>(self: &Arc<Self>, f: impl FnOnce(&Self) -> R + Send + 'static) -> R {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me)).await.expect("update task panicked")
    }

    async fn handle(
        self: &Arc<Self>,
        bytes: &Bytes,
        desired: &mut watch::Receiver<Option<Bytes>>,
        replies: &mut mpsc::Receiver<Bytes>,
        connected: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let offer = match Offer::parse(bytes) {
            Ok(o) => o,
            Err(r) => {
                self.refuse(None, None, None, &r);
                return Outcome::Done;
            }
        };
        let id = offer.release_id();
        let number = offer.unverified_doc().ok().map(|d| d.number);
        // The offer's attempt tells the console which of its offers this report answers.
        let release = json!({"id": id, "number": number, "attempt": offer.attempt});
        let o = offer.clone();
        let (active, trusted) = self
            .blocking(move |s| {
                s.device.with_updater(|u| {
                    let current = u.store.current().ok().flatten();
                    let trusted = current.map(|c| format!("{} {:?}", c.root, c.last_number)).unwrap_or_default();
                    (u.is_active(&o), trusted)
                })
            })
            .await;
        let key = crate::sha256_hex(&[&bytes[..], b"\n", trusted.as_bytes()].concat());
        if active {
            self.clean_downloads(None);
            self.set_state(|u| {
                u.state = "idle";
                u.progress = None;
                u.retry_in_secs = None;
            });
            return Outcome::Done;
        }
        if let Some(rec) = self.refused_record(&key) {
            self.set_state(|u| {
                u.state = "refused";
                u.release = Some(release);
                u.last_error = Some(ErrorReport { kind: rec.kind, reason: rec.reason, at: rec.at, release: Some(id) });
            });
            return Outcome::Done;
        }
        self.set_state(|u| {
            u.state = "verifying";
            u.release = Some(release.clone());
            u.retry_in_secs = None;
        });
        // Verified before a byte is fetched: a replayed, misdirected or badly signed offer
        // costs nothing but this check.
        let o = offer.clone();
        let verified = self
            .blocking(move |s| {
                s.device.with_updater(|u| {
                    let v = u.verify(&o, SystemTime::now())?;
                    let plan = u.plan(&v.doc)?;
                    Ok::<_, Refusal>((v.doc, plan))
                })
            })
            .await;
        let (doc, plan) = match verified {
            Ok(v) => v,
            Err(r) => {
                self.refuse(Some(&key), Some(&id), Some(release), &r);
                return Outcome::Done;
            }
        };
        let dir = self.cfg.downloads.join(&id);
        self.clean_downloads(Some(&id));
        if let Err(r) = offer.write_dir(&dir) {
            return self.transfer_failed("storage", &r.detail, &id);
        }
        tracing::info!(number = doc.number, objects = plan.len(), "downloading release");
        let started = Instant::now();
        match self.transfer(&doc, &dir, &plan, desired, replies, connected).await {
            Ok(()) => {}
            Err(Failure::Superseded) => return Outcome::Superseded,
            Err(Failure::Failed { kind, reason }) => return self.transfer_failed(kind, &reason, &id),
            Err(Failure::Refused(r)) => {
                self.refuse(Some(&key), Some(&id), Some(release), &r);
                return Outcome::Done;
            }
        }
        let download_ms = started.elapsed().as_millis() as u64;
        self.set_state(|u| u.state = "applying");
        let d = dir.clone();
        match self.blocking(move |s| s.device.apply(&d)).await {
            Ok(applied) => {
                let _ = std::fs::remove_dir_all(&dir);
                let progress = lock(&self.update).progress.clone();
                self.set_state(|u| {
                    u.state = "idle";
                    u.last_applied = Some(json!({
                        "number": applied.number,
                        "release": applied.release,
                        "models": applied.models,
                        "download_ms": download_ms,
                        "apply_ms": applied.millis,
                        "transfer": progress,
                        "at": time::format(SystemTime::now()),
                    }));
                    u.progress = None;
                });
                Outcome::Done
            }
            Err(r) => {
                let _ = std::fs::remove_dir_all(&dir);
                self.refuse(Some(&key), Some(&id), Some(release), &r);
                Outcome::Done
            }
        }
    }

    fn transfer_failed(&self, kind: &'static str, reason: &str, id: &str) -> Outcome {
        tracing::warn!(kind, reason, "release download failed; the current release keeps serving");
        self.set_state(|u| {
            u.state = "failed";
            u.last_error = Some(Self::error_report(kind, reason, Some(id)));
        });
        Outcome::Failed
    }

    /// Fetches every planned object into `dir` (`blobs/` or `deltas/`), chunk by chunk.
    async fn transfer(
        self: &Arc<Self>,
        doc: &ReleaseDoc,
        dir: &Path,
        plan: &[Transfer],
        desired: &mut watch::Receiver<Option<Bytes>>,
        replies: &mut mpsc::Receiver<Bytes>,
        connected: &mut watch::Receiver<bool>,
    ) -> Result<(), Failure> {
        let cfg = &self.cfg;
        let (d, p, dir2) = (doc.clone(), plan.to_vec(), dir.to_owned());
        let mut parts: Vec<Partial> = self
            .blocking(move |_| {
                p.iter()
                    .map(|t| {
                        let sub = if t.delta { "deltas" } else { "blobs" };
                        Partial::open(&dir2.join(sub), &t.object, t.length, &d)
                    })
                    .collect::<Result<Vec<_>, Refusal>>()
            })
            .await
            .map_err(|r| match r.kind {
                crate::error::RefusalKind::Malformed => Failure::Refused(r),
                _ => failed(r.kind.as_str(), r.detail),
            })?;
        let mut progress = Progress {
            objects: plan.len(),
            delta_objects: plan.iter().filter(|t| t.delta).count(),
            full_objects: plan.iter().filter(|t| !t.delta).count(),
            bytes_total: plan.iter().map(|t| t.length).sum(),
            ..Progress::default()
        };
        let mut queue = VecDeque::new();
        for (i, part) in parts.iter().enumerate() {
            progress.chunks_total += part.chunks();
            for c in 0..part.chunks() {
                if part.present[c as usize] {
                    progress.chunks_resumed += 1;
                    progress.bytes_done += part.range(c).1;
                } else {
                    queue.push_back((i, c));
                }
            }
        }
        progress.chunks_done = progress.chunks_resumed;
        if progress.chunks_resumed > 0 {
            tracing::info!(
                chunks = progress.chunks_resumed,
                of = progress.chunks_total,
                "resuming a download from disk"
            );
        }
        let chunk_max = parts.iter().map(|p| p.range(0).1).max().unwrap_or(0);
        self.reply_max.store(chunk_max + 2 + super::chunks::MAX_HEADER_BYTES as u64, Ordering::Relaxed);
        let _stop_queueing = Defer(|| self.reply_max.store(0, Ordering::Relaxed));
        while replies.try_recv().is_ok() {}
        // Only a change of the link during this transfer matters.
        connected.borrow_and_update();
        let flood_limit = 64 + 2 * progress.chunks_total;
        let started = Instant::now();
        let mut tries: HashMap<(usize, u64), u32> = HashMap::new();
        let mut in_flight: HashMap<u64, (usize, u64, Instant)> = HashMap::new();
        let mut next_id = (super::random_unit() * (1u64 << 40) as f64) as u64;
        // The cap is a token bucket holding at most one chunk: time spent stalled or offline
        // earns no burst afterwards.
        let burst = chunk_max as f64;
        let mut credit = (burst, Instant::now());
        // A capped link may need longer than the watchdog's window for one chunk.
        let watchdog_window = match cfg.max_bytes_per_second {
            0 => cfg.watchdog_window,
            cap => cfg.watchdog_window.max(Duration::from_secs_f64(2.0 * burst / cap as f64)),
        };
        // Requests that timed out and were asked again: a late answer still counts.
        let mut retired: HashMap<u64, (usize, u64)> = HashMap::new();
        let mut last_reply = Instant::now();
        let mut window = (Instant::now(), 0u64);
        let mut last_note = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let request_topic = cfg.topics.chunk_request(&cfg.device_id);
        let publish_progress = |p: &Progress| {
            let mut p = p.clone();
            p.millis = started.elapsed().as_millis() as u64;
            self.set_state(|u| {
                u.state = "downloading";
                u.progress = Some(p);
            });
        };
        publish_progress(&progress);
        // One more try for a chunk, or the transfer's failure.
        let retry = |tries: &mut HashMap<(usize, u64), u32>, key: (usize, u64), kind: &'static str, why: String| {
            let n = tries.entry(key).or_insert(0);
            *n += 1;
            if *n >= cfg.chunk_tries {
                return Err(failed(
                    kind,
                    format!("chunk {} of object {}: {why} ({n} tries)", key.1, parts_name(plan, key.0)),
                ));
            }
            Ok(())
        };
        let outcome: Result<(), Failure> = 'fetch: {
            while !(queue.is_empty() && in_flight.is_empty()) {
                if *connected.borrow() {
                    while in_flight.len() < cfg.window.max(1) {
                        let Some(&(i, c)) = queue.front() else { break };
                        if parts[i].present[c as usize] {
                            // A late answer to an earlier request already brought it.
                            queue.pop_front();
                            continue;
                        }
                        let (offset, len) = parts[i].range(c);
                        if cfg.max_bytes_per_second > 0 {
                            let now = Instant::now();
                            let earned = (now - credit.1).as_secs_f64() * cfg.max_bytes_per_second as f64;
                            credit = ((credit.0 + earned).min(burst), now);
                            if credit.0 < len as f64 {
                                break;
                            }
                        }
                        let req = ChunkRequest {
                            id: next_id,
                            object: parts[i].object().to_owned(),
                            offset,
                            length: len as u32,
                        };
                        if self
                            .client
                            .try_publish(request_topic.as_str(), QoS::AtLeastOnce, false, req.to_bytes())
                            .is_err()
                        {
                            break;
                        }
                        queue.pop_front();
                        in_flight.insert(next_id, (i, c, Instant::now()));
                        progress.requests += 1;
                        next_id += 1;
                        credit.0 -= len as f64;
                    }
                }
                tokio::select! {
                    r = desired.changed() => {
                        if r.is_ok() {
                            break 'fetch Err(Failure::Superseded);
                        }
                    }
                    r = connected.changed() => {
                        if r.is_ok() && *connected.borrow_and_update() {
                            // What was in flight when the link dropped is asked for again (not a
                            // retry: the chunk never had its chance).
                            for (_, (i, c, _)) in in_flight.drain() {
                                queue.push_front((i, c));
                                progress.reasked += 1;
                            }
                        }
                        window = (Instant::now(), 0);
                    }
                    msg = replies.recv() => {
                        let Some(msg) = msg else { break 'fetch Err(failed("storage", "reply channel closed")) };
                        let reply = ChunkReply::decode(msg).ok();
                        let known = reply.as_ref().and_then(|r| {
                            in_flight.remove(&r.id).map(|f| (f.0, f.1)).or_else(|| retired.remove(&r.id))
                        });
                        let Some((i, c)) = known else {
                            progress.unrequested += 1;
                            if progress.unrequested > flood_limit {
                                break 'fetch Err(failed("flood", format!("{} chunk replies nobody asked for (limit {flood_limit})", progress.unrequested)));
                            }
                            continue;
                        };
                        let reply = reply.expect("matched above");
                        if parts[i].present[c as usize] {
                            // The answer to a request asked twice: the chunk is already in.
                            progress.duplicates += 1;
                            continue;
                        }
                        let (offset, len) = parts[i].range(c);
                        let outcome = match reply.result {
                            Err(e) => Err(("missing", format!("the blob server says: {e}"))),
                            Ok(_) if reply.object != parts[i].object() || reply.offset != offset => {
                                Err(("hash_mismatch", "a reply for another object or offset".to_string()))
                            }
                            Ok(data) => {
                                progress.bytes_received += data.len() as u64;
                                window.1 += data.len() as u64;
                                last_reply = Instant::now();
                                match parts[i].write(c, &data) {
                                    Err(WriteError::Io(e)) => break 'fetch Err(failed("storage", e)),
                                    Err(WriteError::Corrupt(e)) => Err(("hash_mismatch", e)),
                                    Ok(()) => Ok(()),
                                }
                            }
                        };
                        match outcome {
                            Ok(()) => {
                                progress.chunks_fetched += 1;
                                progress.chunks_done += 1;
                                progress.bytes_done += len;
                            }
                            Err((kind, why)) => {
                                if kind == "hash_mismatch" {
                                    progress.chunks_corrupt += 1;
                                }
                                progress.chunks_retried += 1;
                                tracing::warn!(chunk = c, object = parts_name(plan, i), why, "bad chunk; asking again");
                                if let Err(e) = retry(&mut tries, (i, c), kind, why) {
                                    break 'fetch Err(e);
                                }
                                queue.push_back((i, c));
                            }
                        }
                        if last_note.elapsed() >= Duration::from_secs(2) {
                            last_note = Instant::now();
                            publish_progress(&progress);
                        }
                    }
                    _ = tick.tick() => {
                        if !*connected.borrow() {
                            continue;
                        }
                        let now = Instant::now();
                        // A request is late when nothing at all came for chunk_timeout since it
                        // was sent: on a slow link replies queue behind each other, and each
                        // reply that arrives shows the link is moving.
                        let late: Vec<u64> = in_flight
                            .iter()
                            .filter(|(_, f)| now - f.2.max(last_reply) >= cfg.chunk_timeout)
                            .map(|(id, _)| *id)
                            .collect();
                        for id in late {
                            let (i, c, _) = in_flight.remove(&id).expect("listed above");
                            if parts[i].present[c as usize] {
                                continue;
                            }
                            retired.insert(id, (i, c));
                            progress.chunks_retried += 1;
                            if let Err(e) = retry(&mut tries, (i, c), "timeout", format!("no answer within {:?}", cfg.chunk_timeout)) {
                                break 'fetch Err(e);
                            }
                            queue.push_front((i, c));
                        }
                        let span = now - window.0;
                        if cfg.min_bytes_per_second > 0 && span >= watchdog_window {
                            let rate = window.1 as f64 / span.as_secs_f64();
                            if rate < cfg.min_bytes_per_second as f64 {
                                break 'fetch Err(failed("throughput", format!(
                                    "{rate:.0} B/s over {:.0} s, under the {} B/s minimum", span.as_secs_f64(), cfg.min_bytes_per_second)));
                            }
                            window = (now, 0);
                        }
                    }
                }
            }
            Ok(())
        };
        publish_progress(&progress);
        outcome?;
        self.blocking(move |_| parts.into_iter().try_for_each(Partial::finish))
            .await
            .map_err(|r| failed(r.kind.as_str(), r.detail))?;
        tracing::info!(
            chunks = progress.chunks_fetched,
            resumed = progress.chunks_resumed,
            bytes = progress.bytes_received,
            ms = started.elapsed().as_millis() as u64,
            "release downloaded"
        );
        Ok(())
    }

    /// The retained state report.
    fn state_doc(&self) -> Value {
        let mut doc = self.device.report();
        let release = self.device.with_updater(|u| {
            let current = u.store.current().ok().flatten()?;
            let active = current.active?;
            let d = u.store.release(&active).ok()?;
            Some(json!({"id": active, "number": d.number}))
        });
        let cfg = &self.cfg;
        doc.insert("device".into(), json!(cfg.device_id));
        doc.insert("fleet".into(), json!(cfg.fleet));
        doc.insert("group".into(), json!(cfg.group));
        doc.insert("online".into(), json!(true));
        doc.insert("release".into(), json!(release));
        let mut update = serde_json::to_value(&*lock(&self.update)).expect("json");
        update["dropped_replies"] = json!(self.dropped_replies.load(Ordering::Relaxed));
        doc.insert("update".into(), update);
        doc.insert("seq".into(), json!(self.seq.fetch_add(1, Ordering::Relaxed)));
        doc.insert("at".into(), json!(time::format(SystemTime::now())));
        Value::Object(doc)
    }
}

/// Runs a closure when dropped (on every way out of a scope).
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

fn parts_name(plan: &[Transfer], i: usize) -> &str {
    crate::short(&plan[i].object)
}
