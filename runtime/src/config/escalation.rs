//! `[models.escalation]`: when a model's answer goes to the central model, and the hard-example
//! queue's bounds.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::error::{ConfigError, check_name, invalid};

/// Time the central model has to answer before the local answer goes out, when not configured.
pub const DEFAULT_CENTRAL_TIMEOUT_MS: u64 = 500;
/// Central calls in flight at once per model, when not configured.
pub const DEFAULT_CENTRAL_CONCURRENCY: usize = 8;
/// Consecutive central failures that open the circuit breaker, when not configured.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// How long an open breaker waits before one probe, when not configured.
pub const DEFAULT_BREAKER_COOLDOWN_MS: u64 = 5_000;
/// Hard examples kept on disk at most, when not configured.
pub const DEFAULT_QUEUE_MAX_ITEMS: usize = 10_000;
/// Bytes of hard examples kept on disk at most, when not configured.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 64 << 20;

/// `[models.escalation]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationConfig {
    /// The central V2 server, `http://host:port` or `https://host:port`.
    pub central_url: String,
    /// PEM file of the certificate authorities that sign the central's certificate (https).
    pub central_ca: Option<PathBuf>,
    pub central_model: String,
    pub central_version: Option<String>,
    /// Bearer token for the central.
    pub central_token: Option<String>,
    /// The same, read from the first line of this file.
    pub central_token_file: Option<PathBuf>,
    /// Send the token to an `http://` central off loopback (in clear) all the same.
    #[serde(default)]
    pub allow_plaintext_token: bool,
    /// The output holding class scores; default the model's first output.
    pub output: Option<String>,
    /// Apply softmax to the scores first (for models that output logits).
    #[serde(default)]
    pub softmax: bool,
    /// `max_probability` (default), `margin` or `entropy`.
    pub policy: Option<String>,
    /// Escalate when the confidence is below this (0..1).
    pub threshold: f64,
    pub timeout_ms: Option<u64>,
    pub max_concurrency: Option<usize>,
    pub breaker_failures: Option<u32>,
    pub breaker_cooldown_ms: Option<u64>,
    /// Keep hard examples here while the central is unreachable; none: not kept.
    pub queue_dir: Option<PathBuf>,
    pub queue_max_items: Option<usize>,
    pub queue_max_bytes: Option<u64>,
}

/// How unsure a model is, from its class scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The top probability.
    MaxProbability,
    /// Top-1 minus top-2 probability.
    Margin,
    /// 1 − entropy / ln(classes): Sedna's cross-entropy filter, as a confidence.
    Entropy,
}

impl Policy {
    /// Every policy, for sweeps.
    pub const ALL: [Policy; 3] = [Policy::MaxProbability, Policy::Margin, Policy::Entropy];

    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::MaxProbability => "max_probability",
            Policy::Margin => "margin",
            Policy::Entropy => "entropy",
        }
    }
}

/// Validated escalation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Escalation {
    /// `host:port` of the central.
    pub central_authority: String,
    /// The CA file when the central speaks https; `None`: plain http.
    pub central_tls_ca: Option<PathBuf>,
    pub central_model: String,
    pub central_version: Option<String>,
    pub central_token: Option<String>,
    pub output: Option<String>,
    pub softmax: bool,
    pub policy: Policy,
    pub threshold: f64,
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub queue: Option<QueueLimits>,
}

/// Where hard examples are kept and how many.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueLimits {
    pub dir: PathBuf,
    pub max_items: usize,
    pub max_bytes: u64,
}

