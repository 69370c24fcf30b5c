//! The signed envelope every trust document travels in.
//!
//! ```json
//! {"payload_type": "outpost.release/v1", "payload": BASE64, "signatures": [{"keyid": HEX, "sig": BASE64}]}
//! ```
//!
//! Signatures cover the exact payload bytes (no JSON canonicalisation to get wrong) together with
//! the payload type, so a root can never be passed off as a release or the reverse:
//! `"outpost-signed-v1\n" + payload_type + "\n" + payload`.

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::Refusal;
use crate::error::{RefusalKind, refuse};
use crate::keys::{PublicKey, SecretKey};

/// Largest envelope accepted from anywhere (a release for hundreds of models fits easily).
pub const MAX_ENVELOPE_BYTES: usize = 1 << 20;
/// Signature entries an envelope may carry: far more than any role's keys, and few enough that
/// checking them costs nothing worth attacking.
pub const MAX_SIGNATURES: usize = 32;

pub const ROOT_TYPE: &str = "outpost.root/v1";
pub const RELEASE_TYPE: &str = "outpost.release/v1";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub payload_type: String,
    pub payload: String,
    #[serde(default)]
    pub signatures: Vec<SignatureEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    pub keyid: String,
    pub sig: String,
}

/// Who may sign a document: keys by id, the revoked ids, and how many must sign.
pub struct Signers<'a> {
    pub role: &'a str,
    pub keys: Vec<(String, &'a PublicKey)>,
    pub revoked: &'a BTreeSet<String>,
    pub threshold: usize,
}

fn message(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(payload.len() + payload_type.len() + 20);
    m.extend_from_slice(b"outpost-signed-v1\n");
    m.extend_from_slice(payload_type.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(payload);
    m
}

impl Envelope {
    /// An unsigned envelope around a payload.
    pub fn new(payload_type: &str, payload: &[u8]) -> Envelope {
        Envelope { payload_type: payload_type.into(), payload: B64.encode(payload), signatures: Vec::new() }
    }

    /// Parses an envelope, refusing oversized or malformed input.
    pub fn parse(bytes: &[u8]) -> Result<Envelope, Refusal> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return refuse(
                RefusalKind::Malformed,
                format!("{} bytes is over the {MAX_ENVELOPE_BYTES}-byte limit", bytes.len()),
            );
        }
        serde_json::from_slice(bytes)
            .map_err(|e| Refusal::new(RefusalKind::Malformed, format!("not a signed envelope: {e}")))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("an envelope serialises");
        v.push(b'\n');
        v
    }

    /// The payload bytes, after checking the type.
    pub fn payload(&self, expected_type: &str) -> Result<Vec<u8>, Refusal> {
        if self.payload_type != expected_type {
            return refuse(
                RefusalKind::Malformed,
                format!("payload type is `{}`, expected `{expected_type}`", self.payload_type),
            );
        }
        B64.decode(&self.payload)
            .map_err(|e| Refusal::new(RefusalKind::Malformed, format!("payload is not base64: {e}")))
    }

    /// Adds (or replaces) the signature of `key`.
    pub fn sign(&mut self, key: &SecretKey) -> Result<(), Refusal> {
        let payload = self.payload(&self.payload_type.clone())?;
        let sig = key.sign(&message(&self.payload_type, &payload));
        let keyid = key.public().id();
        self.signatures.retain(|s| s.keyid != keyid);
        self.signatures.push(SignatureEntry { keyid, sig: B64.encode(sig) });
        Ok(())
    }

    /// Checks that at least `threshold` distinct listed, unrevoked keys signed the payload.
    /// When the threshold is not met, the refusal names the most telling reason: a revoked key,
    /// then an unknown key, then a bad signature, else too few signatures.
    pub fn verify(&self, signers: &Signers) -> Result<(), Refusal> {
        if self.signatures.len() > MAX_SIGNATURES {
            return refuse(
                RefusalKind::Malformed,
                format!("{} signature entries (at most {MAX_SIGNATURES})", self.signatures.len()),
            );
        }
        // One entry per key (signing replaces a key's entry): each key is verified at most once.
        let mut keyids = BTreeSet::new();
        if let Some(dup) = self.signatures.iter().find(|s| !keyids.insert(s.keyid.as_str())) {
            let short: String = dup.keyid.chars().take(12).collect();
            return refuse(RefusalKind::Malformed, format!("signature entries repeat key {short}"));
        }
        let payload = self.payload(&self.payload_type)?;
        let msg = message(&self.payload_type, &payload);
        let mut valid = BTreeSet::new();
        let (mut revoked, mut unknown, mut bad) = (None, None, None);
        for s in &self.signatures {
            if signers.revoked.contains(&s.keyid) {
                revoked.get_or_insert_with(|| s.keyid.clone());
                continue;
            }
            let Some((_, key)) = signers.keys.iter().find(|(id, _)| *id == s.keyid) else {
                unknown.get_or_insert_with(|| s.keyid.clone());
                continue;
            };
            let sig = B64.decode(&s.sig).unwrap_or_default();
            if key.verify(&msg, &sig) {
                valid.insert(s.keyid.clone());
            } else {
                bad.get_or_insert_with(|| s.keyid.clone());
            }
        }
        if valid.len() >= signers.threshold.max(1) {
            return Ok(());
        }
        let (role, n, t) = (signers.role, valid.len(), signers.threshold);
        let short = |id: &str| id.chars().take(12).collect::<String>();
        match (revoked, unknown, bad) {
            (Some(id), _, _) => {
                refuse(RefusalKind::RevokedKey, format!("{role}: signed by revoked key {}", short(&id)))
            }
            (_, Some(id), _) => refuse(
                RefusalKind::UnknownKey,
                format!("{role}: signed by key {} that the {role} role does not list", short(&id)),
            ),
            (_, _, Some(id)) => {
                refuse(RefusalKind::BadSignature, format!("{role}: signature by key {} does not verify", short(&id)))
            }
            _ => refuse(RefusalKind::ThresholdNotMet, format!("{role}: {n} valid signature(s), {t} needed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    #[test]
    fn repeated_or_too_many_signature_entries_are_refused_before_any_is_verified() {
        let key = SecretKey::generate().unwrap();
        let public = key.public();
        let keys = vec![(public.id(), &public)];
        let revoked = BTreeSet::new();
        let signers = Signers { role: "release", keys, revoked: &revoked, threshold: 1 };
        let mut env = Envelope::new("outpost.test/v1", b"payload");
        env.sign(&key).unwrap();
        assert!(env.verify(&signers).is_ok());

        let mut repeated = env.clone();
        repeated.signatures.push(repeated.signatures[0].clone());
        let e = repeated.verify(&signers).unwrap_err();
        assert_eq!(e.kind, RefusalKind::Malformed);
        assert!(e.detail.contains("repeat key"), "{}", e.detail);

        let mut many = env.clone();
        for i in 0..MAX_SIGNATURES {
            many.signatures.push(SignatureEntry { keyid: format!("{i:064x}"), sig: String::new() });
        }
        let e = many.verify(&signers).unwrap_err();
        assert_eq!(e.kind, RefusalKind::Malformed);
        assert!(e.detail.contains("signature entries (at most 32)"), "{}", e.detail);
    }
}
