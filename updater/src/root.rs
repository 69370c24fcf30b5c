//! The root document: the fleet's root keys and threshold, and the release role it delegates to
//! (keys, threshold, expiry). A device is provisioned with one root; version N+1 replaces it only
//! when signed by a threshold of version N's root keys *and* of its own, one version at a time.
//! Revoking a key is a new root version that lists it under `revoked` (and in no role).

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, ROOT_TYPE, Signers};
use crate::error::{RefusalKind, refuse};
use crate::keys::PublicKey;
use crate::{Refusal, time};

/// The root document as signed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootDoc {
    pub fleet: String,
    pub version: u64,
    pub expires: String,
    /// Every key a role uses, by id.
    pub keys: BTreeMap<String, String>,
    pub root: Role,
    pub release: Role,
    /// Key ids that must never be trusted again.
    #[serde(default)]
    pub revoked: BTreeSet<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub keyids: Vec<String>,
    pub threshold: usize,
    /// When signatures of this role stop counting (the release role; root uses the document's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// A key id as [`crate::keys::PublicKey::id`] writes it.
fn is_key_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A checked root: every key parsed and strong, every role consistent.
#[derive(Clone, Debug)]
pub struct Root {
    pub doc: RootDoc,
    keys: BTreeMap<String, PublicKey>,
    pub expires: SystemTime,
    pub release_expires: Option<SystemTime>,
}

impl Root {
    /// Parses the payload of a root envelope and checks its internal consistency (not its
    /// signatures: see [`Root::trust_first`] and [`Root::rotate`]).
    pub fn parse(env: &Envelope) -> Result<Root, Refusal> {
        let payload = env.payload(ROOT_TYPE)?;
        let doc: RootDoc = serde_json::from_slice(&payload)
            .map_err(|e| Refusal::new(RefusalKind::Malformed, format!("root document: {e}")))?;
        let mut keys = BTreeMap::new();
        for (id, hex) in &doc.keys {
            let key = PublicKey::from_hex(hex)?;
            if key.id() != *id {
                return refuse(RefusalKind::Malformed, format!("root: key id {id} is not the SHA-256 of its key"));
            }
            keys.insert(id.clone(), key);
        }
        // A revoked key is named by its id: the SHA-256 of the key, 64 lowercase hex digits.
        // Anything else could never match a key, and would revoke nothing while looking as if it
        // did.
        if let Some(bad) = doc.revoked.iter().find(|id| !is_key_id(id)) {
            return refuse(
                RefusalKind::Malformed,
                format!("root: revoked entry {bad:?} is not a key id (64 lowercase hex digits)"),
            );
        }
        for (name, role) in [("root", &doc.root), ("release", &doc.release)] {
            if role.threshold == 0 || role.threshold > role.keyids.len() {
                return refuse(
                    RefusalKind::Malformed,
                    format!("root: {name} threshold {} with {} keys", role.threshold, role.keyids.len()),
                );
            }
            for id in &role.keyids {
                if !keys.contains_key(id) {
                    return refuse(RefusalKind::Malformed, format!("root: {name} role lists unknown key {id}"));
                }
                if doc.revoked.contains(id) {
                    return refuse(RefusalKind::Malformed, format!("root: {name} role lists revoked key {id}"));
                }
            }
        }
        let bad_time = |e: String| Refusal::new(RefusalKind::Malformed, format!("root: {e}"));
        let expires = time::parse(&doc.expires).map_err(bad_time)?;
        let Some(release_expiry) = doc.release.expires.as_deref() else {
            return refuse(RefusalKind::Malformed, "root: the release role needs an expiry");
        };
        let release_expires = Some(time::parse(release_expiry).map_err(bad_time)?);
        Ok(Root { doc, keys, expires, release_expires })
    }