impl EscalationConfig {
    pub(crate) fn validate(&self, key: &dyn Fn(&str) -> String) -> Result<Escalation, ConfigError> {
        let (authority, tls) = if let Some(rest) = self.central_url.strip_prefix("http://") {
            (rest.trim_end_matches('/'), false)
        } else if let Some(rest) = self.central_url.strip_prefix("https://") {
            (rest.trim_end_matches('/'), true)
        } else {
            return Err(invalid(key("escalation.central_url"), "must look like http://host:port or https://host:port"));
        };
        let central_tls_ca = match (tls, &self.central_ca) {
            (true, None) => {
                return Err(invalid(
                    key("escalation.central_ca"),
                    "required for an https central_url: a PEM file of the CAs that sign the central's certificate",
                ));
            }
            (true, Some(ca)) if !ca.is_file() => {
                return Err(invalid(key("escalation.central_ca"), format!("{} is not a file", ca.display())));
            }
            (true, Some(ca)) => Some(ca.clone()),
            (false, Some(_)) => {
                return Err(invalid(key("escalation.central_ca"), "applies to an https central_url only"));
            }
            (false, None) => None,
        };
        if authority.is_empty() || authority.contains('/') || authority.parse::<hyper::http::uri::Authority>().is_err()
        {
            return Err(invalid(key("escalation.central_url"), "must look like http://host:port (no path)"));
        }
        check_name(&self.central_model).map_err(|r| invalid(key("escalation.central_model"), r))?;
        if let Some(v) = &self.central_version {
            check_name(v).map_err(|r| invalid(key("escalation.central_version"), r))?;
        }
        let policy = match &self.policy {
            None => Policy::MaxProbability,
            Some(p) => Policy::parse(p).ok_or_else(|| {
                invalid(key("escalation.policy"), format!("`{p}` is not a policy (max_probability, margin, entropy)"))
            })?,
        };
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(invalid(key("escalation.threshold"), "must be between 0 and 1"));
        }
        let timeout = self.timeout_ms.unwrap_or(DEFAULT_CENTRAL_TIMEOUT_MS);
        if !(1..=60_000).contains(&timeout) {
            return Err(invalid(key("escalation.timeout_ms"), "must be between 1 and 60000"));
        }
        let max_concurrency = self.max_concurrency.unwrap_or(DEFAULT_CENTRAL_CONCURRENCY);
        if !(1..=1024).contains(&max_concurrency) {
            return Err(invalid(key("escalation.max_concurrency"), "must be between 1 and 1024"));
        }
        let breaker_failures = self.breaker_failures.unwrap_or(DEFAULT_BREAKER_FAILURES);
        if breaker_failures == 0 {
            return Err(invalid(key("escalation.breaker_failures"), "must be at least 1"));
        }
        let queue = match &self.queue_dir {
            None => None,
            Some(dir) => {
                let max_items = self.queue_max_items.unwrap_or(DEFAULT_QUEUE_MAX_ITEMS);
                let max_bytes = self.queue_max_bytes.unwrap_or(DEFAULT_QUEUE_MAX_BYTES);
                if max_items == 0 || max_bytes == 0 {
                    return Err(invalid(key("escalation.queue_max_items"), "queue limits must be above 0"));
                }
                Some(QueueLimits { dir: dir.clone(), max_items, max_bytes })
            }
        };
        let central_token = super::secret::inline_or_file(
            &key("escalation.central_token"),
            self.central_token.as_ref(),
            &key("escalation.central_token_file"),
            self.central_token_file.as_deref(),
        )?;
        if central_token.is_some() && !tls {
            let host =
                authority.parse::<hyper::http::uri::Authority>().map(|a| a.host().to_owned()).unwrap_or_default();
            super::secret::check_plaintext(
                &key("escalation.central_token"),
                &host,
                self.allow_plaintext_token,
                &key("escalation.allow_plaintext_token"),
            )?;
        }
        Ok(Escalation {
            central_authority: authority.to_owned(),
            central_tls_ca,
            central_model: self.central_model.clone(),
            central_version: self.central_version.clone(),
            central_token,
            output: self.output.clone(),
            softmax: self.softmax,
            policy,
            threshold: self.threshold,
            timeout: Duration::from_millis(timeout),
            max_concurrency,
            breaker_failures,
            breaker_cooldown: Duration::from_millis(self.breaker_cooldown_ms.unwrap_or(DEFAULT_BREAKER_COOLDOWN_MS)),
            queue,
        })
    }
}
