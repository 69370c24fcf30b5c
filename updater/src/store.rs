//! The device's on-disk store, under the state directory:
//!
//! ```text
//! current.json        the trusted state: root, active and previous release, last release number
//! docs/SHA256.json    signed envelopes (roots and releases) the state refers to
//! blobs/SHA256        content-addressed blobs (models, golden files)
//! tmp/                files being written (cleared at open)
//! status.json         the last update's outcome (a report, not trusted state)
//! lock                held by the one process that owns the store
//! ```
//!
//! Every file appears by write-temp + fsync + rename + fsync-dir, and `current.json` is replaced
//! last, so a power cut at any point leaves the old or the new state, never a mix. Blobs are
//! named by their hash and only ever added whole, then collected when nothing refers to them.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::{Envelope, RELEASE_TYPE};
use crate::error::{RefusalKind, refuse};
use crate::release::ReleaseDoc;
use crate::root::Root;
use crate::{Refusal, is_sha256_hex, sha256_hex};

/// Test hook for crash-consistency tests, compiled in only with the `test-hooks` feature: with
/// `OUTPOST_UPDATE_PAUSE_AT=N`, the process stops before its N-th durable step (write, fsync,
/// rename, fsync-dir, remove), says so on stderr and waits to be killed.
pub const PAUSE_ENV: &str = "OUTPOST_UPDATE_PAUSE_AT";

/// The trusted state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Current {
    /// Hash of the trusted root envelope (in docs/).
    pub root: String,
    pub active: Option<String>,
    pub previous: Option<String>,
    pub last_number: Option<u64>,
    /// A release found damaged at start (by hash): the same signed document may be applied
    /// again to repair it, although its number is not above `last_number`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<String>,
    /// A release staged as a candidate (by hash): its models run beside the active ones as
    /// shadows until it is promoted to active or dropped. Its number is not yet the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
}

impl Current {
    fn check(&self) -> Result<(), String> {
        let ids = std::iter::once(&self.root)
            .chain(&self.active)
            .chain(&self.previous)
            .chain(&self.repair)
            .chain(&self.candidate);
        match ids.into_iter().find(|id| !is_sha256_hex(id)) {
            Some(bad) => Err(format!("`{bad}` is not a document hash")),
            None => Ok(()),
        }
    }
}

/// The store, locked for this process.
pub struct Store {
    dir: PathBuf,
    _lock: File,
    steps: AtomicU64,
    pause_at: Option<u64>,
}

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> Refusal {
    Refusal::new(RefusalKind::Storage, format!("{what}: {e}"))
}

impl Store {
    /// Opens (creating) the store at `dir` and takes its lock; fails when another process
    /// holds it (a running daemon: send it the update instead).
    ///
    /// On a read-only file system (a disk the kernel remounted read-only after errors) an
    /// existing store opens read-only: what it holds is served, and every update is refused
    /// with the file system's error (`storage`).
    pub fn open(dir: &Path) -> Result<Store, StoreBusy> {
        match Store::open_writable(dir) {
            Err(StoreBusy::ReadOnly(reason)) => {
                let lock = File::open(dir.join("lock")).map_err(|e| StoreBusy::Io(format!("{reason}; {e}")))?;
                match lock.try_lock() {
                    Ok(()) => {}
                    Err(fs::TryLockError::WouldBlock) => return Err(StoreBusy::Locked),
                    Err(fs::TryLockError::Error(e)) => {
                        return Err(StoreBusy::Io(format!("lock {}: {e}", dir.display())));
                    }
                }
                tracing::warn!(store = %dir.display(), reason, "the store is read-only: serving what it holds; updates are refused");
                let pause_at = std::env::var(PAUSE_ENV).ok().and_then(|v| v.parse().ok());
                Ok(Store { dir: dir.to_owned(), _lock: lock, steps: AtomicU64::new(0), pause_at })
            }
            other => other,
        }
    }

