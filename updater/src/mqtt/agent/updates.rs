//! The update task: one offer at a time, from its verification to the applied release.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::device::Device;
use super::shared::{Failure, OfferOutcome, Shared, lock};
use crate::Refusal;
use crate::mqtt::report::{AppliedReport, ErrorReport, OfferRef, UpdateState};
use crate::offer::Offer;

pub(crate) async fn run_updates<D: Device>(
    s: Arc<Shared<D>>,
    mut desired: watch::Receiver<Option<Bytes>>,
    mut replies: mpsc::Receiver<Bytes>,
    mut connected: watch::Receiver<bool>,
) {
    s.recover_interrupted_apply();
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
                u.state = UpdateState::Idle;
                u.progress = None;
                u.retry_in_secs = None;
            });
            continue;
        };
        attempts += 1;
        lock(&s.update).attempt = attempts;
        match s.handle(&bytes, &mut desired, &mut replies, &mut connected).await {
            OfferOutcome::Done => attempts = 0,
            OfferOutcome::Superseded => {
                pending = true;
                attempts = 0;
            }
            OfferOutcome::Failed => {
                // Doubling from retry_after; past max_attempts, once an hour (a fleet's blob
                // servers may be down for a while: a device must not stay stuck until restarted).
                let hour = Duration::from_secs(3600);
                let wait = if attempts < s.cfg.max_attempts {
                    s.cfg.retry_after.saturating_mul(1 << (attempts - 1).min(10)).min(hour)
                } else {
                    tracing::warn!(attempts, "download keeps failing; trying again hourly");
                    hour
                };
                let wait = wait.mul_f64(0.75 + 0.25 * crate::mqtt::random_unit());
                lock(&s.update).retry_in_secs = Some(wait.as_secs());
                retry_at = Some(tokio::time::Instant::now() + wait);
                s.report_now.notify_one();
            }
        }
    }
}

