//! Making releases (the publisher's side, used by `outpostctl`): a release directory from a
//! spec, deltas against earlier releases, signatures, and root documents.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::envelope::{Envelope, RELEASE_TYPE, ROOT_TYPE};
use crate::keys::PublicKey;
use crate::release::{BlobRef, DeltaEntry, ModelEntry, ReleaseDoc};
use crate::release_dir::ReleaseDir;
use crate::root::{Role, RootDoc};
use crate::{delta, sha256_hex, time};

/// A release spec (TOML), paths relative to the spec's folder:
///
/// ```toml
/// fleet = "demo"
/// group = "default"
/// number = 2
/// expires_in_days = 30
/// chunk_size = 65536        # transfer chunk (default 64 KiB)
/// [[models]]
/// name = "digits"
/// version = "2"
/// path = "digits-edge.onnx"
/// golden = "digits-edge.golden.json"
/// [models.config]
/// backend = "tract"
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseSpec {
    pub fleet: String,
    #[serde(default = "default_group")]
    pub group: String,
    pub number: u64,
    #[serde(default = "default_expiry_days")]
    pub expires_in_days: u64,
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u64,
    pub models: Vec<ModelSpecEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpecEntry {
    pub name: String,
    pub version: String,
    pub path: PathBuf,
    pub golden: Option<PathBuf>,
    /// The model's reference profile (`outpostctl profile`), if it has one.
    pub profile: Option<PathBuf>,
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

fn default_group() -> String {
    "default".into()
}

fn default_expiry_days() -> u64 {
    90
}

/// 64 KiB: a few dozen per second even on a slow cellular link, so progress and the throughput
/// watchdog see steady movement and a lost chunk costs little; the per-chunk overhead (about
/// 250 bytes of request, reply header and MQTT framing) stays under 0.5%.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 10;

fn default_chunk_size() -> u64 {
    DEFAULT_CHUNK_SIZE
}

/// Fills in the chunk hashes of every object of `doc` over one chunk, reading them from the
/// release directory (`blobs/` and `deltas/`).
fn index_chunks(dir: &Path, doc: &mut ReleaseDoc) -> Result<(), String> {
    use std::io::Read;
    doc.chunks.clear();
    if doc.chunk_size == 0 {
        return Ok(());
    }
    let objects: Vec<(String, u64)> = doc.objects().map(|(s, l)| (s.to_owned(), l)).collect();
    for (sha, len) in objects {
        if crate::release::chunk_count(len, doc.chunk_size) == 1 {
            continue;
        }
        let path = ReleaseDir(dir).find(&sha).ok_or_else(|| format!("object {sha} is not in {}", dir.display()))?;
        let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut buf = vec![0u8; doc.chunk_size as usize];
        let mut list = Vec::new();
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                match f.read(&mut buf[filled..]).map_err(err)? {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 {
                break;
            }
            list.push(sha256_hex(&buf[..filled]));
        }
        doc.chunks.insert(sha, list);
    }
    Ok(())
}

fn err(what: impl std::fmt::Display) -> String {
    what.to_string()
}

/// Copies a file into `dir/blobs/` under its hash; returns its reference.
fn add_blob(dir: &Path, src: &Path) -> Result<BlobRef, String> {
    let bytes = std::fs::read(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let sha256 = sha256_hex(&bytes);
    std::fs::write(ReleaseDir(dir).blob(&sha256), &bytes).map_err(err)?;
    Ok(BlobRef { sha256, length: bytes.len() as u64 })
}

/// Makes an unsigned release directory from a spec file.
pub fn create(spec_path: &Path, out: &Path) -> Result<ReleaseDoc, String> {
    let text = std::fs::read_to_string(spec_path).map_err(|e| format!("{}: {e}", spec_path.display()))?;
    let spec: ReleaseSpec = toml::from_str(&text).map_err(|e| format!("{}: {e}", spec_path.display()))?;
    let base = spec_path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(ReleaseDir(out).blobs()).map_err(err)?;
    let mut models = Vec::new();
    for m in &spec.models {
        models.push(ModelEntry {
            name: m.name.clone(),
            version: m.version.clone(),
            format: "onnx".into(),
            blob: add_blob(out, &base.join(&m.path))?,
            golden: m.golden.as_ref().map(|g| add_blob(out, &base.join(g))).transpose()?,
            profile: m.profile.as_ref().map(|p| add_blob(out, &base.join(p))).transpose()?,
            config: m.config.clone(),
        });
    }
    let now = SystemTime::now();
    let mut doc = ReleaseDoc {
        fleet: spec.fleet,
        group: spec.group,
        number: spec.number,
        issued: time::format(now),
        expires: time::format(now + Duration::from_secs(spec.expires_in_days * 86_400)),
        models,
        deltas: Vec::new(),
        chunk_size: spec.chunk_size,
        chunks: Default::default(),
    };
    index_chunks(out, &mut doc)?;
    // The same rules a device applies, so a bad spec fails here rather than on the fleet.
    ReleaseDoc::parse(&serde_json::to_vec(&doc).map_err(err)?).map_err(err)?;
    write_unsigned(out, &doc)?;
    Ok(doc)
}

fn write_unsigned(dir: &Path, doc: &ReleaseDoc) -> Result<(), String> {
    let payload = serde_json::to_vec_pretty(doc).map_err(err)?;
    std::fs::write(ReleaseDir(dir).envelope(), Envelope::new(RELEASE_TYPE, &payload).to_bytes()).map_err(err)
}

/// Reads a release directory's document (signatures not checked).
pub fn read_release(dir: &Path) -> Result<(Envelope, ReleaseDoc), String> {
    let bytes = std::fs::read(ReleaseDir(dir).envelope()).map_err(|e| format!("{}: {e}", dir.display()))?;
    let env = Envelope::parse(&bytes).map_err(err)?;
    let doc = ReleaseDoc::parse(&env.payload(RELEASE_TYPE).map_err(err)?).map_err(err)?;
    Ok((env, doc))
}

/// One delta made (or skipped because it would not be smaller).
#[derive(Debug, serde::Serialize)]
pub struct DeltaReport {
    pub model: String,
    /// `model` or `golden`.
    pub blob: &'static str,
    pub base: String,
    pub full_bytes: u64,
    pub delta_bytes: Option<u64>,
    pub millis: u64,
}

/// Adds zstd patch-from deltas to the (unsigned) release in `dir`, against the same-named models
/// of the release in `base_dir`. A delta is kept only when smaller than the full blob.
pub fn add_deltas(dir: &Path, base_dir: &Path, level: i32) -> Result<Vec<DeltaReport>, String> {
    let (env, mut doc) = read_release(dir)?;
    if !env.signatures.is_empty() {
        return Err("the release is already signed: add deltas before signing".into());
    }
    let (_, base_doc) = read_release(base_dir)?;
    std::fs::create_dir_all(ReleaseDir(dir).deltas()).map_err(err)?;
    let mut reports = Vec::new();
    for m in &doc.models.clone() {
        let Some(old) = base_doc.models.iter().find(|b| b.name == m.name) else { continue };
        let pairs = std::iter::once(("model", &old.blob, &m.blob))
            .chain(old.golden.as_ref().zip(m.golden.as_ref()).map(|(b, t)| ("golden", b, t)));
        for (what, b, t) in pairs {
            if b.sha256 == t.sha256 || doc.deltas.iter().any(|d| d.base == b.sha256 && d.target == t.sha256) {
                continue;
            }
            let base = std::fs::read(ReleaseDir(base_dir).blob(&b.sha256)).map_err(err)?;
            let target = std::fs::read(ReleaseDir(dir).blob(&t.sha256)).map_err(err)?;
            let started = std::time::Instant::now();
            let made = delta::make(&base, &target, level).map_err(err)?;
            let millis = started.elapsed().as_millis() as u64;
            let kept = made.filter(|d| (d.len() as u64) < t.length);
            if let Some(d) = &kept {
                let sha256 = sha256_hex(d);
                std::fs::write(ReleaseDir(dir).delta(&sha256), d).map_err(err)?;
                let window_log = delta::Header::parse(d).map_err(err)?.window_log;
                doc.deltas.push(DeltaEntry {
                    base: b.sha256.clone(),
                    target: t.sha256.clone(),
                    sha256,
                    length: d.len() as u64,
                    window_log,
                });
            }
            reports.push(DeltaReport {
                model: m.name.clone(),
                blob: what,
                base: b.sha256.clone(),
                full_bytes: t.length,
                delta_bytes: kept.map(|d| d.len() as u64),
                millis,
            });
        }
    }
    index_chunks(dir, &mut doc)?;
    write_unsigned(dir, &doc)?;
    Ok(reports)
}

/// Signs an envelope file (a release's `release.json` or a root document) in place.
pub fn sign_file(path: &Path, key: &crate::keys::SecretKey) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut env = Envelope::parse(&bytes).map_err(err)?;
    env.sign(key).map_err(err)?;
    std::fs::write(path, env.to_bytes()).map_err(err)
}

/// What a root document says, before it is dated and signed.
pub struct RootParams<'a> {
    pub fleet: &'a str,
    pub version: u64,
    pub expires_in_days: u64,
    pub root_keys: &'a [PublicKey],
    pub root_threshold: usize,
    pub release_keys: &'a [PublicKey],
    pub release_threshold: usize,
    pub release_expires_in_days: u64,
    pub revoked: &'a [String],
}

/// Makes an unsigned root document.
pub fn root_doc(p: &RootParams) -> Envelope {
    let now = SystemTime::now();
    let days = |d: u64| time::format(now + Duration::from_secs(d * 86_400));
    let doc = RootDoc {
        fleet: p.fleet.into(),
        version: p.version,
        expires: days(p.expires_in_days),
        keys: p.root_keys.iter().chain(p.release_keys).map(|k| (k.id(), k.to_hex())).collect(),
        root: Role { keyids: p.root_keys.iter().map(|k| k.id()).collect(), threshold: p.root_threshold, expires: None },
        release: Role {
            keyids: p.release_keys.iter().map(|k| k.id()).collect(),
            threshold: p.release_threshold,
            expires: Some(days(p.release_expires_in_days)),
        },
        revoked: p.revoked.iter().cloned().collect(),
    };
    Envelope::new(ROOT_TYPE, &serde_json::to_vec_pretty(&doc).expect("a root serialises"))
}
