//! Outpost's update path: who is trusted to sign (keys, root and release roles), what a release
//! binds (the signed release document), how its bytes travel (full blobs or zstd deltas), and how
//! a device takes it without ever bricking (the content-addressed store, health-gated apply).
//!
//! The updater never depends on the runtime: it stages and activates models through
//! [`apply::ModelHost`], which the runtime implements.

pub mod apply;
pub mod author;
pub mod candidate;
pub mod delta;
pub mod envelope;
pub mod error;
pub mod host;
pub mod keys;
pub mod mqtt;
pub mod offer;
pub mod release;
pub mod release_dir;
pub mod revert;
pub mod root;
pub mod store;
pub mod time;
pub mod tls;

pub use error::Refusal;

/// Lowercase hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Whether a string is a lowercase hex SHA-256 (64 characters): the only names blobs get, so a
/// document cannot point a path anywhere else.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The first 12 characters of an id or hash, for messages (the whole string when shorter).
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The message a panic carried (`panic!` with a literal or a formatted string), for reports.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}
