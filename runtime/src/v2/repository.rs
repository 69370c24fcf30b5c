//! Triton's model repository extension (index, load, unload) and statistics extension.
//!
//! The repository is the configuration: load and unload act on configured models only. Load
//! reads the model file again (picking up a changed file) and swaps it in; unload stops serving
//! it. Both leave every other model alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::App;
use crate::model::{ModelSlot, ModelState};
use crate::stats::Histogram;

pub async fn index(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Result<Json<Value>, ApiError> {
    // Triton's clients POST `{"ready": true}` to list only ready models; the body is optional.
    let ready_only = if body.is_empty() {
        false
    } else {
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
        match v.get("ready") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(ApiError::bad_request(format!("`ready` must be true or false, got {other}")));
            }
        }
    };
    let entries: Vec<Value> = app
        .registry
        .slots()
        .iter()
        .filter(|s| !ready_only || s.current().is_some())
        .map(|s| {
            let state = s.state();
            let mut e = json!({ "name": s.spec.name, "version": s.spec.version, "state": state.as_str() });
            if let ModelState::Unavailable(reason) = state {
                e["reason"] = json!(reason);
            }
            e
        })
        .collect();
    Ok(Json(Value::Array(entries)))
}

pub async fn load(
    State(app): State<Arc<App>>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<StatusCode, ApiError> {
    let slot = app.slot(&path)?.clone();
    tokio::task::spawn_blocking(move || slot.load())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::bad_request(format!("load failed: {e}")))?;
    Ok(StatusCode::OK)
}

pub async fn unload(
    State(app): State<Arc<App>>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<StatusCode, ApiError> {
    app.slot(&path)?.unload();
    Ok(StatusCode::OK)
}

pub async fn model_stats(
    State(app): State<Arc<App>>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let slot = app.slot(&path)?;
    Ok(Json(json!({ "model_stats": [stats_of(slot)] })))
}

pub async fn all_stats(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({ "model_stats": app.registry.slots().iter().map(|s| stats_of(s)).collect::<Vec<_>>() }))
}

/// One model's statistics in the layout of Triton's statistics extension.
fn stats_of(slot: &ModelSlot) -> Value {
    let s = &slot.stats;
    let h = |h: &Histogram| json!({ "count": h.count(), "ns": h.sum_ns() });
    let zero = json!({ "count": 0, "ns": 0 });
    json!({
        "name": slot.spec.name,
        "version": slot.spec.version,
        "last_inference": s.last_inference_ms.load(Relaxed),
        "inference_count": s.success.load(Relaxed),
        "execution_count": s.executions.load(Relaxed),
        "rejected_count": s.rejected.load(Relaxed),
        "inference_stats": {
            "success": h(&s.success_time),
            "fail": h(&s.failure_time),
            "queue": h(&s.queue),
            "compute_input": zero,
            "compute_infer": h(&s.compute),
            "compute_output": zero,
        },
        "batch_stats": [],
    })
}
