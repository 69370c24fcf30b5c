//! Applying a release directory on a device: verify, fetch into the store (delta or full blob),
//! stage in the runtime (load, warm up, golden check), commit, activate. Any failure before the
//! commit leaves the trusted state and what is served as they were, and is reported.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use crate::envelope::{Envelope, MAX_ENVELOPE_BYTES};
use crate::error::{RefusalKind, refuse};
use crate::host::{ModelHost, staged_models};
use crate::offer::Offer;
use crate::release::{BlobRef, ReleaseDoc, Target};
use crate::release_dir::ReleaseDir;
use crate::root::Root;
use crate::store::{Current, Store};
use crate::{Refusal, delta, time};

/// What an applied release changed, and what it cost.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Applied {
    pub number: u64,
    pub release: String,
    pub models: Vec<(String, String)>,
    /// Blobs taken whole, rebuilt from deltas, and already held.
    pub full: usize,
    pub from_delta: usize,
    pub reused: usize,
    /// Bytes read from the release directory.
    pub bytes_read: u64,
    pub millis: u64,
}

impl Applied {
    /// The outcome of activating release `sha` (document `doc`) from blobs the store already
    /// held: nothing fetched or rebuilt.
    pub(crate) fn from_store(doc: &ReleaseDoc, sha: String, started: Instant) -> Applied {
        let blobs: std::collections::BTreeSet<&str> = doc.blobs().map(|b| b.sha256.as_str()).collect();
        Applied {
            number: doc.number,
            release: sha,
            models: doc.models.iter().map(|m| (m.name.clone(), m.version.clone())).collect(),
            full: 0,
            from_delta: 0,
            reused: blobs.len(),
            bytes_read: 0,
            millis: started.elapsed().as_millis() as u64,
        }
    }
}

/// Opens a regular file of a release directory without blocking: a FIFO or device (which could
/// stall the update or feed it endless data) is refused before any read.
fn open_regular(path: &Path, what: &str) -> Result<File, Refusal> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK (the same value on every Linux architecture Outpost targets): opening a FIFO
    // must not wait for a writer.
    const O_NONBLOCK: i32 = 0o4000;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .map_err(|e| Refusal::new(RefusalKind::Missing, format!("{what} {}: {e}", path.display())))?;
    let meta = f.metadata().map_err(|e| Refusal::new(RefusalKind::Storage, e.to_string()))?;
    if !meta.is_file() {
        return refuse(RefusalKind::Malformed, format!("{what} {} is not a regular file", path.display()));
    }
    Ok(f)
}

/// Reads at most `limit` bytes of a file; more is refused (endless data).
fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, Refusal> {
    let f = open_regular(path, what)?;
    let mut bytes = Vec::new();
    f.take(limit + 1).read_to_end(&mut bytes).map_err(|e| Refusal::new(RefusalKind::Storage, e.to_string()))?;
    if bytes.len() as u64 > limit {
        return refuse(RefusalKind::WrongLength, format!("{what} is longer than its {limit}-byte limit"));
    }
    Ok(bytes)
}

/// The root versions in `dir/root/` above `trusted`, in order; a gap is refused.
fn root_chain(dir: &Path, trusted: u64) -> Result<Vec<(u64, PathBuf)>, Refusal> {
    let mut found: Vec<(u64, PathBuf)> = match std::fs::read_dir(ReleaseDir(dir).roots()) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json")?.parse::<u64>().ok().map(|v| (v, e.path()))
            })
            .filter(|(v, _)| *v > trusted)
            .collect(),
        Err(_) => Vec::new(),
    };
    found.sort();
    for (i, (v, _)) in found.iter().enumerate() {
        let want = trusted + 1 + i as u64;
        if *v != want {
            return refuse(RefusalKind::RootVersion, format!("root version {v} offered but version {want} is missing"));
        }
    }
    Ok(found)
}

