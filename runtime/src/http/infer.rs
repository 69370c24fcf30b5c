//! `POST /v2/models/{m}[/versions/{v}]/infer`: the request path.
//!
//! Body (bounded) → parse → bind to the model's signature → the version's executor (a bounded
//! queue and worker threads, or this task for a short call; full: 503 at once) → response, JSON
//! or with binary outputs. Nothing here touches the disk or a global lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::app::App;
use crate::budget;
use crate::escalation::Overrides;
use crate::executor::NotRun;
use crate::model::{ModelSlot, ServedVersion};
use crate::shadow::Shadow;
use crate::stats::RequestOutcome;
use crate::tensor::{DataType, JsonData, Tensor};
use crate::v2::HEADER_LENGTH;
use crate::v2::request::{self, InferRequest, OutputRequest};

pub async fn infer(
    State(app): State<Arc<App>>,
    Path(path): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let _counted = Counted::enter(&app.infer_requests);
    let (slot, model) = match app.served(&path) {
        Ok((slot, model)) => (slot.clone(), model),
        Err(e) => return e.into_response(),
    };
    let (outcome, response) = match run(&app, &slot, &model, &headers, body).await {
        Ok(r) => (RequestOutcome::Success, r),
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => (RequestOutcome::Rejected, e.into_response()),
        Err(e) => {
            tracing::debug!(model = %slot.spec.name, version = %model.version, status = e.status.as_u16(), error = %e.message, "inference request failed");
            (RequestOutcome::Failure, e.into_response())
        }
    };
    model.stats.record(outcome, started.elapsed());
    response
}

async fn run(
    app: &App,
    slot: &ModelSlot,
    model: &ServedVersion,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let spec = &slot.spec;
    let header_len =
        match headers.get(HEADER_LENGTH) {
            None => None,
            Some(v) => Some(v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).ok_or_else(|| {
                ApiError::bad_request("Inference-Header-Content-Length must be a non-negative integer")
            })?),
        };
    // What this request may hold at its peak, reserved before its body is read.
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok());
    let cost = budget::request_cost(
        declared.unwrap_or(app.max_body_bytes as u64).min(app.max_body_bytes as u64),
        header_len.is_some(),
    );
    let Some(_reserved) = app.inflight.reserve(cost) else {
        let busy = ApiError::unavailable(format!(
            "the server is busy: requests in flight hold {} of the {} bytes allowed (server.max_inflight_bytes); retry later",
            app.inflight.used(),
            app.inflight.limit()
        ));
        // Read the body and drop it as it comes (nothing is kept), so that a client that sends
        // its whole body before reading gets this answer, not a broken connection.
        discard(body, app.max_body_bytes).await;
        return Err(busy);
    };
    let body = read_body(body, headers, app.max_body_bytes).await?;
    let InferRequest { id, inputs, outputs, binary_output, parameters } = request::parse(&body, header_len)?;
    drop(body);
    let overrides = Overrides::parse(&parameters).map_err(ApiError::bad_request)?;
    let escalator = slot.escalator();
    if overrides.any() && escalator.is_none() {
        return Err(ApiError::bad_request(format!("model `{}` has no central model to escalate to", spec.name)));
    }
    let inputs = request::bind(inputs, &spec.name, &model.signature, spec.allow_non_finite)?;
    spec.shapes.admit(&model.shapes, &inputs, &model.signature).map_err(ApiError::bad_request)?;
    // As configured, whether or not the version batches (batch_choice): a request gets the same
    // answer whatever the load measured.
    if spec.batching.is_some() {
        crate::batcher::batch_rows(&inputs).map_err(ApiError::bad_request)?;
    }
    // The central gets the same inputs: keep a copy only when it may need them.
    let forwarded = escalator.map(|_| inputs.clone());
    if let Some(wanted) = &outputs
        && let Some(unknown) = wanted.iter().find(|o| !model.signature.outputs.iter().any(|s| s.name == o.name))
    {
        let has: Vec<&str> = model.signature.outputs.iter().map(|s| s.name.as_str()).collect();
        return Err(ApiError::bad_request(format!(
            "unknown output `{}` (model `{}` has: {})",
            unknown.name,
            spec.name,
            has.join(", ")
        )));
    }
    // Alone in the server (no other inference request anywhere in its path): the call may run
    // on this task; with others about, the HTTP threads have their work and a worker takes it.
    let alone = app.infer_requests.load(Relaxed) == 1;
    if let Some(d) = &model.drift {
        d.observe_inputs(&inputs);
    }
    // A request sampled for the shadow candidate keeps a copy of its inputs for it.
    let shadow = app.registry.shadow(&spec.name).and_then(|s| s.admit()).map(|permit| (permit, inputs.clone()));
    let results = model
        .infer(inputs, alone)
        .await
        .map_err(|not_run| match not_run {
            NotRun::Full(full) => ApiError::unavailable(format!(
                "model `{}` is busy: its queue of {} requests is full; retry later",
                spec.name, full.bound
            )),
            NotRun::Stopped => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the inference worker stopped"),
        })?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(d) = &model.drift {
        d.observe_outputs(&results, &spec.name, &model.version);
    }
    // The candidate runs on its own task, against the local answer; this answer does not wait.
    if let Some((permit, inputs)) = shadow {
        Shadow::spawn(permit, inputs, results.clone());
    }
    let (results, parameters) = match (escalator, forwarded) {
        (Some(e), Some(inputs)) => {
            let (results, outcome) = e.resolve(&spec.name, &model.version, &inputs, results, overrides).await;
            (results, Some(outcome.parameters()))
        }
        _ => (results, None),
    };
    Ok(encode(&spec.name, &model.version, id, parameters, results, outputs, binary_output))
}

