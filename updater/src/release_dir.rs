//! The layout of a release directory, named in one place: what `outpostctl release create`
//! writes, what the MQTT transfer downloads into, what the blob server and console serve from,
//! and what `apply_dir` reads.
//!
//! ```text
//! release.json         the signed release envelope
//! root/{version}.json  root documents, for devices that trust an older root
//! blobs/{sha256}       whole blobs (models, golden files)
//! deltas/{sha256}      zstd patches against a blob of an earlier release
//! ```

use std::path::{Path, PathBuf};

/// A release directory's paths.
#[derive(Clone, Copy, Debug)]
pub struct ReleaseDir<'a>(pub &'a Path);

impl ReleaseDir<'_> {
    pub fn envelope(&self) -> PathBuf {
        self.0.join("release.json")
    }

    pub fn roots(&self) -> PathBuf {
        self.0.join("root")
    }

    pub fn root(&self, version: u64) -> PathBuf {
        self.roots().join(format!("{version}.json"))
    }

    pub fn blobs(&self) -> PathBuf {
        self.0.join("blobs")
    }

    pub fn deltas(&self) -> PathBuf {
        self.0.join("deltas")
    }

    pub fn blob(&self, sha256: &str) -> PathBuf {
        self.blobs().join(sha256)
    }

    pub fn delta(&self, sha256: &str) -> PathBuf {
        self.deltas().join(sha256)
    }

    /// Where a planned object goes: a delta or a whole blob.
    pub fn object(&self, sha256: &str, delta: bool) -> PathBuf {
        if delta { self.delta(sha256) } else { self.blob(sha256) }
    }

    /// The object with this hash, blob or delta, if the directory holds it.
    pub fn find(&self, sha256: &str) -> Option<PathBuf> {
        [self.blob(sha256), self.delta(sha256)].into_iter().find(|p| p.is_file())
    }
}
