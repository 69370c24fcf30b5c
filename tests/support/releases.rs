//! Release fixtures for the update tests: a fleet's keys and root, release directories built
//! with the real updater library, a store provisioned through the real `outpost` binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use outpost_updater::author::{RootParams, root_doc};
use outpost_updater::envelope::{Envelope, RELEASE_TYPE};
use outpost_updater::keys::SecretKey;
use outpost_updater::release::{BlobRef, ModelEntry, ReleaseDoc};
use outpost_updater::{sha256_hex, time};

pub const FLEET: &str = "demo";

/// A fleet: root key, release key, and root version 1 trusting them (threshold 1).
pub struct Fleet {
    pub root_key: SecretKey,
    pub release_key: SecretKey,
    pub root1: Envelope,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    pub fn new() -> Fleet {
        let root_key = SecretKey::generate().unwrap();
        let release_key = SecretKey::generate().unwrap();
        let root1 = root_version(1, &root_key, &[&release_key], 1, &[], &[&root_key]);
        Fleet { root_key, release_key, root1 }
    }
}

/// A root document of `version` whose root key is `root_key`, with the given release keys,
/// threshold and revocations, signed by `signers`.
pub fn root_version(
    version: u64,
    root_key: &SecretKey,
    release_keys: &[&SecretKey],
    release_threshold: usize,
    revoked: &[String],
    signers: &[&SecretKey],
) -> Envelope {
    let release: Vec<_> = release_keys.iter().map(|k| k.public()).collect();
    let mut env = root_doc(&RootParams {
        fleet: FLEET,
        version,
        expires_in_days: 365,
        root_keys: &[root_key.public()],
        root_threshold: 1,
        release_keys: &release,
        release_threshold,
        release_expires_in_days: 90,
        revoked,
    });
    for s in signers {
        env.sign(s).unwrap();
    }
    env
}

/// A model entry for files on disk.
pub fn model_entry(name: &str, version: &str, model: &Path, golden: Option<&Path>) -> ModelEntry {
    let blob = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        BlobRef { sha256: sha256_hex(&bytes), length: bytes.len() as u64 }
    };
    ModelEntry {
        name: name.into(),
        version: version.into(),
        format: "onnx".into(),
        blob: blob(model),
        golden: golden.map(blob),
        profile: None,
        config: Default::default(),
    }
}

/// A release document for the demo fleet's default group, valid for 30 days.
pub fn release_doc(number: u64, models: Vec<ModelEntry>) -> ReleaseDoc {
    let now = SystemTime::now();
    ReleaseDoc {
        fleet: FLEET.into(),
        group: "default".into(),
        number,
        issued: time::format(now),
        expires: time::format(now + Duration::from_secs(30 * 86_400)),
        models,
        deltas: Vec::new(),
        chunk_size: 0,
        chunks: Default::default(),
    }
}

/// The envelope of a document, signed by `signers`.
pub fn signed(doc: &ReleaseDoc, signers: &[&SecretKey]) -> Envelope {
    let mut env = Envelope::new(RELEASE_TYPE, &serde_json::to_vec_pretty(doc).unwrap());
    for s in signers {
        env.sign(s).unwrap();
    }
    env
}

/// Writes a release directory: `release.json`, the files as blobs (named by hash), and root
/// versions under `root/N.json`.
pub fn write_release(dir: &Path, env: &Envelope, files: &[&Path], roots: &[&Envelope]) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::write(dir.join("release.json"), env.to_bytes()).unwrap();
    for f in files {
        let bytes = std::fs::read(f).unwrap();
        std::fs::write(dir.join("blobs").join(sha256_hex(&bytes)), bytes).unwrap();
    }
    if !roots.is_empty() {
        std::fs::create_dir_all(dir.join("root")).unwrap();
        for r in roots {
            // The version as written, even in a root the device will refuse.
            let payload: serde_json::Value =
                serde_json::from_slice(&r.payload(outpost_updater::envelope::ROOT_TYPE).unwrap()).unwrap();
            let v = payload["version"].as_u64().unwrap();
            std::fs::write(dir.join("root").join(format!("{v}.json")), r.to_bytes()).unwrap();
        }
    }
    dir.to_owned()
}

/// The trusted state on disk: every file of the store but the lock, the status report and
/// temp files, with its hash.
pub fn trusted_state(state_dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for sub in ["", "docs", "blobs"] {
        let Ok(entries) = std::fs::read_dir(state_dir.join(sub)) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_file() && !["lock", "status.json"].contains(&name.as_str()) {
                out.insert(format!("{sub}/{name}"), sha256_hex(&std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

/// A daemon configuration (`STATE_DIR.toml`) with a store at `state_dir`, listening on `listen`.
pub fn store_config(state_dir: &Path, listen: &str) -> PathBuf {
    let path = state_dir.with_extension("toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"{listen}\"\n[updates]\nstate_dir = {state_dir:?}\nfleet = \"{FLEET}\"\n"),
    )
    .unwrap();
    path
}

/// Release `number` of the demo fleet in `dir/r{number}`: sample model `sample` (with its golden
/// outputs) as model `name`, version `number`, signed by the fleet's release key.
pub fn sample_release(dir: &Path, fleet: &Fleet, number: u64, name: &str, sample: &str) -> PathBuf {
    let models = crate::models_dir();
    let (m, g) = (models.join(format!("{sample}.onnx")), models.join(format!("{sample}.golden.json")));
    let doc = release_doc(number, vec![model_entry(name, &number.to_string(), &m, Some(&g))]);
    write_release(&dir.join(format!("r{number}")), &signed(&doc, &[&fleet.release_key]), &[&m, &g], &[])
}