/// A release fetched and staged, not yet trusted or served.
pub(crate) struct Prepared<S> {
    pub verified: Verified,
    pub staged: S,
    /// Blobs the fetch added to the store (removed again if the release is not committed).
    pub added: Vec<String>,
    pub applied: Applied,
}

/// A release verified for this device (not yet fetched, staged or trusted).
pub struct Verified {
    pub doc: ReleaseDoc,
    pub env: Envelope,
    pub new_roots: Vec<Envelope>,
    pub(crate) current: Current,
}

/// One object to fetch for a release: a whole blob, or a delta that rebuilds `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub object: String,
    pub length: u64,
    pub delta: bool,
    pub target: String,
}

/// Applies release directories to one store for one device.
pub struct Updater {
    pub store: Store,
    pub target: Target,
}

impl Updater {
    /// Verifies the release in `dir` and everything it names, then stages, commits and
    /// activates it; on failure nothing trusted or served changes, and `status.json` says why.
    pub fn apply_dir<H: ModelHost>(&self, dir: &Path, host: &H) -> Result<Applied, Refusal> {
        let started = Instant::now();
        // Expiry is judged against one time, fixed when the update starts.
        let now = SystemTime::now();
        let result = self.apply_at(dir, host, now, started);
        let status = match &result {
            Ok(a) => serde_json::json!({"result": "applied", "at": time::format(now), "applied": a}),
            Err(e) => {
                serde_json::json!({"result": "refused", "at": time::format(now), "kind": e.kind.as_str(), "reason": e.detail})
            }
        };
        self.store.write_status(&status);
        match &result {
            Ok(a) => {
                tracing::info!(number = a.number, ms = a.millis, full = a.full, delta = a.from_delta, "release applied")
            }
            Err(e) => tracing::warn!(kind = e.kind.as_str(), reason = %e.detail, "release refused; nothing changed"),
        }
        result
    }

    /// Verifies an offer for this device without fetching or trusting anything: the root chain
    /// it carries, the release's signatures, target, expiry and number.
    pub fn verify(&self, offer: &Offer, now: SystemTime) -> Result<Verified, Refusal> {
        let store = &self.store;
        let Some(current) = store.current()? else {
            return refuse(RefusalKind::Missing, "this device has no trusted root yet (outpost update provision ROOT)");
        };
        // Walk the root chain one version at a time.
        let mut root: Root = store.root(&current)?;
        let mut offered = Vec::new();
        for env in &offer.roots {
            let version = Root::parse(env)?.doc.version;
            if version > root.doc.version {
                offered.push((version, env));
            }
        }
        offered.sort_by_key(|(v, _)| *v);
        let mut new_roots = Vec::new();
        for (_, env) in offered {
            root = root.rotate(env)?;
            new_roots.push(env.clone());
        }
        // The very document found damaged at start may be applied again to repair it.
        let repairing = current.repair.as_deref() == Some(offer.release_id().as_str());
        let last_number = if repairing { None } else { current.last_number };
        let doc = ReleaseDoc::verify(&offer.release, &root, now, &self.target, last_number)?;
        Ok(Verified { doc, env: offer.release.clone(), new_roots, current })
    }

    /// Whether the offer is the release already active (nothing to do).
    pub fn is_active(&self, offer: &Offer) -> bool {
        let current = self.store.current().ok().flatten();
        current.and_then(|c| c.active).is_some_and(|a| a == offer.release_id())
    }

    /// What must be fetched to apply a verified release: per blob, nothing when the store holds
    /// it intact, the delta when the store holds the delta's base intact, else the whole blob.
    /// (The one choice: [`Updater::apply_dir`] brings blobs in by it too.)
    pub fn plan(&self, doc: &ReleaseDoc) -> Result<Vec<Transfer>, Refusal> {
        let mut out: Vec<Transfer> = Vec::new();
        for blob in doc.blobs() {
            if out.iter().any(|t| t.target == blob.sha256) || self.store.blob_intact(&blob.sha256)? {
                continue;
            }
            let delta =
                doc.deltas.iter().find(|d| d.target == blob.sha256 && self.store.blob_intact(&d.base).unwrap_or(false));
            out.push(match delta {
                Some(d) => {
                    Transfer { object: d.sha256.clone(), length: d.length, delta: true, target: blob.sha256.clone() }
                }
                None => Transfer {
                    object: blob.sha256.clone(),
                    length: blob.length,
                    delta: false,
                    target: blob.sha256.clone(),
                },
            });
        }
        Ok(out)
    }

