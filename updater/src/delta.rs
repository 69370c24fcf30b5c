//! zstd "patch-from" deltas: a new blob compressed with the old one as reference prefix, so only
//! what changed travels.
//!
//! A delta file is an 81-byte header then one zstd frame:
//! `"OPDELTA1"`, base SHA-256 (32 bytes), target SHA-256 (32), target length (u64 LE),
//! window log (u8). The header is checked against the signed release before any decoding; the
//! decoder's window is capped at the header's (signed) window log, so decoding needs the base
//! blob in memory plus `2^window_log` bytes, and output stops at the signed length.

use std::io::{Read, Write};

use sha2::{Digest, Sha256};

use crate::error::{RefusalKind, refuse};
use crate::release::{DeltaEntry, MAX_WINDOW_LOG};
use crate::{Refusal, sha256_hex};

pub const MAGIC: &[u8; 8] = b"OPDELTA1";
pub const HEADER_LEN: usize = 81;
/// zstd level for deltas: with long-distance matching, level 3 gets close to level 19's size
/// at a small fraction of the time.
pub const DEFAULT_LEVEL: i32 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub base: [u8; 32],
    pub target: [u8; 32],
    pub target_len: u64,
    pub window_log: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..40].copy_from_slice(&self.base);
        h[40..72].copy_from_slice(&self.target);
        h[72..80].copy_from_slice(&self.target_len.to_le_bytes());
        h[80] = self.window_log as u8;
        h
    }

    pub fn parse(bytes: &[u8]) -> Result<Header, Refusal> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return refuse(RefusalKind::BadDelta, "not an Outpost delta (bad magic or short header)");
        }
        let window_log = bytes[80] as u32;
        if !(10..=MAX_WINDOW_LOG).contains(&window_log) {
            return refuse(RefusalKind::BadDelta, format!("window log {window_log} outside 10..={MAX_WINDOW_LOG}"));
        }
        Ok(Header {
            base: bytes[8..40].try_into().expect("32 bytes"),
            target: bytes[40..72].try_into().expect("32 bytes"),
            target_len: u64::from_le_bytes(bytes[72..80].try_into().expect("8 bytes")),
            window_log,
        })
    }
}

/// The window a delta between these sizes needs: it must span base and target, at least 2^10.
pub fn window_log_for(base_len: usize, target_len: usize) -> Option<u32> {
    let span = (base_len + target_len).max(1 << 10) as u64;
    let log = 64 - (span - 1).leading_zeros();
    (log <= MAX_WINDOW_LOG).then_some(log)
}

/// Makes a delta that rebuilds `target` from `base`. `None` when the pair needs a window over
/// [`MAX_WINDOW_LOG`] (ship the full blob instead).
pub fn make(base: &[u8], target: &[u8], level: i32) -> std::io::Result<Option<Vec<u8>>> {
    let Some(window_log) = window_log_for(base.len(), target.len()) else { return Ok(None) };
    let header = Header {
        base: Sha256::digest(base).into(),
        target: Sha256::digest(target).into(),
        target_len: target.len() as u64,
        window_log,
    };
    let mut out = header.encode().to_vec();
    let mut enc = zstd::stream::write::Encoder::with_ref_prefix(&mut out, level, base)?;
    enc.long_distance_matching(true)?;
    enc.window_log(window_log)?;
    enc.include_checksum(true)?;
    enc.write_all(target)?;
    enc.finish()?;
    Ok(Some(out))
}

