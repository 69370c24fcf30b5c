//! Releases and objects uploaded to the console. A release is taken only when its signatures
//! check out against the fleet's root (walking any newer roots it carries) and every object
//! it names (blobs and deltas) is already stored with its signed length.

use crate::console::db::{Connection, OptionalExtension, params};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use outpost_updater::envelope::Envelope;
use outpost_updater::offer::Offer;
use outpost_updater::release::{ReleaseDoc, Target};
use outpost_updater::root::Root;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The largest object taken by `PUT /api/objects/{sha256}`.
pub const MAX_OBJECT_BYTES: u64 = 4 << 30;

/// The first root of each fleet the console serves, by fleet.
pub struct Roots(BTreeMap<String, Root>);

impl Roots {
    /// Reads and checks root documents (each signed by its own root role).
    pub fn load(files: &[PathBuf]) -> anyhow::Result<Roots> {
        let mut roots = BTreeMap::new();
        for f in files {
            let bytes = std::fs::read(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            let env = Envelope::parse(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            let root = Root::trust_first(&env).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            roots.insert(root.doc.fleet.clone(), root);
        }
        Ok(Roots(roots))
    }

    pub fn fleets(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// Checks an uploaded offer: shape, signatures against the fleet's root, and expiry.
pub fn verify(roots: &Roots, bytes: &[u8], now: SystemTime) -> Result<(Offer, ReleaseDoc), String> {
    let offer = Offer::parse(bytes).map_err(|e| e.to_string())?;
    if offer.attempt != 0 {
        return Err("an uploaded offer has no attempt".into());
    }
    let fleet = offer.unverified_doc().map_err(|e| e.to_string())?.fleet;
    let mut root = roots.0.get(&fleet).ok_or_else(|| format!("this console serves no fleet `{fleet}`"))?.clone();
    let mut newer: Vec<(u64, &Envelope)> = Vec::new();
    for env in &offer.roots {
        let version = Root::parse(env).map_err(|e| e.to_string())?.doc.version;
        if version > root.doc.version {
            newer.push((version, env));
        }
    }
    newer.sort_by_key(|(v, _)| *v);
    for (_, env) in newer {
        root = root.rotate(env).map_err(|e| e.to_string())?;
    }
    let unverified = offer.unverified_doc().map_err(|e| e.to_string())?;
    let target = Target { fleet, group: unverified.group };
    let doc = ReleaseDoc::verify(&offer.release, &root, now, &target, None).map_err(|e| e.to_string())?;
    Ok((offer, doc))
}

/// Records a verified release whose objects are all stored (the `blobs` table: any console
/// sharing the database may have taken them).
pub fn add_release(conn: &Connection, offer: &Offer, doc: &ReleaseDoc, now: i64) -> Result<Value, String> {
    for (hash, length) in doc.objects() {
        let stored: Option<i64> = conn
            .query_row("SELECT length FROM blobs WHERE sha256 = ?1", [hash], |r| r.get(0))
            .optional()
            .map_err(|e| e.to_string())?;
        match stored {
            Some(n) if n as u64 == length => {}
            Some(n) => return Err(format!("object {hash} is {n} bytes, the release says {length}")),
            None => return Err(format!("object {hash} ({length} bytes) is not uploaded yet")),
        }
    }
    let id = offer.release_id();
    let models = json!(doc.models.iter().map(|m| json!({"name": m.name, "version": m.version})).collect::<Vec<_>>());
    let bytes: u64 = doc.blobs().map(|b| b.length).sum();
    let added = conn
        .execute(
            "INSERT INTO releases (id, fleet, grp, number, models, offer, bytes, uploaded)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
            params![
                id,
                doc.fleet,
                doc.group,
                doc.number as i64,
                models.to_string(),
                offer.to_bytes(),
                bytes as i64,
                now
            ],
        )
        .map_err(|e| e.to_string())?;
    if added == 1 {
        super::db::event(
            conn,
            now,
            None,
            None,
            "release",
            &format!("release {} ({}/{}) uploaded", doc.number, doc.fleet, doc.group),
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(json!({"id": id, "number": doc.number, "fleet": doc.fleet, "group": doc.group, "new": added == 1}))
}

/// Stores an object under its SHA-256 name: written to a temporary file, hashed on the way,
/// synced, then renamed into place. A body that does not hash to its name is refused and
/// leaves nothing behind.
pub struct ObjectWriter {
    file: std::fs::File,
    tmp: PathBuf,
    dest: PathBuf,
    hash: Sha256,
    len: u64,
    expected: String,
}

impl ObjectWriter {
    pub fn create(objects: &Path, sha256: &str) -> std::io::Result<ObjectWriter> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = objects.join(format!(".upload-{sha256}-{n}"));
        let file = std::fs::File::create(&tmp)?;
        Ok(ObjectWriter { file, tmp, dest: objects.join(sha256), hash: Sha256::new(), len: 0, expected: sha256.into() })
    }

    pub fn write(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.len += chunk.len() as u64;
        if self.len > MAX_OBJECT_BYTES {
            return Err(format!("object over {MAX_OBJECT_BYTES} bytes"));
        }
        self.hash.update(chunk);
        self.file.write_all(chunk).map_err(|e| format!("writing the object: {e}"))
    }

    /// Checks the hash and moves the object into place; its length.
    pub fn finish(self) -> Result<u64, String> {
        let got = hex(&self.hash.clone().finalize());
        if got != self.expected {
            return Err(format!("the body hashes to {got}, not {}", self.expected));
        }
        self.file.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| e.to_string())?;
        if let Some(dir) = self.dest.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(self.len)
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
