//! What a device is told to run: a signed release and the root versions it may need to trust
//! its signers. Over MQTT this is the retained `desired` message; on disk it is a release
//! directory's `release.json` and `root/N.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, MAX_ENVELOPE_BYTES, RELEASE_TYPE};
use crate::error::{RefusalKind, refuse};
use crate::release::ReleaseDoc;
use crate::release_dir::ReleaseDir;
use crate::root::Root;
use crate::{Refusal, sha256_hex};

/// Largest offer accepted: a release and a few root versions.
pub const MAX_OFFER_BYTES: usize = 4 * MAX_ENVELOPE_BYTES;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    pub release: Envelope,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<Envelope>,
    /// Which offer of this release this is: the console raises it to retry a device that
    /// refused or failed (an offer the device already refused is otherwise answered from its
    /// refusal record). Unsigned on purpose: it changes nothing that is trusted.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
    /// Stage the release as the candidate (its models run as shadows of the serving ones)
    /// instead of activating it; the same release offered without it promotes the candidate.
    /// Unsigned like `attempt`: the release's signature already allows it to be active, and the
    /// flag only holds it back. An agent older than the flag refuses such an offer as malformed
    /// rather than activating it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub candidate: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Offer {
    /// Parses an offer (nothing is verified here but its shape and size).
    pub fn parse(bytes: &[u8]) -> Result<Offer, Refusal> {
        if bytes.len() > MAX_OFFER_BYTES {
            return refuse(RefusalKind::Malformed, format!("offer of {} bytes is over {MAX_OFFER_BYTES}", bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|e| Refusal::new(RefusalKind::Malformed, format!("offer: {e}")))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an offer serialises")
    }

    /// The release's id: the SHA-256 of its envelope, as the store names it.
    pub fn release_id(&self) -> String {
        sha256_hex(&self.release.to_bytes())
    }

    /// The release document, unverified (for topics, names and plans; [`crate::apply::Updater`]
    /// verifies before anything is trusted).
    pub fn unverified_doc(&self) -> Result<ReleaseDoc, Refusal> {
        ReleaseDoc::parse(&self.release.payload(RELEASE_TYPE)?)
    }

    /// Reads a release directory's offer: `release.json` and every `root/N.json`.
    pub fn from_dir(dir: &Path) -> Result<Offer, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let release = Envelope::parse(&read(&ReleaseDir(dir).envelope())?).map_err(|e| e.to_string())?;
        let mut roots = Vec::new();
        if let Ok(entries) = std::fs::read_dir(ReleaseDir(dir).roots()) {
            let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths.iter().filter(|p| p.extension().is_some_and(|x| x == "json")) {
                roots.push(Envelope::parse(&read(p)?).map_err(|e| e.to_string())?);
            }
        }
        Ok(Offer { release, roots, attempt: 0, candidate: false })
    }

    /// Writes the offer as a release directory's documents (blobs are added beside them).
    pub fn write_dir(&self, dir: &Path) -> Result<(), Refusal> {
        let io = |e: std::io::Error| Refusal::new(RefusalKind::Storage, format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(ReleaseDir(dir).roots()).map_err(io)?;
        for env in &self.roots {
            let version = Root::parse(env)?.doc.version;
            std::fs::write(ReleaseDir(dir).root(version), env.to_bytes()).map_err(io)?;
        }
        std::fs::write(ReleaseDir(dir).envelope(), self.release.to_bytes()).map_err(io)
    }
}
