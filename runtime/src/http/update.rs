//! `POST /v2/update/apply` and `GET /v2/update/status`: signed releases applied by the running
//! daemon (what `outpost update apply DIR` sends when the daemon holds the store). A refusal is a
//! 422 naming its kind (`{"error": ..., "refusal": "rollback"}`); nothing served changes.
//! `POST /v2/update/candidate` stages a release as the candidate (its models run as shadows of
//! the serving ones), `POST /v2/update/promote` activates it and `POST /v2/update/drop` drops it.
//! `POST /v2/update/revert` returns to the release that ran before the active one.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::error::ApiError;
use crate::app::App;
use crate::releases::ReleaseService;

fn service(app: &App) -> Result<Arc<ReleaseService>, ApiError> {
    app.updates.get().cloned().ok_or_else(|| ApiError::not_found("this server takes no updates (configure [updates])"))
}

/// The absolute release directory a control request names.
fn release_dir(body: &[u8]) -> Result<PathBuf, ApiError> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    match doc["release_dir"].as_str().filter(|d| d.starts_with('/')) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Err(ApiError::bad_request("`release_dir` must be an absolute path to a release directory")),
    }
}

/// Runs one update step off the async threads and answers with its outcome under `key`, or
/// its refusal.
async fn answer<T: serde::Serialize + Send + 'static>(
    key: &str,
    step: impl FnOnce() -> Result<T, outpost_updater::Refusal> + Send + 'static,
) -> Result<Response, ApiError> {
    let result = tokio::task::spawn_blocking(step)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the update task failed: {e}")))?;
    Ok(match result {
        Ok(done) => {
            let mut body = serde_json::Map::new();
            body.insert(key.into(), json!(done));
            (StatusCode::OK, Json(Value::Object(body))).into_response()
        }
        Err(refusal) => {
            let status = match refusal.kind {
                outpost_updater::error::RefusalKind::Storage => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            (status, Json(json!({ "error": refusal.to_string(), "refusal": refusal.kind.as_str() }))).into_response()
        }
    })
}

pub async fn apply(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let updates = service(&app)?;
    let dir = release_dir(&body)?;
    answer("applied", move || updates.apply(&dir)).await
}

pub async fn candidate(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let updates = service(&app)?;
    let dir = release_dir(&body)?;
    answer("candidate", move || updates.stage_candidate(&dir)).await
}

pub async fn promote(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let updates = service(&app)?;
    answer("applied", move || updates.promote()).await
}

pub async fn drop_candidate(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let updates = service(&app)?;
    answer("dropped", move || updates.drop_candidate()).await
}

pub async fn revert(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let updates = service(&app)?;
    answer("applied", move || updates.revert()).await
}

pub async fn status(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let updates = service(&app)?;
    let mut status = tokio::task::spawn_blocking(move || updates.status()).await.unwrap_or(Value::Null);
    if let Some(agent) = app.agent.get() {
        status["mqtt"] = agent.status();
    }
    Ok(Json(status))
}
