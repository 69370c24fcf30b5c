//! The HTTP API: KServe V2 (Open Inference Protocol) REST endpoints, with Triton's binary
//! tensor, model repository and statistics extensions, and Prometheus `/metrics`. The wire
//! format itself is in [`crate::v2`].

pub mod browser;
mod error;
mod hard_examples;
mod infer;
mod repository;
mod update;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

pub use error::ApiError;

use crate::app::App;
use crate::model::{ModelSlot, ServedVersion};
use crate::stats::METRIC_HEADERS;

/// Extensions this server implements, as `GET /v2` lists them.
pub const EXTENSIONS: [&str; 3] = ["binary_tensor_data", "model_repository", "statistics"];

/// Every route of the HTTP API.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/stats", get(repository::all_stats))
        .route("/v2/models/{m}", get(model_metadata))
        .route("/v2/models/{m}/versions/{v}", get(model_metadata))
        .route("/v2/models/{m}/ready", get(model_ready))
        .route("/v2/models/{m}/versions/{v}/ready", get(model_ready))
        .route("/v2/models/{m}/stats", get(repository::model_stats))
        .route("/v2/models/{m}/versions/{v}/stats", get(repository::model_stats))
        .route("/v2/models/{m}/infer", post(infer::infer))
        .route("/v2/models/{m}/versions/{v}/infer", post(infer::infer))
        .route("/v2/repository/index", get(repository::index).post(repository::index))
        .route("/v2/repository/models/{m}/load", post(repository::load))
        .route("/v2/repository/models/{m}/unload", post(repository::unload))
        .route("/v2/hard-examples", post(hard_examples::upload))
        .route("/v2/update/apply", post(update::apply))
        .route("/v2/update/candidate", post(update::candidate))
        .route("/v2/update/promote", post(update::promote))
        .route("/v2/update/drop", post(update::drop_candidate))
        .route("/v2/update/revert", post(update::revert))
        .route("/v2/update/status", get(update::status))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .with_state(app)
}

impl App {
    /// The model a request path names.
    pub(crate) fn slot(&self, path: &HashMap<String, String>) -> Result<Arc<ModelSlot>, ApiError> {
        let name = path.get("m").map(String::as_str).unwrap_or_default();
        self.registry.get(name).ok_or_else(|| {
            let slots = self.registry.slots();
            let known: Vec<&str> = slots.iter().map(|s| s.spec.name.as_str()).collect();
            ApiError::not_found(format!("unknown model `{name}` (serving: {})", known.join(", ")))
        })
    }

    /// The model and version a request path names (the highest version when it names none).
    pub(crate) fn served(
        &self,
        path: &HashMap<String, String>,
    ) -> Result<(Arc<ModelSlot>, Arc<ServedVersion>), ApiError> {
        let slot = self.slot(path)?;
        let name = &slot.spec.name;
        let wanted = path.get("v").map(String::as_str);
        match slot.version(wanted) {
            Some(v) => Ok((slot, v)),
            None if !slot.is_ready() => {
                Err(ApiError::unavailable(format!("model `{name}` is not ready ({})", slot.state().as_str())))
            }
            None => {
                let serving: Vec<String> = slot.served().iter().map(|s| s.version.clone()).collect();
                Err(ApiError::not_found(format!(
                    "model `{name}` has no version `{}` (serving versions: {})",
                    wanted.unwrap_or_default(),
                    serving.join(", ")
                )))
            }
        }
    }
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    if app.release_pending.load(std::sync::atomic::Ordering::Acquire) {
        return ApiError::bad_request("not ready: loading the active release's models").into_response();
    }
    if app.registry.is_ready() {
        return StatusCode::OK.into_response();
    }
    let waiting: Vec<String> = app
        .registry
        .slots()
        .iter()
        .filter(|s| !s.is_ready())
        .map(|s| format!("{} ({})", s.spec.name, s.state().as_str()))
        .collect();
    ApiError::bad_request(format!("not ready: waiting for {}", waiting.join(", "))).into_response()
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({ "name": "outpost", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS }))
}

async fn model_metadata(
    State(app): State<Arc<App>>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (slot, model) = app.served(&path)?;
    let versions: Vec<String> = slot.served().iter().map(|s| s.version.clone()).collect();
    Ok(Json(json!({
        "name": slot.spec.name,
        "versions": versions,
        "platform": "onnx",
        "inputs": model.signature.inputs,
        "outputs": model.signature.outputs,
        "parameters": {
            "version": model.version,
            "backend": model.backend,
            "backend_choice": model.backend_choice,
            "executor": model.executor,
            "batching": model.batching,
            "intra_op_threads": model.threads,
            "execution_provider": model.provider.as_ref().map_or("cpu", |p| p.provider.as_str()),
            "execution_providers_skipped": model.provider.as_ref().map_or(&[][..], |p| &p.skipped[..]),
        },
    })))
}

