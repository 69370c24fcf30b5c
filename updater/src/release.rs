//! The release document: one signed file binding everything a device group runs: each model's
//! name, version, format, blob (SHA-256 and length), golden set and serving config; deltas that
//! rebuild blobs from earlier ones; a monotonic number; issue and expiry times; fleet and group.
//!
//! A release directory holds `release.json` (the envelope), `blobs/SHA256`, optionally
//! `deltas/SHA256`, and optionally `root/N.json`, the root versions a device needs to rotate to
//! the root that signs this release.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, RELEASE_TYPE};
use crate::error::{RefusalKind, refuse};
use crate::root::Root;
use crate::{Refusal, is_sha256_hex, time};

/// Largest blob a release may name (a model, a golden file, a delta).
pub const MAX_BLOB_BYTES: u64 = 4 << 30;
/// The model settings a release may carry: how a model is run, never where the daemon writes
/// or sends data (escalation, queues), nor whether its health check runs.
pub const CONFIG_KEYS: [&str; 9] = [
    "backend",
    "workers",
    "queue_bound",
    "intra_op_threads",
    "inter_op_threads",
    "execution_providers",
    "allow_non_finite",
    "batching",
    "drift",
];

/// Largest zstd window a delta may ask for: the device's decode memory is the base blob plus
/// `2^window_log` bytes (plus zstd's own ~130 KiB), so 2^27 bounds it to 128 MiB + base.
pub const MAX_WINDOW_LOG: u32 = 27;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReleaseDoc {
    pub fleet: String,
    pub group: String,
    pub number: u64,
    pub issued: String,
    pub expires: String,
    pub models: Vec<ModelEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<DeltaEntry>,
    /// The transfer chunk size: objects (blobs and deltas) longer than this carry the SHA-256
    /// of each chunk in `chunks`, so a device checks every chunk as it arrives (a single-chunk
    /// object is checked by its own hash). 0: no index (the release travels as a directory).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub chunks: BTreeMap<String, Vec<String>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Chunk sizes a release may use: small enough that one chunk fits an MQTT packet that small
/// brokers and links accept, large enough that per-chunk overhead stays under a few percent.
pub const CHUNK_SIZES: std::ops::RangeInclusive<u64> = 512..=(1 << 20);

/// How many chunks an object of `length` bytes has (at least one, for empty objects).
pub fn chunk_count(length: u64, chunk_size: u64) -> u64 {
    length.div_ceil(chunk_size).max(1)
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    pub version: String,
    pub format: String,
    pub blob: BlobRef,
    /// Golden inputs and outputs (the runtime's golden file), run before activation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden: Option<BlobRef>,
    /// The reference profile (`outpostctl profile`) the device measures drift against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<BlobRef>,
    /// Serving settings, in the runtime's model config keys (backend, workers, batching, ...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub config: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    pub sha256: String,
    pub length: u64,
}

/// A zstd patch-from delta: `target` rebuilt from `base` (both blob hashes).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeltaEntry {
    pub base: String,
    pub target: String,
    pub sha256: String,
    pub length: u64,
    pub window_log: u32,
}

/// Who a device is, for the release's target check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub fleet: String,
    pub group: String,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s != "."
        && s != ".."
}

impl ReleaseDoc {
    /// Parses and checks a release payload's own rules (not its signatures).
    pub fn parse(payload: &[u8]) -> Result<ReleaseDoc, Refusal> {
        let doc: ReleaseDoc = serde_json::from_slice(payload)
            .map_err(|e| Refusal::new(RefusalKind::Malformed, format!("release document: {e}")))?;
        doc.check()?;
        Ok(doc)
    }

