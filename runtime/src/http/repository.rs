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
use crate::app::App;
use crate::model::{ModelSlot, ModelState};
use crate::stats::{Histogram, ModelStats};

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
    let mut entries = Vec::new();
    for slot in app.registry.slots().iter() {
        for entry in slot.index() {
            if ready_only && entry.state != ModelState::Ready {
                continue;
            }
            let mut e = json!({ "name": slot.spec.name, "state": entry.state.as_str() });
            if let Some(v) = entry.version {
                e["version"] = json!(v);
            }
            if let ModelState::Unavailable(reason) = entry.state {
                e["reason"] = json!(reason);
            }
            entries.push(e);
        }
    }
    Ok(Json(Value::Array(entries)))
}

pub async fn load(
    State(app): State<Arc<App>>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<StatusCode, ApiError> {
    let slot = app.slot(&path)?;
    let failures = tokio::task::spawn_blocking(move || slot.load())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match failures.first() {
        None => Ok(StatusCode::OK),
        Some(first) => Err(ApiError::bad_request(format!("load failed (what was serving still serves): {first}"))),
    }
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
    let wanted = path.get("v");
    let stats: Vec<Value> = slot
        .stats()
        .iter()
        .filter(|(v, _)| wanted.is_none_or(|w| w == *v))
        .map(|(v, s)| stats_of(&app, &slot, v, s))
        .collect();
    if stats.is_empty() && wanted.is_some() {
        return Err(ApiError::not_found(format!("model `{}` has no statistics for that version", slot.spec.name)));
    }
    Ok(Json(json!({ "model_stats": stats })))
}

pub async fn all_stats(State(app): State<Arc<App>>) -> Json<Value> {
    let stats: Vec<Value> = app
        .registry
        .slots()
        .iter()
        .flat_map(|slot| slot.stats().into_iter().map(|(v, s)| stats_of(&app, slot, &v, &s)).collect::<Vec<_>>())
        .collect();
    Json(json!({ "model_stats": stats }))
}

/// One version's statistics in the layout of Triton's statistics extension, with the plans the
/// version holds per input shape (tract) under `plans`, its drift under `drift`, and the model's
/// shadow candidate's comparison under `shadow`, when it is serving.
fn stats_of(app: &App, slot: &ModelSlot, version: &str, s: &ModelStats) -> Value {
    let name = &slot.spec.name;
    let served = slot.served();
    let serving = served.iter().find(|v| v.version == version);
    let plans = serving.and_then(|v| v.plans());
    let drift = serving.and_then(|v| v.drift.as_ref()).map(|d| d.report());
    let shadow = serving.and_then(|_| app.registry.shadow(name)).map(|s| s.report());
    let h = |h: &Histogram| json!({ "count": h.count(), "ns": h.sum_ns() });
    let zero = json!({ "count": 0, "ns": 0 });
    json!({
        "name": name,
        "version": version,
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
        "plans": plans,
        "drift": drift,
        "shadow": shadow,
    })
}
