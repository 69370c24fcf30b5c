//! Requests a web page made: the daemon listens on the box where a browser may run, and must
//! not take orders from whatever page that browser shows.
//!
//! - **DNS rebinding.** A page at `http://evil.example` whose name then resolves to 127.0.0.1
//!   is same-origin with the daemon in the browser's eyes, but its requests say
//!   `Host: evil.example`. Every request's `Host` must be an IP address, `localhost`, or a name
//!   in `server.allowed_hosts`.
//! - **Cross-site requests.** A browser sends `Origin` with every cross-origin request that is
//!   not a plain GET; a request whose `Origin` is not the daemon's own (or is `null`) is refused
//!   on every method but GET and HEAD. Clients that are not browsers (tritonclient, curl, the
//!   runtimes' own clients) send no `Origin`.
//! - **Form posts.** The control endpoints (load, unload, update apply) refuse a body typed as
//!   a form or text, the types a page can send without asking the server first: they take
//!   `application/json`, or no type at all (tritonclient sends none).
//!
//! Refusals are 403 (415 for the type) with a JSON error that names the rule.

use std::net::IpAddr;

use axum::http::{HeaderMap, Method, StatusCode, header};

use super::error::ApiError;

/// The names besides IP addresses and `localhost` this server answers to.
#[derive(Clone, Debug, Default)]
pub struct AllowedHosts(Vec<String>);

impl AllowedHosts {
    pub fn new(names: &[String]) -> AllowedHosts {
        AllowedHosts(names.iter().map(|n| n.trim_end_matches('.').to_ascii_lowercase()).collect())
    }

    /// Checked on every request: no allocation.
    fn allows(&self, host: &str) -> bool {
        let name = host.trim_end_matches('.');
        let local = name.len().checked_sub("localhost".len()).is_some_and(|at| {
            name.is_char_boundary(at)
                && name[at..].eq_ignore_ascii_case("localhost")
                && (at == 0 || name.as_bytes()[at - 1] == b'.')
        });
        local || name.parse::<IpAddr>().is_ok() || self.0.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// The host of a `Host` header or an origin's authority, without the port (IPv6 without its
/// brackets).
fn host_part(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    authority.rsplit_once(':').map_or(
        authority,
        |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) { h } else { authority }
        },
    )
}

/// The control endpoints: they change what the daemon serves.
pub fn is_control(path: &str) -> bool {
    matches!(
        path,
        "/v2/update/apply" | "/v2/update/candidate" | "/v2/update/promote" | "/v2/update/drop" | "/v2/update/revert"
    ) || path.strip_prefix("/v2/repository/models/").is_some_and(|p| p.ends_with("/load") || p.ends_with("/unload"))
}

/// Checks one request's headers; `Err` is the answer.
pub fn check(hosts: &AllowedHosts, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let text = |name: header::HeaderName| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let host = text(header::HOST);
    if let Some(h) = host
        && !hosts.allows(host_part(h))
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("host `{}` is not one this server answers to (add it to server.allowed_hosts)", h.escape_debug()),
        ));
    }
    if *method != Method::GET && *method != Method::HEAD {
        if let Some(origin) = text(header::ORIGIN) {
            let own = origin
                .split_once("://")
                .is_some_and(|(_, authority)| host.is_some_and(|h| authority.eq_ignore_ascii_case(h)));
            if !own {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("cross-origin request from `{}` refused", origin.escape_debug()),
                ));
            }
        }
        if headers.get("sec-fetch-site").is_some_and(|v| v == "cross-site") {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "cross-site request refused"));
        }
    }
    if is_control(path)
        && let Some(kind) = text(header::CONTENT_TYPE)
    {
        let essence = kind.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if essence != "application/json" {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("{path} takes application/json, not `{}`", kind.escape_debug()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn status(pairs: &[(&'static str, &'static str)], method: Method, path: &str) -> u16 {
        let hosts = AllowedHosts::new(&["Edge-1.example.".to_owned()]);
        check(&hosts, &method, path, &headers(pairs)).map_or_else(|e| e.status.as_u16(), |()| 200)
    }

    #[test]
    fn hosts_are_addresses_localhost_or_named() {
        for ok in ["127.0.0.1:8000", "[::1]:8000", "localhost:8000", "LOCALHOST", "edge-1.example:80", "10.1.2.3"] {
            assert_eq!(status(&[("host", ok)], Method::GET, "/v2"), 200, "{ok}");
        }
        for bad in ["evil.example:8000", "127.0.0.1.evil.example", "edge-1.example.evil", "localhost.evil:1"] {
            assert_eq!(status(&[("host", bad)], Method::GET, "/v2/health/ready"), 403, "{bad}");
        }
        assert_eq!(status(&[], Method::GET, "/v2"), 200, "HTTP/1.0 without Host");
    }

    #[test]
    fn cross_origin_writes_are_refused_and_reads_are_not() {
        let own = [("host", "127.0.0.1:8000"), ("origin", "http://127.0.0.1:8000")];
        assert_eq!(status(&own, Method::POST, "/v2/repository/models/m/load"), 200);
        let other = [("host", "127.0.0.1:8000"), ("origin", "http://evil.example")];
        assert_eq!(status(&other, Method::POST, "/v2/repository/models/m/unload"), 403);
        assert_eq!(status(&other, Method::POST, "/v2/models/m/infer"), 403);
        assert_eq!(status(&other, Method::GET, "/v2/models/m"), 200);
        let null = [("host", "127.0.0.1:8000"), ("origin", "null")];
        assert_eq!(status(&null, Method::POST, "/v2/update/apply"), 403);
        let site = [("host", "127.0.0.1:8000"), ("sec-fetch-site", "cross-site")];
        assert_eq!(status(&site, Method::POST, "/v2/models/m/infer"), 403);
    }

    #[test]
    fn control_bodies_are_json_or_untyped() {
        let h = |t: &'static str| [("host", "localhost:8000"), ("content-type", t)];
        assert_eq!(status(&h("application/json; charset=utf-8"), Method::POST, "/v2/update/apply"), 200);
        assert_eq!(status(&h("text/plain"), Method::POST, "/v2/update/apply"), 415);
        assert_eq!(status(&h("application/x-www-form-urlencoded"), Method::POST, "/v2/repository/models/m/load"), 415);
        assert_eq!(status(&h("multipart/form-data; boundary=x"), Method::POST, "/v2/repository/models/m/unload"), 415);
        assert_eq!(status(&[("host", "localhost")], Method::POST, "/v2/repository/models/m/load"), 200);
        // Inference keeps taking what curl -d and Triton's clients send.
        assert_eq!(status(&h("application/x-www-form-urlencoded"), Method::POST, "/v2/models/m/infer"), 200);
    }
}