    fn open_writable(dir: &Path) -> Result<Store, StoreBusy> {
        let io = |p: &Path, e: std::io::Error| {
            let text = format!("{}: {e}", p.display());
            if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem {
                StoreBusy::ReadOnly(text)
            } else {
                StoreBusy::Io(text)
            }
        };
        let fresh = !dir.join("docs").is_dir();
        for sub in ["", "docs", "blobs", "tmp"] {
            fs::create_dir_all(dir.join(sub)).map_err(|e| io(&dir.join(sub), e))?;
        }
        if fresh {
            // The new folders must survive a power cut before anything in them is trusted.
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            for d in [dir, parent] {
                File::open(d).and_then(|f| f.sync_all()).map_err(|e| io(d, e))?;
            }
        }
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(|e| io(&dir.join("lock"), e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreBusy::Locked),
            Err(fs::TryLockError::Error(e)) => return Err(StoreBusy::Io(format!("lock {}: {e}", dir.display()))),
        }
        // Leftovers of an interrupted write are never referenced: drop them.
        if let Ok(entries) = fs::read_dir(dir.join("tmp")) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let pause_at = std::env::var(PAUSE_ENV).ok().and_then(|v| v.parse().ok());
        Ok(Store { dir: dir.to_owned(), _lock: lock, steps: AtomicU64::new(0), pause_at })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Counts a durable step (and, in builds with the `test-hooks` feature, pauses there).
    fn step(&self, what: &str, path: &Path) {
        let n = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
        if cfg!(feature = "test-hooks") && self.pause_at == Some(n) {
            eprintln!("outpost: paused before update step {n}: {what} {}", path.display());
            loop {
                std::thread::park();
            }
        }
    }

    fn tmp_path(&self, name: &str) -> PathBuf {
        self.dir.join("tmp").join(format!("{name}.{}", std::process::id()))
    }

    fn sync_dir(&self, dir: &Path) -> Result<(), Refusal> {
        self.step("fsync-dir", dir);
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir.display(), e))
    }

    /// Moves a complete, synced temp file into place and makes the rename durable.
    fn publish(&self, tmp: &Path, dest: &Path) -> Result<(), Refusal> {
        self.step("rename", dest);
        fs::rename(tmp, dest).map_err(|e| io_err(dest.display(), e))?;
        self.sync_dir(dest.parent().expect("store paths have a parent"))
    }

    /// Writes a small file atomically.
    pub fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), Refusal> {
        let tmp = self.tmp_path(&dest.file_name().expect("a file name").to_string_lossy());
        self.step("write", &tmp);
        let mut f = File::create(&tmp).map_err(|e| io_err(tmp.display(), e))?;
        f.write_all(bytes).map_err(|e| io_err(tmp.display(), e))?;
        self.step("fsync", &tmp);
        f.sync_all().map_err(|e| io_err(tmp.display(), e))?;
        drop(f);
        self.publish(&tmp, dest)
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        debug_assert!(is_sha256_hex(sha256));
        self.dir.join("blobs").join(sha256)
    }

    fn doc_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("docs").join(format!("{sha256}.json"))
    }

    pub fn has_blob(&self, sha256: &str) -> bool {
        self.blob_path(sha256).is_file()
    }

    /// Whether a stored blob is there and still hashes to its name. A read error other than
    /// "not found" is an error, not damage: nothing is repaired or dropped on its account.
    pub fn blob_intact(&self, sha256: &str) -> Result<bool, Refusal> {
        let path = self.blob_path(sha256);
        match hash_file(&path) {
            Ok((h, _)) => Ok(h == sha256),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(path.display(), e)),
        }
    }

    /// Writes a new blob: `fill` writes its bytes into a temp file; the result must be exactly
    /// `length` bytes hashing to `sha256`, else nothing is added. Returns whether the blob is new.
    pub fn add_blob(
        &self,
        sha256: &str,
        length: u64,
        fill: impl FnOnce(&mut dyn Write) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        let tmp = self.tmp_path(sha256);
        self.step("write", &tmp);
        let file = File::create(&tmp).map_err(|e| io_err(tmp.display(), e))?;
        let mut w = HashingWriter { inner: std::io::BufWriter::new(file), hasher: Sha256::new(), len: 0 };
        let result = fill(&mut w).and_then(|()| {
            if w.len != length {
                return refuse(RefusalKind::WrongLength, format!("blob {sha256}: {} bytes, {length} signed", w.len));
            }
            let got = hex::encode(w.hasher.clone().finalize());
            if got != sha256 {
                return refuse(RefusalKind::HashMismatch, format!("blob hashes to {got}, {sha256} signed"));
            }
            Ok(())
        });
        if let Err(e) = result {
            drop(w);
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let file = w.inner.into_inner().map_err(|e| io_err(tmp.display(), e.into_error()))?;
        self.step("fsync", &tmp);
        file.sync_all().map_err(|e| io_err(tmp.display(), e))?;
        drop(file);
        self.publish(&tmp, &self.blob_path(sha256))
    }

    /// Stores a signed envelope under its hash; returns the hash.
    pub fn put_doc(&self, env: &Envelope) -> Result<String, Refusal> {
        let bytes = env.to_bytes();
        let sha = sha256_hex(&bytes);
        let path = self.doc_path(&sha);
        let intact = fs::read(&path).is_ok_and(|held| sha256_hex(&held) == sha);
        if !intact {
            self.write_atomic(&path, &bytes)?;
        }
        Ok(sha)
    }

    pub fn doc(&self, sha256: &str) -> Result<Envelope, Refusal> {
        let path = self.doc_path(sha256);
        let bytes = fs::read(&path).map_err(|e| io_err(path.display(), e))?;
        if sha256_hex(&bytes) != sha256 {
            return refuse(RefusalKind::Storage, format!("{} is damaged (hash differs)", path.display()));
        }
        Envelope::parse(&bytes)
    }

    /// The trusted state, or `None` before provisioning.
    pub fn current(&self) -> Result<Option<Current>, Refusal> {
        let path = self.dir.join("current.json");
        match fs::read(&path) {
            Ok(bytes) => {
                let bad = |e: String| Refusal::new(RefusalKind::Storage, format!("{}: {e}", path.display()));
                let current: Current = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
                current.check().map_err(bad)?;
                Ok(Some(current))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path.display(), e)),
        }
    }

    /// Replaces the trusted state (the commit point of an update).
    pub fn commit(&self, current: &Current) -> Result<(), Refusal> {
        let bytes = serde_json::to_vec_pretty(current).expect("state serialises");
        self.write_atomic(&self.dir.join("current.json"), &bytes)
    }

    /// The trusted root.
    pub fn root(&self, current: &Current) -> Result<Root, Refusal> {
        Root::parse(&self.doc(&current.root)?)
    }

    /// A stored release document (verified when it was accepted).
    pub fn release(&self, sha256: &str) -> Result<ReleaseDoc, Refusal> {
        ReleaseDoc::parse(&self.doc(sha256)?.payload(RELEASE_TYPE)?)
    }

    /// Provisions the first trusted root (self-signed by a threshold of its root keys). Refused
    /// when the store already trusts a root: rotation goes through releases.
    pub fn provision(&self, root_env: &Envelope, fleet: &str) -> Result<Root, Refusal> {
        if self.current()?.is_some() {
            return refuse(RefusalKind::RootVersion, "this device already trusts a root; rotate it with a release");
        }
        let root = Root::trust_first(root_env)?;
        if root.doc.fleet != fleet {
            return refuse(
                RefusalKind::WrongTarget,
                format!("root of fleet `{}`, this device is in `{fleet}`", root.doc.fleet),
            );
        }
        root.check_expiry(std::time::SystemTime::now())?;
        let sha = self.put_doc(root_env)?;
        self.commit(&Current { root: sha, ..Current::default() })?;
        Ok(root)
    }

    /// At start: checks that every blob of the active release is intact; when one is not,
    /// falls back to the previous release (if intact) and records that. Returns the release to
    /// serve and what was found.
    pub fn check_at_start(&self) -> Result<StartCheck, Refusal> {
        let Some(mut current) = self.current()? else { return Ok(StartCheck::default()) };
        let Some(active) = current.active.clone() else { return Ok(StartCheck::default()) };
        let damage = match self.release_damage(&active)? {
            None => return Ok(StartCheck { active: Some((active.clone(), self.release(&active)?)), fell_back: None }),
            Some(d) => d,
        };
        let previous = match current.previous.clone() {
            Some(p) if self.release_damage(&p)?.is_none() => Some(p),
            _ => None,
        };
        let report = format!(
            "active release {} is damaged ({damage}); {}",
            crate::short(&active),
            if previous.is_some() { "fell back to the previous release" } else { "no intact release to fall back to" }
        );
        tracing::error!(report, "store check at start");
        current.repair = Some(active.clone());
        current.active = previous.clone();
        current.previous = None;
        self.commit(&current)?;
        let active = match previous {
            Some(p) => Some((p.clone(), self.release(&p)?)),
            None => None,
        };
        Ok(StartCheck { active, fell_back: Some(report) })
    }

    /// What is wrong with a stored release, if anything (an I/O error is not damage).
    fn release_damage(&self, sha: &str) -> Result<Option<String>, Refusal> {
        let path = self.doc_path(sha);
        let doc = match fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some(format!("{} is missing", path.display())));
            }
            Err(e) => return Err(io_err(path.display(), e)),
            Ok(bytes) if sha256_hex(&bytes) != sha => return Ok(Some(format!("{} is altered", path.display()))),
            Ok(_) => self.release(sha)?,
        };
        for b in doc.blobs() {
            if !self.blob_intact(&b.sha256)? {
                return Ok(Some(format!("blob {} is missing or altered", crate::short(&b.sha256))));
            }
        }
        Ok(None)
    }

    /// Removes blobs and documents that the trusted state no longer refers to.
    pub fn collect_garbage(&self) -> Result<usize, Refusal> {
        let Some(current) = self.current()? else { return Ok(0) };
        let mut keep_docs: BTreeSet<String> = BTreeSet::from([current.root.clone()]);
        keep_docs.extend(current.repair.clone());
        let mut keep_blobs = BTreeSet::new();
        for r in current.active.iter().chain(&current.previous).chain(&current.candidate) {
            keep_docs.insert(r.clone());
            keep_blobs.extend(self.release(r)?.blobs().map(|b| b.sha256.clone()));
        }
        let mut removed = 0;
        for (sub, keep, suffix) in [("blobs", &keep_blobs, ""), ("docs", &keep_docs, ".json")] {
            let dir = self.dir.join(sub);
            let entries = fs::read_dir(&dir).map_err(|e| io_err(dir.display(), e))?;
            let mut any = false;
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(suffix).unwrap_or(&name);
                if !keep.contains(id) {
                    self.step("remove", &e.path());
                    fs::remove_file(e.path()).map_err(|err| io_err(e.path().display(), err))?;
                    removed += 1;
                    any = true;
                }
            }
            if any {
                self.sync_dir(&dir)?;
            }
        }
        Ok(removed)
    }

    /// Removes blobs added by an update that did not commit.
    pub fn discard_blobs(&self, added: &[String]) {
        for sha in added {
            let _ = fs::remove_file(self.blob_path(sha));
        }
    }

    /// Records the last update's outcome (a report, not trusted state).
    pub fn write_status(&self, status: &serde_json::Value) {
        let path = self.dir.join("status.json");
        if let Err(e) = fs::write(&path, serde_json::to_vec_pretty(status).unwrap_or_default()) {
            tracing::warn!(error = %e, "cannot record the update status");
        }
    }
}

/// What [`Store::check_at_start`] found.
#[derive(Debug, Default)]
pub struct StartCheck {
    /// The release to serve (hash, document).
    pub active: Option<(String, ReleaseDoc)>,
    /// Set when the active release was damaged and the store fell back.
    pub fell_back: Option<String>,
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreBusy {
    #[error("the store is locked by another process (a running daemon?)")]
    Locked,
    #[error("{0}")]
    Io(String),
    /// The file system is read-only (only while opening; [`Store::open`] then opens read-only).
    #[error("{0}")]
    ReadOnly(String),
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// SHA-256 and length of a file, streamed.
pub fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((hex::encode(hasher.finalize()), len));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}
