//! Candidate releases: verified, fetched and staged like any release, then run beside the
//! serving models as shadows instead of activated. The operator (or a rollout rule) then
//! promotes the candidate to active, or drops it.
//!
//! The trusted state names the candidate (`Current::candidate`) so that its blobs survive
//! garbage collection and a restart stages it again. Its number does not become the last one
//! until it is promoted: promotion verifies the stored document again (signatures, target,
//! expiry, and a number above the last one, which a release applied meanwhile may have
//! passed), so a candidate cannot be activated around the rollback rule.

use std::path::Path;
use std::time::{Instant, SystemTime};

use crate::apply::{Applied, Prepared, Updater};
use crate::error::{Refusal, RefusalKind, refuse};
use crate::host::{ModelHost, staged_models};
use crate::release::ReleaseDoc;
use crate::store::Current;

impl Updater {
    /// Verifies the release in `dir` and stages it as the candidate, in place of any candidate
    /// before it; what serves does not change. Recorded in `status.json` like an apply.
    pub fn stage_candidate_dir<H: ModelHost>(&self, dir: &Path, host: &H) -> Result<Applied, Refusal> {
        let started = Instant::now();
        let now = SystemTime::now();
        let result = self.candidate_at(dir, host, now, started);
        self.record("candidate staged", now, result.as_ref().map(|a| serde_json::json!({ "candidate": a })));
        result
    }

    fn candidate_at<H: ModelHost>(
        &self,
        dir: &Path,
        host: &H,
        now: SystemTime,
        started: Instant,
    ) -> Result<Applied, Refusal> {
        let Prepared { verified, staged, added, applied } = self.prepare(dir, host, now, started)?;
        if let Err(e) = host.shadow(staged) {
            self.store.discard_blobs(&added);
            return refuse(RefusalKind::HealthCheck, e.to_string());
        }
        let (root, release) = self.put_docs(&verified)?;
        let next = Current { root, candidate: Some(release), ..verified.current };
        if let Err(e) = self.commit(&next) {
            drop(host.take_shadow());
            return Err(e);
        }
        self.collect_garbage();
        Ok(applied)
    }

    /// The candidate's document, if the trusted state names one.
    pub fn candidate(&self) -> Result<Option<(String, ReleaseDoc)>, Refusal> {
        let Some(current) = self.store.current()? else { return Ok(None) };
        match current.candidate {
            Some(sha) => Ok(Some((sha.clone(), self.store.release(&sha)?))),
            None => Ok(None),
        }
    }

    /// At start: stages the candidate the trusted state names as shadows again. One that no
    /// longer loads is dropped from the state, with the reason.
    pub fn restore_candidate<H: ModelHost>(&self, host: &H) -> Result<Option<String>, Refusal> {
        let Some((sha, doc)) = self.candidate()? else { return Ok(None) };
        let staged = host.stage(&staged_models(&self.store, &doc)).map_err(|e| e.to_string());
        let shadowed = staged.and_then(|s| host.shadow(s).map_err(|e| e.to_string()));
        match shadowed {
            Ok(()) => Ok(Some(format!("candidate release {} runs as a shadow", doc.number))),
            Err(reason) => {
                let current = self.store.current()?.expect("a candidate implies a trusted state");
                self.commit(&Current { candidate: None, ..current })?;
                self.collect_garbage();
                Ok(Some(format!("candidate release {} ({}) dropped: {reason}", doc.number, crate::short(&sha))))
            }
        }
    }

    /// Activates the candidate: its document is verified again, its staged models (or, if the
    /// host holds none, the same models staged again) serve, and it becomes the active release.
    pub fn promote<H: ModelHost>(&self, host: &H) -> Result<Applied, Refusal> {
        self.activate_recorded("candidate promoted", |now, started| self.promote_at(host, now, started))
    }

    /// Runs an activation of a release the store holds, timed from now, and records its
    /// outcome in `status.json` as `what`.
    pub(crate) fn activate_recorded(
        &self,
        what: &str,
        f: impl FnOnce(SystemTime, Instant) -> Result<Applied, Refusal>,
    ) -> Result<Applied, Refusal> {
        let started = Instant::now();
        let now = SystemTime::now();
        let result = f(now, started);
        self.record(what, now, result.as_ref().map(|a| serde_json::json!({ "applied": a })));
        result
    }

    fn promote_at<H: ModelHost>(&self, host: &H, now: SystemTime, started: Instant) -> Result<Applied, Refusal> {
        let Some(current) = self.store.current()? else {
            return refuse(RefusalKind::Missing, "this device has no trusted root yet");
        };
        let Some(sha) = current.candidate.clone() else {
            return refuse(RefusalKind::Missing, "there is no candidate release to promote");
        };
        let root = self.store.root(&current)?;
        let doc = ReleaseDoc::verify(&self.store.doc(&sha)?, &root, now, &self.target, current.last_number)?;
        let staged = match host.take_shadow() {
            Some(s) => s,
            None => host
                .stage(&staged_models(&self.store, &doc))
                .map_err(|e| Refusal::new(RefusalKind::HealthCheck, e.to_string()))?,
        };
        let next = Current {
            active: Some(sha.clone()),
            previous: current.active.clone().filter(|a| *a != sha),
            last_number: Some(doc.number.max(current.last_number.unwrap_or(0))),
            repair: None,
            candidate: None,
            root: current.root.clone(),
        };
        if let Err(e) = self.commit(&next) {
            // Not committed: the candidate goes on as a shadow.
            let _ = host.shadow(staged);
            return Err(e);
        }
        host.activate(staged);
        self.collect_garbage();
        Ok(Applied::from_store(&doc, sha, started))
    }

    /// Stops the candidate's shadows and forgets it (its blobs go at the next collection).
    /// Returns the dropped release's number.
    pub fn drop_candidate<H: ModelHost>(&self, host: &H) -> Result<u64, Refusal> {
        let now = SystemTime::now();
        let result = (|| {
            let Some((_, doc)) = self.candidate()? else {
                return refuse(RefusalKind::Missing, "there is no candidate release to drop");
            };
            let current = self.store.current()?.expect("a candidate implies a trusted state");
            self.commit(&Current { candidate: None, ..current })?;
            drop(host.take_shadow());
            self.collect_garbage();
            Ok(doc.number)
        })();
        self.record("candidate dropped", now, result.as_ref().map(|n| serde_json::json!({ "dropped": n })));
        result
    }

    /// Writes the outcome of an update step to `status.json` and the log.
    pub(crate) fn record(&self, what: &str, now: SystemTime, result: Result<serde_json::Value, &Refusal>) {
        let status = match result {
            Ok(mut detail) => {
                detail["result"] = serde_json::json!(what);
                detail["at"] = serde_json::json!(crate::time::format(now));
                tracing::info!(step = what, "update");
                detail
            }
            Err(e) => {
                tracing::warn!(step = what, kind = e.kind.as_str(), reason = %e.detail, "refused; nothing changed");
                serde_json::json!({"result": "refused", "step": what, "at": crate::time::format(now), "kind": e.kind.as_str(), "reason": e.detail})
            }
        };
        self.store.write_status(&status);
    }
}