    fn apply_at<H: ModelHost>(
        &self,
        dir: &Path,
        host: &H,
        now: SystemTime,
        started: Instant,
    ) -> Result<Applied, Refusal> {
        let Prepared { verified, staged, mut applied, .. } = self.prepare(dir, host, now, started)?;
        // Commit: the documents first, then the state that names them, in one rename.
        let (root_sha, release_sha) = self.put_docs(&verified)?;
        let Verified { doc, current, .. } = verified;
        let next = Current {
            root: root_sha,
            active: Some(release_sha.clone()),
            previous: current.active.clone().filter(|a| *a != release_sha),
            last_number: Some(doc.number.max(current.last_number.unwrap_or(0))),
            repair: None,
            // A release applied over a candidate replaces it.
            candidate: None,
        };
        self.commit(&next)?;
        if current.candidate.is_some() {
            drop(host.take_shadow());
        }
        host.activate(staged);
        self.collect_garbage();
        applied.millis = started.elapsed().as_millis() as u64;
        Ok(applied)
    }

    /// Verifies the release in `dir`, fetches what it names into the store and stages its
    /// models; nothing is trusted or served yet. On failure the blobs it added are removed.
    pub(crate) fn prepare<H: ModelHost>(
        &self,
        dir: &Path,
        host: &H,
        now: SystemTime,
        started: Instant,
    ) -> Result<Prepared<H::Staged>, Refusal> {
        let store = &self.store;
        let trusted = match store.current()? {
            Some(c) => store.root(&c)?.doc.version,
            None => 0,
        };
        let release =
            Envelope::parse(&read_bounded(&ReleaseDir(dir).envelope(), MAX_ENVELOPE_BYTES as u64, "release.json")?)?;
        let mut roots = Vec::new();
        for (_, path) in root_chain(dir, trusted)? {
            roots.push(Envelope::parse(&read_bounded(&path, MAX_ENVELOPE_BYTES as u64, "root document")?)?);
        }
        let verified = self.verify(&Offer { release, roots, attempt: 0, candidate: false }, now)?;
        let doc = &verified.doc;

        let mut added = Vec::new();
        let fetched = self.fetch_all(dir, doc, &mut added);
        let (full, from_delta, reused, bytes_read) = match fetched {
            Ok(counts) => counts,
            Err(e) => {
                store.discard_blobs(&added);
                return Err(e);
            }
        };

        let staged = match host.stage(&staged_models(store, doc)) {
            Ok(s) => s,
            Err(e) => {
                store.discard_blobs(&added);
                return refuse(RefusalKind::HealthCheck, e.to_string());
            }
        };
        let applied = Applied {
            number: doc.number,
            release: crate::sha256_hex(&verified.env.to_bytes()),
            models: doc.models.iter().map(|m| (m.name.clone(), m.version.clone())).collect(),
            full,
            from_delta,
            reused,
            bytes_read,
            millis: started.elapsed().as_millis() as u64,
        };
        Ok(Prepared { verified, staged, added, applied })
    }

    /// Stores a verified release's documents (the root versions it brought, then the release)
    /// before a state names them; returns the trusted root's hash and the release's.
    pub(crate) fn put_docs(&self, verified: &Verified) -> Result<(String, String), Refusal> {
        let mut root = verified.current.root.clone();
        for r in &verified.new_roots {
            root = self.store.put_doc(r)?;
        }
        Ok((root, self.store.put_doc(&verified.env)?))
    }

