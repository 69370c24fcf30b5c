//! Secrets kept in files of their own (tokens, passwords), out of a configuration file that is
//! often world-readable: the file's first line, without its line ending.

use std::path::Path;

use super::error::{ConfigError, invalid};

/// Reads a secret file; errors name `key` and the file.
pub fn read_secret(key: &str, path: &Path) -> Result<String, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let secret = text.lines().next().unwrap_or_default().to_owned();
    if secret.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(secret)
}

/// The secret given inline or in a file, not both.
pub fn inline_or_file(
    inline_key: &str,
    inline: Option<&String>,
    file_key: &str,
    file: Option<&Path>,
) -> Result<Option<String>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(invalid(file_key, format!("give `{inline_key}` or this, not both"))),
        (Some(s), None) => Ok(Some(s.clone())),
        (None, Some(p)) => read_secret(file_key, p).map(Some),
        (None, None) => Ok(None),
    }
}

/// Whether `host` (a name or an address, IPv6 with or without brackets) is this machine's
/// loopback, where a secret sent in clear stays on the box.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A secret about to be sent in clear to `host`: refused off loopback unless the operator
/// allowed it with `allow_key`, and then logged as a warning once per validation.
pub fn check_plaintext(secret_key: &str, host: &str, allowed: bool, allow_key: &str) -> Result<(), ConfigError> {
    if is_loopback(host) {
        return Ok(());
    }
    if !allowed {
        return Err(invalid(
            secret_key,
            format!("would be sent in clear to {host}: use TLS, or set {allow_key} = true to accept that"),
        ));
    }
    tracing::warn!(secret = secret_key, host, "a secret is sent in clear off this machine ({allow_key} = true)");
    Ok(())
}