/// Counts a request in from its handler's start until it is dropped.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn enter(count: &'a AtomicUsize) -> Counted<'a> {
        count.fetch_add(1, Relaxed);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Reads and drops a body, up to `limit` bytes.
async fn discard(body: Body, limit: usize) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut seen = 0;
    while seen <= limit {
        match body.frame().await {
            Some(Ok(frame)) => seen += frame.data_ref().map_or(0, |d| d.len()),
            Some(Err(_)) | None => break,
        }
    }
}

async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than the {limit} bytes allowed"))
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let length_limit = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if length_limit { too_large() } else { ApiError::bad_request(format!("could not read the request body: {e}")) }
    })
}

/// A V2 response, written straight to bytes (fields in the order a JSON object's keys sort in,
/// as the response had when it was built as a JSON value).
#[derive(Serialize)]
struct ResponseDoc<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    model_name: &'a str,
    model_version: &'a str,
    outputs: Vec<OutputDoc<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
}

/// One output of a V2 response: its elements in `data`, or their size in `parameters` where
/// they follow the JSON as binary.
#[derive(Serialize)]
struct OutputDoc<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
    datatype: DataType,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    shape: &'a [usize],
}

/// Builds the V2 response: JSON, or JSON followed by binary outputs.
fn encode(
    model: &str,
    version: &str,
    id: Option<String>,
    parameters: Option<Value>,
    results: Vec<Tensor>,
    wanted: Option<Vec<OutputRequest>>,
    binary_default: bool,
) -> Response {
    let selected: Vec<(Tensor, bool)> = match wanted {
        None => results.into_iter().map(|t| (t, binary_default)).collect(),
        Some(wanted) => {
            let mut results = results;
            wanted
                .into_iter()
                .filter_map(|w| {
                    let i = results.iter().position(|t| t.name == w.name)?;
                    Some((results.swap_remove(i), w.binary.unwrap_or(binary_default)))
                })
                .collect()
        }
    };
    let mut binary = Vec::new();
    let outputs: Vec<OutputDoc> = selected
        .iter()
        .map(|(t, as_binary)| {
            let (data, parameters) = if *as_binary {
                binary.extend_from_slice(&t.data);
                (None, Some(json!({ "binary_data_size": t.data.len() })))
            } else {
                (Some(t.json_data()), None)
            };
            OutputDoc { data, datatype: t.datatype, name: &t.name, parameters, shape: &t.shape }
        })
        .collect();
    let doc = ResponseDoc { id, model_name: model, model_version: version, outputs, parameters };
    let mut body = serde_json::to_vec(&doc).unwrap_or_default();
    if binary.is_empty() {
        return ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response();
    }
    let json_len = body.len();
    body.extend_from_slice(&binary);
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
            (header::HeaderName::from_static(HEADER_LENGTH), HeaderValue::from(json_len)),
        ],
        body,
    )
        .into_response()
}