    fn check(&self) -> Result<(), Refusal> {
        let bad = |what: String| refuse(RefusalKind::Malformed, format!("release: {what}"));
        for t in [&self.issued, &self.expires] {
            time::parse(t).map_err(|e| Refusal::new(RefusalKind::Malformed, format!("release: {e}")))?;
        }
        if self.models.is_empty() {
            return bad("no models".into());
        }
        let mut names = BTreeSet::new();
        for m in &self.models {
            if !valid_name(&m.name) || !valid_name(&m.version) {
                return bad(format!("model name `{}` / version `{}`: letters, digits, - _ . only", m.name, m.version));
            }
            if !names.insert(&m.name) {
                return bad(format!("model `{}` appears twice", m.name));
            }
            if m.format != "onnx" {
                return bad(format!("model `{}`: format `{}` (only onnx)", m.name, m.format));
            }
            if m.golden.is_none() {
                return bad(format!("model `{}`: a golden set is required (it is the health check)", m.name));
            }
            for b in std::iter::once(&m.blob).chain(&m.golden).chain(&m.profile) {
                check_blob_ref(&b.sha256, b.length)?;
            }
            if let Some(key) = m.config.keys().find(|k| !CONFIG_KEYS.contains(&k.as_str())) {
                return bad(format!(
                    "model `{}`: config key `{key}` is not one a release may set ({})",
                    m.name,
                    CONFIG_KEYS.join(", ")
                ));
            }
        }
        for d in &self.deltas {
            check_blob_ref(&d.sha256, d.length)?;
            if !is_sha256_hex(&d.base) || !self.blobs().any(|b| b.sha256 == d.target) {
                return bad(format!("delta {}: base must be a hash and target one of the release's blobs", d.sha256));
            }
            if !(10..=MAX_WINDOW_LOG).contains(&d.window_log) {
                return bad(format!("delta {}: window_log {} outside 10..={MAX_WINDOW_LOG}", d.sha256, d.window_log));
            }
        }
        self.check_chunks()
    }

    fn check_chunks(&self) -> Result<(), Refusal> {
        let bad = |what: String| refuse(RefusalKind::Malformed, format!("release: {what}"));
        if self.chunk_size == 0 {
            return if self.chunks.is_empty() { Ok(()) } else { bad("chunk hashes without a chunk_size".into()) };
        }
        if !CHUNK_SIZES.contains(&self.chunk_size) {
            return bad(format!(
                "chunk_size {} outside {}..={}",
                self.chunk_size,
                CHUNK_SIZES.start(),
                CHUNK_SIZES.end()
            ));
        }
        let objects: BTreeMap<&str, u64> = self.objects().collect();
        for (sha, len) in &objects {
            let n = chunk_count(*len, self.chunk_size);
            match self.chunks.get(*sha) {
                None if n > 1 => return bad(format!("object {sha} has {n} chunks but no chunk hashes")),
                Some(list) if list.len() as u64 != n || n == 1 => {
                    return bad(format!("object {sha}: {} chunk hashes for {n} chunks", list.len()));
                }
                Some(list) if !list.iter().all(|h| is_sha256_hex(h)) => {
                    return bad(format!("object {sha}: a chunk hash is not a lowercase hex SHA-256"));
                }
                _ => {}
            }
        }
        if let Some(extra) = self.chunks.keys().find(|k| !objects.contains_key(k.as_str())) {
            return bad(format!("chunk hashes for {extra}, which the release does not name"));
        }
        Ok(())
    }

    /// Every object a device may transfer for this release (blobs and deltas), by hash, with
    /// its signed length.
    pub fn objects(&self) -> impl Iterator<Item = (&str, u64)> {
        self.blobs()
            .map(|b| (b.sha256.as_str(), b.length))
            .chain(self.deltas.iter().map(|d| (d.sha256.as_str(), d.length)))
    }

    /// The signed hash of chunk `index` of `object`: its own hash when it is one chunk.
    pub fn chunk_hash<'a>(&'a self, object: &'a str, index: u64) -> Option<&'a str> {
        match self.chunks.get(object) {
            Some(list) => list.get(usize::try_from(index).ok()?).map(String::as_str),
            None => (index == 0).then_some(object),
        }
    }

    /// Every blob the release's models need (model, golden and profile files).
    pub fn blobs(&self) -> impl Iterator<Item = &BlobRef> {
        self.models.iter().flat_map(|m| std::iter::once(&m.blob).chain(&m.golden).chain(&m.profile))
    }

