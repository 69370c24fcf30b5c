//! The HTTP server: the V2 router behind an optional bearer token, served until shutdown.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

use crate::app::App;
use crate::http::browser::{self, AllowedHosts};
use crate::http::{self, ApiError};

/// Serves the API on `listener` until `shutdown` resolves, then stops accepting and returns
/// once in-flight requests have been answered.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let hosts = Arc::new(AllowedHosts::new(&app.allowed_hosts));
    let router = http::router(app.clone())
        .layer(middleware::from_fn_with_state(app, require_token))
        .layer(middleware::from_fn_with_state(hosts, refuse_web_pages));
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// Requests a web page made against this daemon (DNS rebinding, cross-site requests, form
/// posts to the control endpoints) are refused before anything else: `http/browser.rs`.
async fn refuse_web_pages(State(hosts): State<Arc<AllowedHosts>>, request: Request, next: Next) -> Response {
    match browser::check(&hosts, request.method(), request.uri().path(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// With a token configured, every route but liveness needs `Authorization: Bearer TOKEN`.
async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let Some(token) = &app.auth_token else {
        return next.run(request).await;
    };
    if request.uri().path() == "/v2/health/live" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => next.run(request).await,
        _ => {
            let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            r
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