    /// Commits a new trusted state. Past the rename the new state is what a restart finds: a
    /// failure after it (the directory sync) counts as committed.
    pub(crate) fn commit(&self, next: &Current) -> Result<(), Refusal> {
        if let Err(e) = self.store.commit(next) {
            if self.store.current().ok().flatten().as_ref() != Some(next) {
                return Err(e);
            }
            tracing::warn!(error = %e, "the commit's directory sync failed after the rename; continuing as committed");
        }
        Ok(())
    }

    /// Removes what the trusted state no longer names (retried after the next update on failure).
    pub(crate) fn collect_garbage(&self) {
        if let Err(e) = self.store.collect_garbage() {
            tracing::warn!(error = %e, "garbage collection failed; it is retried after the next update");
        }
    }

    /// Brings every blob of the release into the store by [`Updater::plan`], the choice the
    /// MQTT transfer fetched by: reused when held and intact, rebuilt from a delta when the
    /// release has one against a held base, else copied whole.
    fn fetch_all(
        &self,
        dir: &Path,
        doc: &ReleaseDoc,
        added: &mut Vec<String>,
    ) -> Result<(usize, usize, usize, u64), Refusal> {
        let plan = self.plan(doc)?;
        let distinct: std::collections::BTreeSet<&str> = doc.blobs().map(|b| b.sha256.as_str()).collect();
        let (mut full, mut from_delta, mut bytes) = (0, 0, 0u64);
        for t in &plan {
            let blob = doc.blobs().find(|b| b.sha256 == t.target).expect("the plan names the release's blobs");
            // A damaged copy is not removed: the verified replacement is renamed over it.
            let held = self.store.has_blob(&blob.sha256);
            if t.delta {
                let d =
                    doc.deltas.iter().find(|d| d.sha256 == t.object && d.target == t.target).expect("planned delta");
                bytes += self.rebuild(dir, d, blob)?;
                from_delta += 1;
            } else {
                bytes += self.copy_full(dir, blob)?;
                full += 1;
            }
            if !held {
                added.push(blob.sha256.clone());
            }
        }
        Ok((full, from_delta, distinct.len() - plan.len(), bytes))
    }

    fn copy_full(&self, dir: &Path, blob: &BlobRef) -> Result<u64, Refusal> {
        let path = ReleaseDir(dir).blob(&blob.sha256);
        let f = open_regular(&path, "blob")?;
        // Length first: a file longer than signed is refused before it is read.
        let len = f.metadata().map_err(|e| Refusal::new(RefusalKind::Storage, e.to_string()))?.len();
        if len > blob.length {
            return refuse(
                RefusalKind::WrongLength,
                format!("blob {} is {len} bytes, {} signed", crate::short(&blob.sha256), blob.length),
            );
        }
        // Reading stops one byte past the signed length whatever the file claims (a pipe or a
        // growing file), so endless data costs at most that.
        self.store.add_blob(&blob.sha256, blob.length, |w| {
            std::io::copy(&mut f.take(blob.length + 1), w)
                .map(drop)
                .map_err(|e| Refusal::new(RefusalKind::Storage, format!("copying {}: {e}", path.display())))
        })?;
        Ok(blob.length)
    }

    fn rebuild(&self, dir: &Path, d: &crate::release::DeltaEntry, blob: &BlobRef) -> Result<u64, Refusal> {
        let bytes = read_bounded(&ReleaseDir(dir).delta(&d.sha256), d.length, "delta")?;
        if bytes.len() as u64 != d.length || crate::sha256_hex(&bytes) != d.sha256 {
            return refuse(
                RefusalKind::HashMismatch,
                format!("delta {} differs from the signed one", crate::short(&d.sha256)),
            );
        }
        let base = std::fs::read(self.store.blob_path(&d.base))
            .map_err(|e| Refusal::new(RefusalKind::Storage, e.to_string()))?;
        self.store
            .add_blob(&blob.sha256, blob.length, |w| delta::apply(&bytes[..], &base, d, blob.length, w).map(drop))?;
        Ok(d.length)
    }
}