impl<D: Device> Shared<D> {
    async fn handle(
        self: &Arc<Self>,
        bytes: &Bytes,
        desired: &mut watch::Receiver<Option<Bytes>>,
        replies: &mut mpsc::Receiver<Bytes>,
        connected: &mut watch::Receiver<bool>,
    ) -> OfferOutcome {
        let offer = match Offer::parse(bytes) {
            Ok(o) => o,
            Err(r) => {
                self.refuse(None, None, None, &r);
                return OfferOutcome::Done;
            }
        };
        let id = offer.release_id();
        let number = offer.unverified_doc().ok().map(|d| d.number);
        // The offer's attempt tells the console which of its offers this report answers.
        let release = OfferRef { id: id.clone(), number, attempt: offer.attempt };
        let o = offer.clone();
        let (active, candidate, previous, trusted) = self
            .blocking(move |s| {
                s.device.with_updater(|u| {
                    let current = u.store.current().ok().flatten();
                    let candidate = current.as_ref().and_then(|c| c.candidate.clone());
                    let previous = current.as_ref().and_then(|c| c.previous.clone());
                    let trusted = current.map(|c| format!("{} {:?}", c.root, c.last_number)).unwrap_or_default();
                    (u.is_active(&o), candidate, previous, trusted)
                })
            })
            .await;
        let key = crate::sha256_hex(&[&bytes[..], b"\n", trusted.as_bytes()].concat());
        let idle = |s: &Self| {
            s.set_state(|u| {
                u.state = UpdateState::Idle;
                u.progress = None;
                u.retry_in_secs = None;
            })
        };
        if active {
            self.clean_downloads(None);
            // Offered the active release again: a candidate beside it is no longer wanted.
            if candidate.is_some()
                && let Err(r) = self.blocking(|s| s.device.drop_candidate()).await
            {
                tracing::warn!(error = %r, "the candidate release could not be dropped");
            }
            idle(self.as_ref());
            return OfferOutcome::Done;
        }
        let promote = candidate.as_deref() == Some(id.as_str());
        // The release run before the active one, offered for real: revert to it (the store
        // holds it whole; see `crate::revert` for why this is the one way past the number rule).
        let revert = !offer.candidate && previous.as_deref() == Some(id.as_str());
        if promote || revert {
            if offer.candidate {
                idle(self.as_ref());
                return OfferOutcome::Done;
            }
            // Nothing to fetch: promote the candidate, or revert.
            self.set_state(|u| {
                u.state = UpdateState::Applying;
                u.release = Some(release.clone());
            });
            let done = self.blocking(move |s| if promote { s.device.promote() } else { s.device.revert() }).await;
            return match done {
                Ok(applied) => {
                    self.set_state(|u| {
                        u.state = UpdateState::Idle;
                        u.last_applied = Some(AppliedReport::of(applied, 0, None));
                    });
                    OfferOutcome::Done
                }
                Err(r) => {
                    self.refuse(Some(&key), Some(&id), Some(release), &r);
                    OfferOutcome::Done
                }
            };
        }
        if let Some(rec) = self.refused_record(&key) {
            self.set_state(|u| {
                u.state = UpdateState::Refused;
                u.release = Some(release);
                u.last_error = Some(ErrorReport { kind: rec.kind, reason: rec.reason, at: rec.at, release: Some(id) });
            });
            return OfferOutcome::Done;
        }
        self.set_state(|u| {
            u.state = UpdateState::Verifying;
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
                return OfferOutcome::Done;
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
            Err(Failure::Superseded) => return OfferOutcome::Superseded,
            Err(Failure::Failed { kind, reason }) => return self.transfer_failed(kind, &reason, &id),
            Err(Failure::Refused(r)) => {
                self.refuse(Some(&key), Some(&id), Some(release), &r);
                return OfferOutcome::Done;
            }
        }
        let download_ms = started.elapsed().as_millis() as u64;
        self.set_state(|u| u.state = UpdateState::Applying);
        if let Err(e) = self.mark_applying(&key, &id) {
            return self.transfer_failed("storage", &format!("could not record the apply: {e}"), &id);
        }
        let d = dir.clone();
        let as_candidate = offer.candidate;
        // A panic while applying (a backend on a hostile graph) is a refusal like any other.
        let applied = self
            .blocking(move |s| {
                let step = || if as_candidate { s.device.stage_candidate(&d) } else { s.device.apply(&d) };
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).unwrap_or_else(|panic| {
                    Err(Refusal::new(
                        crate::error::RefusalKind::HealthCheck,
                        format!("applying the release panicked: {}", crate::panic_message(&*panic)),
                    ))
                })
            })
            .await;
        let _ = std::fs::remove_file(self.applying_path());
        match applied {
            Ok(_) if as_candidate => {
                // Staged beside what serves: the report's `candidate` says so.
                let _ = std::fs::remove_dir_all(&dir);
                idle(self.as_ref());
                OfferOutcome::Done
            }
            Ok(applied) => {
                let _ = std::fs::remove_dir_all(&dir);
                let progress = lock(&self.update).progress.clone();
                self.set_state(|u| {
                    u.state = UpdateState::Idle;
                    u.last_applied = Some(AppliedReport::of(applied, download_ms, progress));
                    u.progress = None;
                });
                OfferOutcome::Done
            }
            Err(r) => {
                let _ = std::fs::remove_dir_all(&dir);
                self.refuse(Some(&key), Some(&id), Some(release), &r);
                OfferOutcome::Done
            }
        }
    }

    pub(crate) fn transfer_failed(&self, kind: &'static str, reason: &str, id: &str) -> OfferOutcome {
        tracing::warn!(kind, reason, "release download failed; the current release keeps serving");
        self.set_state(|u| {
            u.state = UpdateState::Failed;
            u.last_error = Some(Self::error_report(kind, reason, Some(id)));
        });
        OfferOutcome::Failed
    }
}