/// Rebuilds the target of `entry` from `delta` (already limited to the signed delta length) and
/// `base` into `out`, hashing as it goes; refuses a wrong base, a header that disagrees with the
/// signed entry, output past the signed length, and output that hashes differently. Returns
/// the number of bytes written.
pub fn apply(
    mut delta: impl Read,
    base: &[u8],
    entry: &DeltaEntry,
    target_len: u64,
    mut out: impl Write,
) -> Result<u64, Refusal> {
    let mut head = [0u8; HEADER_LEN];
    delta.read_exact(&mut head).map_err(|e| Refusal::new(RefusalKind::BadDelta, format!("delta header: {e}")))?;
    let header = Header::parse(&head)?;
    let base_hash = sha256_hex(base);
    if hex::encode(header.base) != entry.base || base_hash != entry.base {
        return refuse(
            RefusalKind::BadDelta,
            format!("delta is against base {}, the device holds {}", hex::encode(header.base), base_hash),
        );
    }
    if hex::encode(header.target) != entry.target
        || header.target_len != target_len
        || header.window_log != entry.window_log
    {
        return refuse(RefusalKind::BadDelta, "delta header disagrees with the signed release");
    }
    let bad = |e: std::io::Error| Refusal::new(RefusalKind::BadDelta, format!("delta data: {e}"));
    let mut dec = zstd::stream::read::Decoder::with_ref_prefix(std::io::BufReader::new(delta), base).map_err(bad)?;
    dec.window_log_max(header.window_log).map_err(bad)?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = dec.read(&mut buf).map_err(bad)?;
        if n == 0 {
            break;
        }
        written += n as u64;
        if written > target_len {
            return refuse(RefusalKind::WrongLength, format!("delta rebuilds more than the signed {target_len} bytes"));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| Refusal::new(RefusalKind::Storage, e.to_string()))?;
    }
    if written != target_len {
        return refuse(RefusalKind::WrongLength, format!("delta rebuilds {written} bytes, {target_len} signed"));
    }
    let got = hex::encode(hasher.finalize());
    if got != entry.target {
        return refuse(
            RefusalKind::HashMismatch,
            format!("delta rebuilds bytes hashing to {got}, {} signed", entry.target),
        );
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry_for(delta: &[u8], base: &[u8], target: &[u8]) -> DeltaEntry {
        let h = Header::parse(delta).unwrap();
        DeltaEntry {
            base: sha256_hex(base),
            target: sha256_hex(target),
            sha256: sha256_hex(delta),
            length: delta.len() as u64,
            window_log: h.window_log,
        }
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_small_change_gives_a_small_delta_that_rebuilds_exactly() {
        let base = pseudo_random(200_000, 7);
        let mut target = base.clone();
        target[100_000..100_100].copy_from_slice(&pseudo_random(100, 9));
        let delta = make(&base, &target, DEFAULT_LEVEL).unwrap().unwrap();
        assert!(delta.len() < 2_000, "delta of {} bytes", delta.len());
        let mut out = Vec::new();
        let entry = entry_for(&delta, &base, &target);
        assert_eq!(apply(&delta[..], &base, &entry, target.len() as u64, &mut out).unwrap(), target.len() as u64);
        assert_eq!(out, target);
    }

    #[test]
    fn the_wrong_base_is_refused_before_decoding() {
        let base = pseudo_random(5_000, 1);
        let target = pseudo_random(5_000, 2);
        let delta = make(&base, &target, DEFAULT_LEVEL).unwrap().unwrap();
        let entry = entry_for(&delta, &base, &target);
        let other = pseudo_random(5_000, 3);
        let err = apply(&delta[..], &other, &entry, target.len() as u64, Vec::new()).unwrap_err();
        assert_eq!(err.kind, RefusalKind::BadDelta);
    }

    #[test]
    fn output_past_the_signed_length_stops() {
        let base = pseudo_random(5_000, 1);
        let target = vec![0u8; 1 << 20];
        let delta = make(&base, &target, DEFAULT_LEVEL).unwrap().unwrap();
        let mut entry = entry_for(&delta, &base, &target);
        entry.target = sha256_hex(&target);
        // A header claiming 1000 bytes over data that decodes to 1 MiB.
        let mut lying = delta.clone();
        lying[72..80].copy_from_slice(&1000u64.to_le_bytes());
        let mut out = Vec::new();
        let err = apply(&lying[..], &base, &entry, 1000, &mut out).unwrap_err();
        assert_eq!(err.kind, RefusalKind::WrongLength);
        assert!(out.len() <= 1000 + (64 << 10));
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Header::parse(&bytes);
        }

        #[test]
        fn headers_round_trip(base in any::<[u8; 32]>(), target in any::<[u8; 32]>(), len in any::<u64>(), w in 10u32..=MAX_WINDOW_LOG) {
            let h = Header { base, target, target_len: len, window_log: w };
            prop_assert_eq!(Header::parse(&h.encode()).unwrap(), h);
        }

        #[test]
        fn corrupted_deltas_are_refused_or_rebuild_the_exact_target(pos in 0usize..4000, byte in any::<u8>()) {
            let base = pseudo_random(3_000, 11);
            let mut target = base.clone();
            target[1000..1040].copy_from_slice(&pseudo_random(40, 12));
            let delta = make(&base, &target, DEFAULT_LEVEL).unwrap().unwrap();
            let entry = entry_for(&delta, &base, &target);
            let mut bad = delta.clone();
            let i = pos % bad.len();
            bad[i] = byte;
            let mut out = Vec::new();
            if apply(&bad[..], &base, &entry, target.len() as u64, &mut out).is_ok() {
                prop_assert_eq!(out, target);
            }
        }
    }
}
