//! `POST /v2/hard-examples`: the central side's end of the hard-example queue. An edge that could
//! not escalate a case uploads it here later (inputs, local outputs, time, reason); a server with
//! `server.hard_example_sink` keeps each as a JSON file for relabelling and retraining.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::app::App;
use crate::escalation::SinkError;

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

pub async fn upload(
    State(app): State<Arc<App>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(sink) = app.hard_example_sink.clone() else {
        return Err(ApiError::not_found("this server does not collect hard examples (set server.hard_example_sink)"));
    };
    let doc: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    let model = doc["model"].as_str().unwrap_or_default();
    if model.is_empty()
        || !model.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || model.starts_with('.')
    {
        return Err(ApiError::bad_request("`model` must be a model name"));
    }
    if !doc["inputs"].is_array() {
        return Err(ApiError::bad_request("`inputs` must be an array of tensors"));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let name = format!("{model}-{now}-{}-{}.json", std::process::id(), SEQUENCE.fetch_add(1, Relaxed));
    let name2 = name.clone();
    let stored = tokio::task::spawn_blocking(move || sink.store(&name2, &body))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match stored {
        Ok(()) => {}
        // The edge keeps the example queued and offers it again later.
        Err(e @ SinkError::Full { .. }) => return Err(ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())),
        Err(e) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
    Ok((StatusCode::OK, Json(json!({ "stored": name }))))
}
