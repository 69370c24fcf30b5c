//! What the agent's tasks share: settings, the device, the MQTT client and the status, and
//! the helpers every task uses (state changes, refusals kept across restarts, the report).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rumqttc::v5::AsyncClient;
use tokio::sync::Notify;

use super::device::Device;
use super::settings::AgentConfig;
use super::status::ConnectionStatus;
use crate::Refusal;
use crate::mqtt::report::{ErrorReport, OfferRef, ReleaseRef, StateReport, UpdateState, UpdateStatus};
use crate::time;

pub(crate) struct Shared<D> {
    pub(crate) cfg: AgentConfig,
    pub(crate) device: Arc<D>,
    pub(crate) client: AsyncClient,
    pub(crate) update: Mutex<UpdateStatus>,
    pub(crate) conn: Mutex<ConnectionStatus>,
    pub(crate) report_now: Notify,
    pub(crate) seq: AtomicU64,
    pub(crate) dropped_replies: AtomicU64,
    /// The largest reply the current transfer can use (0: no transfer).
    pub(crate) reply_max: AtomicU64,
    /// Set by [`Agent::shutdown`]: no more reports, offers or reconnects.
    pub(crate) stopping: AtomicBool,
}

/// Chunk replies queued between the connection and the transfer at most.
pub(crate) const REPLY_QUEUE: usize = 64;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn offline_payload(cfg: &AgentConfig) -> Vec<u8> {
    serde_json::to_vec(&StateReport::offline(&cfg.device_id, &cfg.fleet)).expect("json")
}

/// Why a transfer stopped.
#[derive(Debug)]
pub(crate) enum Failure {
    /// A new offer arrived: start over with it.
    Superseded,
    Failed {
        kind: &'static str,
        reason: String,
    },
    /// The release itself cannot be transferred (no chunk hashes for a large object).
    Refused(Refusal),
}

pub(crate) fn failed(kind: &'static str, reason: impl Into<String>) -> Failure {
    Failure::Failed { kind, reason: reason.into() }
}

pub(crate) enum OfferOutcome {
    Done,
    Superseded,
    Failed,
}

/// An offer refused for good in this device's trusted state (kept across restarts, so a
/// retained offer is not examined again): keyed by the offer's exact bytes and the trusted root
/// and last release number, so neither another offer of the same release (say with junk roots
/// beside it) nor a change of the device's state inherits it.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct RefusedRecord {
    pub(crate) key: String,
    pub(crate) release: String,
    pub(crate) kind: String,
    pub(crate) reason: String,
    pub(crate) at: String,
}

impl<D: Device> Shared<D> {
    pub(crate) fn set_state(&self, f: impl FnOnce(&mut UpdateStatus)) {
        f(&mut lock(&self.update));
        self.report_now.notify_one();
    }

    pub(crate) fn error_report(kind: &str, reason: &str, release: Option<&str>) -> ErrorReport {
        ErrorReport {
            kind: kind.into(),
            reason: reason.into(),
            at: time::format(SystemTime::now()),
            release: release.map(str::to_owned),
        }
    }

    pub(crate) fn refused_path(&self) -> PathBuf {
        self.cfg.downloads.join("refused.json")
    }

    /// Written, synced, before a release is applied and removed after: found at start, it means
    /// the process died applying that release (an abort, the out-of-memory killer), and
    /// [`Shared::recover_interrupted_apply`] turns it into a refusal of the same offer.
    pub(crate) fn applying_path(&self) -> PathBuf {
        self.cfg.downloads.join("applying.json")
    }

    /// Records, durably, that the offer under `key` is being applied.
    pub(crate) fn mark_applying(&self, key: &str, release: &str) -> std::io::Result<()> {
        let rec = RefusedRecord {
            key: key.into(),
            release: release.into(),
            kind: crate::error::RefusalKind::HealthCheck.as_str().into(),
            reason: "the device stopped while applying this release (a crash, or out of memory): refused so that \
                     it is not applied again"
                .into(),
            at: time::format(SystemTime::now()),
        };
        std::fs::create_dir_all(&self.cfg.downloads)?;
        let path = self.applying_path();
        let mut f = std::fs::File::create(&path)?;
        std::io::Write::write_all(&mut f, &serde_json::to_vec(&rec).expect("json"))?;
        f.sync_all()?;
        if let Ok(dir) = std::fs::File::open(&self.cfg.downloads) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// At start: an apply the previous process did not finish becomes the recorded refusal of
    /// its offer, so that a retained offer whose release kills the process is not retried.
    pub(crate) fn recover_interrupted_apply(&self) {
        let marker = self.applying_path();
        if marker.exists() {
            tracing::error!("the previous run stopped while applying a release; that offer is refused");
            if let Err(e) = std::fs::rename(&marker, self.refused_path()) {
                tracing::warn!(error = %e, "could not record the interrupted apply");
            }
        }
    }

    pub(crate) fn refused_record(&self, key: &str) -> Option<RefusedRecord> {
        let bytes = std::fs::read(self.refused_path()).ok()?;
        serde_json::from_slice::<RefusedRecord>(&bytes).ok().filter(|r| r.key == key)
    }

    /// Reports a refusal; records it under `key` unless it may pass later without a new offer
    /// (the device not provisioned yet, its storage failing, its clock behind).
    pub(crate) fn refuse(&self, key: Option<&str>, id: Option<&str>, release: Option<OfferRef>, r: &Refusal) {
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
            u.state = UpdateState::Refused;
            u.release = release;
            u.progress = None;
            u.retry_in_secs = None;
            u.last_error = Some(Self::error_report(r.kind.as_str(), &r.detail, id));
        });
    }

    /// Removes downloads of other releases.
    pub(crate) fn clean_downloads(&self, keep: Option<&str>) {
        if let Ok(entries) = std::fs::read_dir(&self.cfg.downloads) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() && Some(name.as_str()) != keep {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    pub(crate) async fn blocking<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> R + Send + 'static,
    ) -> R {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me)).await.expect("update task panicked")
    }
}

impl<D: Device> Shared<D> {
    /// The retained state report.
    pub(crate) fn state_doc(&self) -> StateReport {
        let body = self.device.report();
        let (release, candidate) = self.device.with_updater(|u| {
            let current = u.store.current().ok().flatten();
            let named = |sha: Option<String>| {
                let sha = sha?;
                let d = u.store.release(&sha).ok()?;
                Some(ReleaseRef { id: sha, number: d.number })
            };
            let current = current.as_ref();
            (named(current.and_then(|c| c.active.clone())), named(current.and_then(|c| c.candidate.clone())))
        });
        let mut update = lock(&self.update).clone();
        update.dropped_replies = self.dropped_replies.load(Ordering::Relaxed);
        let cfg = &self.cfg;
        StateReport {
            device: cfg.device_id.clone(),
            fleet: cfg.fleet.clone(),
            group: Some(cfg.group.clone()),
            online: true,
            release,
            candidate,
            update: Some(update),
            body,
            seq: Some(self.seq.fetch_add(1, Ordering::Relaxed)),
            at: Some(time::format(SystemTime::now())),
        }
    }
}
