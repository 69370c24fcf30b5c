//! ed25519 keys: generation, the files they live in, and key ids.
//!
//! A secret key file is JSON `{"type": "ed25519-secret", "seed": HEX}` (written 0600); a public
//! key is 64 hex characters, and its id is the hex SHA-256 of its 32 bytes. Weak (small-order)
//! public keys are refused wherever a key is read, and signatures are checked with
//! `verify_strict`, which refuses malleable signatures as well.

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::{RefusalKind, refuse};
use crate::{Refusal, sha256_hex};

/// A public key that is well-formed and not of small order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// From 64 hex characters.
    pub fn from_hex(text: &str) -> Result<PublicKey, Refusal> {
        let mut bytes = [0u8; 32];
        if hex::decode_to_slice(text, &mut bytes).is_err() {
            return refuse(RefusalKind::Malformed, format!("public key `{text}` is not 64 hex characters"));
        }
        let Ok(key) = VerifyingKey::from_bytes(&bytes) else {
            return refuse(RefusalKind::WeakKey, format!("public key {text} is not a valid ed25519 point"));
        };
        if key.is_weak() {
            return refuse(RefusalKind::WeakKey, format!("public key {text} is of small order"));
        }
        Ok(PublicKey(key))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    /// The key id: hex SHA-256 of the key's bytes.
    pub fn id(&self) -> String {
        sha256_hex(self.0.as_bytes())
    }

    /// Strict verification (no small-order keys or components, canonical `s`).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = Signature::from_slice(signature) else { return false };
        self.0.verify_strict(message, &sig).is_ok()
    }
}

/// A secret signing key.
pub struct SecretKey(SigningKey);

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretKeyFile {
    r#type: String,
    seed: String,
}

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> std::io::Result<SecretKey> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(format!("no random source: {e}")))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).to_bytes().to_vec()
    }

    /// Reads a secret key file.
    pub fn read(path: &Path) -> Result<SecretKey, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: SecretKeyFile =
            serde_json::from_str(&text).map_err(|e| format!("{}: not a secret key file: {e}", path.display()))?;
        let mut seed = [0u8; 32];
        if file.r#type != "ed25519-secret" || hex::decode_to_slice(&file.seed, &mut seed).is_err() {
            return Err(format!("{}: not an ed25519 secret key file", path.display()));
        }
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    /// Writes the secret key file (mode 0600, refusing to overwrite).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let file = SecretKeyFile { r#type: "ed25519-secret".into(), seed: hex::encode(self.0.to_bytes()) };
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        f.write_all(serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_message_and_key() {
        let (a, b) = (SecretKey::generate().unwrap(), SecretKey::generate().unwrap());
        let sig = a.sign(b"release 7");
        assert!(a.public().verify(b"release 7", &sig));
        assert!(!a.public().verify(b"release 8", &sig));
        assert!(!b.public().verify(b"release 7", &sig));
        assert!(!a.public().verify(b"release 7", &sig[..63]));
    }

    #[test]
    fn small_order_and_malformed_keys_are_refused() {
        // The identity point (y = 1) has order 1.
        let identity = format!("01{}", "00".repeat(31));
        assert_eq!(PublicKey::from_hex(&identity).unwrap_err().kind, RefusalKind::WeakKey);
        assert_eq!(PublicKey::from_hex("abcd").unwrap_err().kind, RefusalKind::Malformed);
        let good = SecretKey::generate().unwrap().public();
        assert_eq!(PublicKey::from_hex(&good.to_hex()).unwrap(), good);
    }
}
