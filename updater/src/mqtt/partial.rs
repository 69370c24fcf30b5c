//! An object being downloaded, on disk: `NAME.part`, sized to the signed length at creation and
//! filled chunk by chunk at its offsets. Nothing records which chunks arrived: each chunk is
//! checked against its signed hash when it arrives, and again when a download resumes (after a
//! disconnect or a restart), so a torn or missing chunk simply reads as not there yet. When
//! every chunk is in, the file is synced, its whole hash checked, and renamed to `NAME`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{RefusalKind, refuse};
use crate::release::{ReleaseDoc, chunk_count};
use crate::{Refusal, sha256_hex};

/// The largest object fetched without a chunk index (as one chunk checked by its own hash).
pub const UNINDEXED_MAX: u64 = 64 << 10;

/// Why a chunk was not written: its bytes (ask again) or the device's disk (stop).
#[derive(Debug)]
pub enum WriteError {
    Corrupt(String),
    Io(String),
}

pub struct Partial {
    file: File,
    part: PathBuf,
    done_path: PathBuf,
    object: String,
    length: u64,
    chunk_size: u64,
    hashes: Vec<String>,
    pub present: Vec<bool>,
}

fn io(path: &Path, e: std::io::Error) -> Refusal {
    Refusal::new(RefusalKind::Storage, format!("{}: {e}", path.display()))
}

impl Partial {
    /// Opens (or creates) the partial file for `object` in `dir`, and finds which chunks it
    /// already holds. A finished file (`dir/object`) counts as every chunk present.
    pub fn open(dir: &Path, object: &str, length: u64, doc: &ReleaseDoc) -> Result<Partial, Refusal> {
        let chunk_size = match doc.chunk_size {
            0 if length <= UNINDEXED_MAX => UNINDEXED_MAX,
            0 => {
                return refuse(
                    RefusalKind::Malformed,
                    format!("object {} is {length} bytes and the release has no chunk hashes", crate::short(object)),
                );
            }
            n => n,
        };
        let n = chunk_count(length, chunk_size);
        let hashes: Vec<String> =
            (0..n).map(|i| doc.chunk_hash(object, i).map(str::to_owned)).collect::<Option<_>>().ok_or_else(|| {
                Refusal::new(RefusalKind::Malformed, format!("object {object}: chunk hashes missing"))
            })?;
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let done_path = dir.join(object);
        let part = dir.join(format!("{object}.part"));
        if done_path.is_file() {
            match crate::store::hash_file(&done_path) {
                Ok((sha, len)) if sha == object && len == length => {
                    let file = File::open(&done_path).map_err(|e| io(&done_path, e))?;
                    let present = vec![true; n as usize];
                    return Ok(Partial {
                        file,
                        part: done_path.clone(),
                        done_path,
                        object: object.into(),
                        length,
                        chunk_size,
                        hashes,
                        present,
                    });
                }
                // A finished file that no longer matches: download it again.
                _ => std::fs::rename(&done_path, &part).map_err(|e| io(&part, e))?,
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .map_err(|e| io(&part, e))?;
        let on_disk = file.metadata().map_err(|e| io(&part, e))?.len();
        if on_disk != length {
            // A file of another length is not this object's: start it again.
            file.set_len(0).and_then(|_| file.set_len(length)).map_err(|e| io(&part, e))?;
        }
        let mut p = Partial {
            file,
            part,
            done_path,
            object: object.to_owned(),
            length,
            chunk_size,
            hashes,
            present: vec![false; n as usize],
        };
        if on_disk == length {
            let mut buf = vec![0u8; chunk_size as usize];
            for i in 0..n {
                let (offset, len) = p.range(i);
                let chunk = &mut buf[..len as usize];
                p.file.read_exact_at(chunk, offset).map_err(|e| io(&p.part, e))?;
                p.present[i as usize] = sha256_hex(chunk) == p.hashes[i as usize];
            }
        }
        Ok(p)
    }

    pub fn object(&self) -> &str {
        &self.object
    }

    /// Offset and length of chunk `i`.
    pub fn range(&self, i: u64) -> (u64, u64) {
        let offset = i * self.chunk_size;
        (offset, self.chunk_size.min(self.length - offset.min(self.length)))
    }

    pub fn chunks(&self) -> u64 {
        self.present.len() as u64
    }

    pub fn missing(&self) -> impl Iterator<Item = u64> + '_ {
        self.present.iter().enumerate().filter(|(_, p)| !**p).map(|(i, _)| i as u64)
    }

    pub fn complete(&self) -> bool {
        self.present.iter().all(|p| *p)
    }

    /// Checks chunk `i` against its signed hash and writes it in place.
    pub fn write(&mut self, i: u64, data: &[u8]) -> Result<(), WriteError> {
        let (offset, len) = self.range(i);
        if data.len() as u64 != len {
            return Err(WriteError::Corrupt(format!("chunk {i} is {} bytes, {len} expected", data.len())));
        }
        if sha256_hex(data) != self.hashes[i as usize] {
            return Err(WriteError::Corrupt(format!("chunk {i} does not match its signed hash")));
        }
        self.file.write_all_at(data, offset).map_err(|e| WriteError::Io(format!("{}: {e}", self.part.display())))?;
        self.present[i as usize] = true;
        Ok(())
    }

    /// Syncs the complete file, checks its whole hash and gives it its final name.
    pub fn finish(self) -> Result<(), Refusal> {
        if self.part == self.done_path {
            return Ok(());
        }
        self.file.sync_all().map_err(|e| io(&self.part, e))?;
        let (sha, len) = crate::store::hash_file(&self.part).map_err(|e| io(&self.part, e))?;
        if sha != self.object || len != self.length {
            let _ = std::fs::remove_file(&self.part);
            return refuse(
                RefusalKind::HashMismatch,
                format!("object {} does not match its signed hash", crate::short(&self.object)),
            );
        }
        std::fs::rename(&self.part, &self.done_path).map_err(|e| io(&self.done_path, e))
    }
}
