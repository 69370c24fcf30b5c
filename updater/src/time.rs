//! Times in documents: RFC 3339 in UTC (`2027-01-31T00:00:00Z`), compared as seconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses an RFC 3339 UTC time.
pub fn parse(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(text).map_err(|e| format!("`{text}` is not an RFC 3339 UTC time: {e}"))
}

/// Formats a time as RFC 3339 UTC, to the second.
pub fn format(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}
