//! Reverting to the previous release: the one the device ran before its active release, which
//! the store keeps whole for this and for the fall-back at start.
//!
//! A revert is the one way back past the rollback rule, and it is narrow. Only the release the
//! trusted state names as `previous` can be reverted to, and only once: the state then names no
//! previous release, so two reverts cannot flip a device back and forth. The last accepted
//! number stays where it is, so the release reverted from can never be applied again; its fix
//! comes as a new release with a higher number. The stored document is verified again against
//! the trusted root (signatures, fleet and group, expiry), and its blobs must be intact.

use std::time::{Instant, SystemTime};

use crate::apply::{Applied, Updater};
use crate::error::{Refusal, RefusalKind, refuse};
use crate::host::{ModelHost, staged_models};
use crate::release::ReleaseDoc;
use crate::store::Current;

impl Updater {
    /// The release a revert would return to: the trusted state's previous release, by hash.
    pub fn previous(&self) -> Option<String> {
        self.store.current().ok().flatten().and_then(|c| c.previous)
    }

    /// Activates the previous release in place of the active one (and drops any candidate).
    /// Recorded in `status.json` like an apply.
    pub fn revert<H: ModelHost>(&self, host: &H) -> Result<Applied, Refusal> {
        self.activate_recorded("reverted", |now, started| self.revert_at(host, now, started))
    }

    fn revert_at<H: ModelHost>(&self, host: &H, now: SystemTime, started: Instant) -> Result<Applied, Refusal> {
        let Some(current) = self.store.current()? else {
            return refuse(RefusalKind::Missing, "this device has no trusted root yet");
        };
        let Some(sha) = current.previous.clone() else {
            return refuse(RefusalKind::Missing, "there is no previous release to revert to");
        };
        let root = self.store.root(&current)?;
        // Verified as at its apply, but for the number: it is below the last one by design.
        let doc = ReleaseDoc::verify(&self.store.doc(&sha)?, &root, now, &self.target, None)?;
        for b in doc.blobs() {
            if !self.store.blob_intact(&b.sha256)? {
                return refuse(
                    RefusalKind::Missing,
                    format!("release {}: blob {} is missing or altered", doc.number, crate::short(&b.sha256)),
                );
            }
        }
        let staged = host
            .stage(&staged_models(&self.store, &doc))
            .map_err(|e| Refusal::new(RefusalKind::HealthCheck, e.to_string()))?;
        let next = Current {
            active: Some(sha.clone()),
            previous: None,
            candidate: None,
            repair: None,
            root: current.root.clone(),
            last_number: current.last_number,
        };
        self.commit(&next)?;
        if current.candidate.is_some() {
            drop(host.take_shadow());
        }
        host.activate(staged);
        self.collect_garbage();
        Ok(Applied::from_store(&doc, sha, started))
    }
}