    fn signers<'a>(&'a self, role_name: &'a str, role: &'a Role) -> Signers<'a> {
        Signers {
            role: role_name,
            keys: role.keyids.iter().filter_map(|id| self.keys.get(id).map(|k| (id.clone(), k))).collect(),
            revoked: &self.doc.revoked,
            threshold: role.threshold,
        }
    }

    /// The first root a device trusts (provisioning): it must be signed by a threshold of its
    /// own root keys.
    pub fn trust_first(env: &Envelope) -> Result<Root, Refusal> {
        let root = Root::parse(env)?;
        env.verify(&root.signers("root", &root.doc.root))?;
        Ok(root)
    }

    /// The next root version, signed by a threshold of this root's keys and of its own.
    pub fn rotate(&self, env: &Envelope) -> Result<Root, Refusal> {
        let next = Root::parse(env)?;
        if next.doc.version != self.doc.version + 1 {
            return refuse(
                RefusalKind::RootVersion,
                format!("root version {} does not follow the trusted version {}", next.doc.version, self.doc.version),
            );
        }
        if next.doc.fleet != self.doc.fleet {
            return refuse(
                RefusalKind::WrongTarget,
                format!("root for fleet `{}`, not `{}`", next.doc.fleet, self.doc.fleet),
            );
        }
        // Revocations are permanent: a later root may add to the list, never take from it.
        if let Some(id) = self.doc.revoked.iter().find(|id| !next.doc.revoked.contains(*id)) {
            return refuse(RefusalKind::Malformed, format!("root version {} un-revokes key {id}", next.doc.version));
        }
        env.verify(&self.signers("root (old keys)", &self.doc.root))?;
        env.verify(&next.signers("root (new keys)", &next.doc.root))?;
        Ok(next)
    }

    /// Checks that the root and its release role are unexpired at `now`.
    pub fn check_expiry(&self, now: SystemTime) -> Result<(), Refusal> {
        if self.expires <= now {
            return refuse(
                RefusalKind::Expired,
                format!("root version {} expired at {}", self.doc.version, self.doc.expires),
            );
        }
        if let Some(t) = self.release_expires
            && t <= now
        {
            return refuse(RefusalKind::Expired, format!("the release role expired at {}", time::format(t)));
        }
        Ok(())
    }

    /// Verifies a release envelope's signatures against the release role.
    pub fn verify_release(&self, env: &Envelope) -> Result<(), Refusal> {
        env.verify(&self.signers("release", &self.doc.release))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::author::{RootParams, root_doc};
    use crate::error::RefusalKind;
    use crate::keys::SecretKey;

    fn root(version: u64, root_keys: &[&SecretKey], threshold: usize, revoked: &[String]) -> Envelope {
        let publics: Vec<_> = root_keys.iter().map(|k| k.public()).collect();
        let release = [SecretKey::generate().unwrap().public()];
        root_doc(&RootParams {
            fleet: "demo",
            version,
            expires_in_days: 30,
            root_keys: &publics,
            root_threshold: threshold,
            release_keys: &release,
            release_threshold: 1,
            release_expires_in_days: 30,
            revoked,
        })
    }

    #[test]
    fn rotation_needs_a_threshold_of_old_and_new_keys() {
        let (old, new) = (SecretKey::generate().unwrap(), SecretKey::generate().unwrap());
        let mut v1 = root(1, &[&old], 1, &[]);
        v1.sign(&old).unwrap();
        let trusted = Root::trust_first(&v1).unwrap();

        let mut only_old = root(2, &[&new], 1, &[]);
        only_old.sign(&old).unwrap();
        assert_eq!(trusted.rotate(&only_old).unwrap_err().kind, RefusalKind::UnknownKey);
        let mut only_new = root(2, &[&new], 1, &[]);
        only_new.sign(&new).unwrap();
        assert_eq!(trusted.rotate(&only_new).unwrap_err().kind, RefusalKind::UnknownKey);
        let mut both = root(2, &[&new], 1, &[]);
        both.sign(&old).unwrap();
        both.sign(&new).unwrap();
        assert_eq!(trusted.rotate(&both).unwrap().doc.version, 2);

        let mut skipped = root(3, &[&new], 1, &[]);
        skipped.sign(&old).unwrap();
        skipped.sign(&new).unwrap();
        assert_eq!(trusted.rotate(&skipped).unwrap_err().kind, RefusalKind::RootVersion);
    }

    #[test]
    fn a_threshold_counts_distinct_listed_keys_and_revocations_stick() {
        let (a, b) = (SecretKey::generate().unwrap(), SecretKey::generate().unwrap());
        let mut two = root(1, &[&a, &b], 2, &[]);
        two.sign(&a).unwrap();
        two.sign(&a).unwrap(); // signing twice replaces, it does not count twice
        assert_eq!(Root::trust_first(&two).unwrap_err().kind, RefusalKind::ThresholdNotMet);
        two.sign(&b).unwrap();
        let trusted = Root::trust_first(&two).unwrap();

        let gone = b.public().id();
        let mut v2 = root(2, &[&a], 1, std::slice::from_ref(&gone));
        v2.sign(&a).unwrap();
        assert_eq!(trusted.rotate(&v2).unwrap_err().kind, RefusalKind::ThresholdNotMet, "the old threshold is 2");
        v2.sign(&b).unwrap(); // the outgoing key signs its own revocation
        let v2 = trusted.rotate(&v2).unwrap();
        let mut v3 = root(3, &[&a], 1, &[]);
        v3.sign(&a).unwrap();
        assert!(v2.rotate(&v3).unwrap_err().detail.contains("un-revokes"));
        let mut listed = root(3, &[&a, &b], 1, std::slice::from_ref(&gone));
        listed.sign(&a).unwrap();
        assert!(v2.rotate(&listed).unwrap_err().detail.contains("revoked key"));
    }

    #[test]
    fn a_revoked_entry_that_is_not_a_key_id_is_refused() {
        let k = SecretKey::generate().unwrap();
        let id = k.public().id();
        for bad in [id.to_uppercase(), id[..16].to_string(), format!("{id}0"), "ed25519:abc".into(), String::new()] {
            let mut r = root(1, &[&k], 1, std::slice::from_ref(&bad));
            r.sign(&k).unwrap();
            let e = Root::trust_first(&r).unwrap_err();
            assert_eq!(e.kind, RefusalKind::Malformed, "{bad:?}");
            assert!(e.detail.contains("is not a key id"), "{bad:?}: {}", e.detail);
        }
        let other = SecretKey::generate().unwrap().public().id();
        let mut good = root(1, &[&k], 1, &[other]);
        good.sign(&k).unwrap();
        assert!(Root::trust_first(&good).is_ok());
    }

    #[test]
    fn an_expired_root_or_release_role_is_refused() {
        let k = SecretKey::generate().unwrap();
        let mut v1 = root(1, &[&k], 1, &[]);
        v1.sign(&k).unwrap();
        let r = Root::trust_first(&v1).unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(31 * 86_400);
        assert_eq!(r.check_expiry(later).unwrap_err().kind, RefusalKind::Expired);
        assert!(r.check_expiry(SystemTime::now()).is_ok());
    }
}
