//! Why an update was refused. Every refusal leaves the trusted state on disk and what is served
//! unchanged; the kind is stable (reported in `state`, matched by tests), the message says more.

/// A refused update.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub detail: String,
}

/// The class of a refusal, as reported to operators and the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// A document that does not parse, or breaks the format's rules.
    Malformed,
    /// A signature that does not verify.
    BadSignature,
    /// Signed by a key the role does not list.
    UnknownKey,
    /// Signed by a key the root revoked.
    RevokedKey,
    /// Fewer valid signatures than the role's threshold.
    ThresholdNotMet,
    /// A weak (small-order) or malformed public key.
    WeakKey,
    /// The document or the role that signs it has expired.
    Expired,
    /// A release number not above the last accepted one (rollback or replay).
    Rollback,
    /// A root version that does not follow the trusted one.
    RootVersion,
    /// A release for another fleet or group.
    WrongTarget,
    /// An artifact longer or shorter than signed.
    WrongLength,
    /// An artifact whose hash differs from the signed one.
    HashMismatch,
    /// A delta that cannot be applied (wrong base, bad framing, bad data).
    BadDelta,
    /// An artifact the release names that is not there.
    Missing,
    /// The staged models failed to load, warm up or match their golden outputs.
    HealthCheck,
    /// The device's own storage failed.
    Storage,
    /// The device declines the release by its own policy (the fleet simulator's injected
    /// refusals use it).
    Policy,
}

impl RefusalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::Malformed => "malformed",
            RefusalKind::BadSignature => "bad_signature",
            RefusalKind::UnknownKey => "unknown_key",
            RefusalKind::RevokedKey => "revoked_key",
            RefusalKind::ThresholdNotMet => "threshold_not_met",
            RefusalKind::WeakKey => "weak_key",
            RefusalKind::Expired => "expired",
            RefusalKind::Rollback => "rollback",
            RefusalKind::RootVersion => "root_version",
            RefusalKind::WrongTarget => "wrong_target",
            RefusalKind::WrongLength => "wrong_length",
            RefusalKind::HashMismatch => "hash_mismatch",
            RefusalKind::BadDelta => "bad_delta",
            RefusalKind::Missing => "missing",
            RefusalKind::HealthCheck => "health_check",
            RefusalKind::Storage => "storage",
            RefusalKind::Policy => "policy",
        }
    }
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Refusal {
    pub fn new(kind: RefusalKind, detail: impl Into<String>) -> Refusal {
        Refusal { kind, detail: detail.into() }
    }
}

/// Shorthand: `refuse(Kind, "...")` as an `Err`.
pub fn refuse<T>(kind: RefusalKind, detail: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::new(kind, detail))
}