    /// Verifies a release envelope for this device: root and release role unexpired at `now`,
    /// release signatures meeting the threshold, the document well-formed, for this fleet and
    /// group, unexpired, and numbered above the last accepted release.
    pub fn verify(
        env: &Envelope,
        root: &Root,
        now: SystemTime,
        target: &Target,
        last_number: Option<u64>,
    ) -> Result<ReleaseDoc, Refusal> {
        root.check_expiry(now)?;
        let payload = env.payload(RELEASE_TYPE)?;
        root.verify_release(env)?;
        let doc = ReleaseDoc::parse(&payload)?;
        if doc.fleet != target.fleet || doc.group != target.group {
            return refuse(
                RefusalKind::WrongTarget,
                format!("release for {}/{}, this device is {}/{}", doc.fleet, doc.group, target.fleet, target.group),
            );
        }
        let expires = time::parse(&doc.expires).map_err(|e| Refusal::new(RefusalKind::Malformed, e))?;
        if expires <= now {
            return refuse(RefusalKind::Expired, format!("release {} expired at {}", doc.number, doc.expires));
        }
        if let Some(last) = last_number
            && doc.number <= last
        {
            return refuse(
                RefusalKind::Rollback,
                format!("release number {} is not above {last}, the last one accepted", doc.number),
            );
        }
        Ok(doc)
    }
}

fn check_blob_ref(sha256: &str, length: u64) -> Result<(), Refusal> {
    if !is_sha256_hex(sha256) {
        return refuse(RefusalKind::Malformed, format!("release: `{sha256}` is not a lowercase hex SHA-256"));
    }
    if length > MAX_BLOB_BYTES {
        return refuse(
            RefusalKind::Malformed,
            format!("release: blob {sha256} of {length} bytes is over {MAX_BLOB_BYTES}"),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> ReleaseDoc {
        ReleaseDoc {
            fleet: "demo".into(),
            group: "default".into(),
            number: 3,
            issued: "2026-01-01T00:00:00Z".into(),
            expires: "2030-01-01T00:00:00Z".into(),
            models: vec![ModelEntry {
                name: "digits".into(),
                version: "2".into(),
                format: "onnx".into(),
                blob: BlobRef { sha256: "a".repeat(64), length: 100 },
                golden: Some(BlobRef { sha256: "b".repeat(64), length: 10 }),
                profile: None,
                config: Default::default(),
            }],
            deltas: vec![],
            chunk_size: 0,
            chunks: Default::default(),
        }
    }

    #[test]
    fn the_sample_round_trips_and_rules_are_enforced() {
        let doc = sample();
        assert_eq!(ReleaseDoc::parse(&serde_json::to_vec(&doc).unwrap()).unwrap(), doc);
        let mut bad = sample();
        bad.models[0].name = "../etc".into();
        assert!(ReleaseDoc::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
        let mut bad = sample();
        bad.models[0].blob.sha256 = "../../x".into();
        assert!(ReleaseDoc::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
        for key in ["path", "escalation", "skip_golden", "golden"] {
            let mut bad = sample();
            bad.models[0].config.insert(key.into(), "/etc/passwd".into());
            assert!(ReleaseDoc::parse(&serde_json::to_vec(&bad).unwrap()).is_err(), "{key}");
        }
        let mut bad = sample();
        bad.models[0].golden = None;
        assert!(ReleaseDoc::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
        let mut bad = sample();
        bad.deltas.push(DeltaEntry {
            base: "b".repeat(64),
            target: "a".repeat(64),
            sha256: "c".repeat(64),
            length: 5,
            window_log: 40,
        });
        assert!(ReleaseDoc::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ReleaseDoc::parse(&bytes);
            let _ = Envelope::parse(&bytes);
        }

        #[test]
        fn mutated_documents_parse_or_refuse_cleanly(pos in 0usize..400, byte in any::<u8>()) {
            let mut bytes = serde_json::to_vec(&sample()).unwrap();
            let i = pos % bytes.len();
            bytes[i] = byte;
            if let Ok(doc) = ReleaseDoc::parse(&bytes) {
                // Whatever parses obeys the rules: names stay names, hashes stay hashes.
                prop_assert!(doc.models.iter().all(|m| valid_name(&m.name) && is_sha256_hex(&m.blob.sha256)));
            }
        }
    }
}