async fn model_ready(
    State(app): State<Arc<App>>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<StatusCode, ApiError> {
    match app.served(&path) {
        Ok(_) => Ok(StatusCode::OK),
        // Not ready is a 4xx "false" in V2; an unknown version stays a 404.
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => Err(ApiError::bad_request(e.message)),
        Err(e) => Err(e),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut out = String::from(METRIC_HEADERS);
    for slot in app.registry.slots().iter() {
        for (version, stats) in slot.stats() {
            stats.render(&mut out, &slot.spec.name, &version);
        }
    }
    out.push_str(crate::escalation::METRIC_HEADERS);
    for slot in app.registry.slots().iter() {
        if let Some(e) = slot.escalator() {
            e.render(&mut out, &slot.spec.name);
        }
    }
    out.push_str("# HELP outpost_model_ready Versions loaded and serving.\n# TYPE outpost_model_ready gauge\n");
    for slot in app.registry.slots().iter() {
        for s in slot.served().iter() {
            out.push_str(&format!("outpost_model_ready{{model=\"{}\",version=\"{}\"}} 1\n", slot.spec.name, s.version));
        }
    }
    out.push_str(
        "# HELP outpost_model_backend_info The backend serving each version, and how it was chosen \
         (configured, only, measured, rule), and where its calls run (executor: inline or threads).\n\
         # TYPE outpost_model_backend_info gauge\n",
    );
    for slot in app.registry.slots().iter() {
        for s in slot.served().iter() {
            out.push_str(&format!(
                "outpost_model_backend_info{{model=\"{}\",version=\"{}\",backend=\"{}\",chosen_by=\"{}\",executor=\"{}\"}} 1\n",
                slot.spec.name, s.version, s.backend, s.backend_choice.by, s.executor.kind
            ));
        }
    }
    out.push_str(
        "# HELP outpost_model_batching Whether a version with batching configured stacks requests (1) or serves \
         unbatched (0), and how that was decided (configured, measured, plans per shape, accelerator, unmeasured).\n\
         # TYPE outpost_model_batching gauge\n",
    );
    for slot in app.registry.slots().iter() {
        for s in slot.served().iter() {
            if let Some(b) = &s.batching {
                out.push_str(&format!(
                    "outpost_model_batching{{model=\"{}\",version=\"{}\",by=\"{}\"}} {}\n",
                    slot.spec.name,
                    s.version,
                    b.by,
                    u8::from(b.batches)
                ));
            }
        }
    }
    render_plans(&mut out, &app);
    out.push_str(crate::drift::METRIC_HEADERS);
    for slot in app.registry.slots().iter() {
        for s in slot.served().iter() {
            if let Some(d) = &s.drift {
                d.render(&mut out, &slot.spec.name, &s.version);
            }
        }
    }
    out.push_str(crate::shadow::METRIC_HEADERS);
    for shadow in app.registry.shadows().iter() {
        shadow.render(&mut out, &shadow.model);
    }
    out.push_str("# HELP outpost_model_load_failures Versions that failed their last load.\n# TYPE outpost_model_load_failures gauge\n");
    for slot in app.registry.slots().iter() {
        let failed = slot.failures();
        out.push_str(&format!("outpost_model_load_failures{{model=\"{}\"}} {failed}\n", slot.spec.name));
    }
    // The runtime's own count, not the configuration's: what actually serves HTTP.
    let http_threads = tokio::runtime::Handle::current().metrics().num_workers();
    out.push_str(&format!(
        "# HELP outpost_http_threads Threads serving HTTP (server.http_threads).\n\
         # TYPE outpost_http_threads gauge\noutpost_http_threads {http_threads}\n"
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Plans per input shape (tract), for the versions serving.
fn render_plans(out: &mut String, app: &App) {
    type Field = fn(&crate::backend::PlanStats) -> u64;
    let families: [(&str, &str, &str, Field); 4] = [
        ("outpost_model_plans", "gauge", "Plans held per input shape, declared shapes included.", |p| p.plans as u64),
        ("outpost_model_plan_bytes", "gauge", "Bytes of the constants those plans hold.", |p| p.bytes),
        ("outpost_model_plans_prepared_total", "counter", "Plans prepared for new input shapes.", |p| p.prepared),
        ("outpost_model_plans_evicted_total", "counter", "Plans evicted to stay within plan_cache.", |p| p.evicted),
    ];
    for (metric, kind, help, field) in families {
        out.push_str(&format!("# HELP {metric} {help}\n# TYPE {metric} {kind}\n"));
        for slot in app.registry.slots().iter() {
            for s in slot.served().iter() {
                if let Some(plans) = s.plans() {
                    let value = field(&plans);
                    out.push_str(&format!(
                        "{metric}{{model=\"{}\",version=\"{}\"}} {value}\n",
                        slot.spec.name, s.version
                    ));
                }
            }
        }
    }
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn no_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}", uri.path()))
}
