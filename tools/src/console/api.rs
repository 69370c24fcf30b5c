//! The console's HTTP side: the JSON API under `/api` (bearer token) and the web page.
//! Reference: docs/console.md.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::db::{Connection, OptionalExtension, params};
use super::state::Console;
use super::{catalog, db, fleet, history, ingest, lease, objects, rollout};

/// How far back `/api/fleet` carries the drift history (the page's charts).
const HISTORY_MS: i64 = 6 * 3600 * 1000;

type Shared = State<Arc<Console>>;

/// An API error: a status and a message, as `{"error": ...}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"error": self.1}))).into_response()
    }
}

impl From<db::Error> for ApiError {
    fn from(e: db::Error) -> ApiError {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("database: {e}"))
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn not_found(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, msg.into())
}

type Json = Result<axum::Json<Value>, ApiError>;

pub fn router(console: Arc<Console>) -> Router {
    let api = Router::new()
        .route("/overview", get(overview))
        .route("/devices", get(devices))
        .route("/fleet", get(fleet_page))
        .route("/devices/{id}", get(device))
        // An offer is as large as a device takes one (its chunk hashes grow with the model: a
        // 200 MB model at 64 KiB chunks makes a 0.3 MB offer); other bodies stay small.
        .route(
            "/releases",
            get(releases).post(upload_release).layer(DefaultBodyLimit::max(outpost_updater::offer::MAX_OFFER_BYTES)),
        )
        .route("/objects/{sha256}", put(put_object).head(head_object).layer(DefaultBodyLimit::disable()))
        .route("/rollouts", get(rollouts).post(start_rollout))
        .route("/rollouts/{id}", get(show_rollout))
        .route("/rollouts/{id}/{action}", post(act))
        .route("/events", get(events))
        // Every answer under /api is JSON, a path or method it does not have included.
        .fallback(|| async { not_found("no such API route (docs/console.md lists them)") })
        .method_not_allowed_fallback(|| async {
            ApiError(StatusCode::METHOD_NOT_ALLOWED, "this API route does not take that method".into())
        })
        .layer(middleware::from_fn_with_state(console.clone(), auth));
    Router::new()
        .route("/", get(|| async { page("text/html; charset=utf-8", include_str!("page/index.html")) }))
        .route("/app.js", get(|| async { page("text/javascript; charset=utf-8", include_str!("page/app.js")) }))
        .route("/style.css", get(|| async { page("text/css; charset=utf-8", include_str!("page/style.css")) }))
        .route("/health", get(|| async { "ok\n" }))
        .nest("/api", api)
        .layer(DefaultBodyLimit::max(256 * 1024))
        .with_state(console)
}

fn page(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// `Authorization: Bearer TOKEN`, compared without an early exit.
async fn auth(State(c): Shared, req: Request, next: Next) -> Response {
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| {
        g.len() == c.token.len() && g.bytes().zip(c.token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if !ok {
        return ApiError(StatusCode::UNAUTHORIZED, "a bearer token is required (the console's token file)".into())
            .into_response();
    }
    next.run(req).await
}

/// Runs a database read or write off the async threads.
async fn with_db<T: Send + 'static>(
    c: Arc<Console>,
    f: impl FnOnce(&mut Connection) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || f(&mut c.db()))
        .await
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "the request's task failed".into()))?
}

fn list_devices(conn: &Connection, fleet: Option<&str>) -> Result<Vec<Value>, ApiError> {
    let mut s = conn.prepare("SELECT * FROM devices WHERE (fleet = ?1 OR ?1 IS NULL) ORDER BY fleet, id")?;
    Ok(s.query_map([fleet], ingest::device_json)?.collect::<Result<_, _>>()?)
}

fn list_releases(conn: &Connection) -> Result<Vec<Value>, ApiError> {
    let mut s = conn.prepare(
        "SELECT r.id, r.fleet, r.grp, r.number, r.models, r.bytes, r.uploaded,
                (SELECT count(*) FROM devices d WHERE d.release_id = r.id) AS running
         FROM releases r ORDER BY r.fleet, r.grp, r.number DESC",
    )?;
    let rows = s.query_map(params![], |r| {
        Ok(json!({
            "id": r.get::<_, String>(0)?, "fleet": r.get::<_, String>(1)?, "group": r.get::<_, String>(2)?,
            "number": r.get::<_, i64>(3)?,
            "models": serde_json::from_str::<Value>(&r.get::<_, String>(4)?).unwrap_or(Value::Null),
            "bytes": r.get::<_, i64>(5)?, "uploaded": r.get::<_, i64>(6)?, "devices": r.get::<_, i64>(7)?,
        }))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn list_rollouts(conn: &Connection, limit: i64) -> Result<Vec<Value>, ApiError> {
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM rollouts ORDER BY id DESC LIMIT ?1")?
        .query_map([limit], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for id in ids {
        out.extend(rollout::view::show(conn, id)?);
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
struct FleetQuery {
    fleet: Option<String>,
}

async fn overview(State(c): Shared) -> Json {
    let stats = (
        c.blob_stats.served.load(std::sync::atomic::Ordering::Relaxed),
        c.blob_stats.bytes.load(std::sync::atomic::Ordering::Relaxed),
        c.bad_states.load(std::sync::atomic::Ordering::Relaxed),
    );
    let this = c.holder.clone();
    with_db(c, move |conn| {
        let (devices, online): (i64, i64) =
            conn.query_row("SELECT count(*), coalesce(sum(online), 0) FROM devices", params![], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let stepping = lease::holder(conn)?.map(|(holder, until)| json!({"console": holder, "until": until}));
        Ok(axum::Json(json!({
            "now": db::now_ms(),
            "summary": {"devices": devices, "online": online, "chunks_served": stats.0, "bytes_served": stats.1,
                        "states_ignored": stats.2},
            // Which console steps rollouts (its lease), and which one answered.
            "console": {"this": this, "stepping": stepping},
            "releases": list_releases(conn)?,
            "rollouts": list_rollouts(conn, 20)?,
        })))
    })
    .await
}

/// `GET /api/fleet?FILTERS`: the fleet's groups (by release, update state, drift band) and one
/// page of the devices the filters select (docs/console.md, "JSON API").
async fn fleet_page(State(c): Shared, Query(f): Query<fleet::Filter>) -> Json {
    with_db(c, move |conn| {
        let mut v = fleet::page(conn, &f).map_err(bad)?;
        let now = db::now_ms();
        v["groups"] = fleet::groups(conn, f.fleet.as_deref())?;
        v["drift_history"] = json!(history::drift(conn, f.fleet.as_deref(), now - HISTORY_MS)?);
        v["now"] = json!(now);
        Ok(axum::Json(v))
    })
    .await
}

async fn devices(State(c): Shared, Query(q): Query<FleetQuery>) -> Json {
    with_db(c, move |conn| Ok(axum::Json(json!(list_devices(conn, q.fleet.as_deref())?)))).await
}

async fn device(State(c): Shared, Path(id): Path<String>, Query(q): Query<FleetQuery>) -> Json {
    with_db(c, move |conn| {
        let dev = conn
            .query_row(
                "SELECT * FROM devices WHERE id = ?1 AND (fleet = ?2 OR ?2 IS NULL) ORDER BY last_seen DESC LIMIT 1",
                params![id, q.fleet],
                |r| Ok((ingest::device_json(r)?, r.get::<_, String>("state")?)),
            )
            .optional()?;
        let Some((mut dev, state)) = dev else { return Err(not_found(format!("no device `{id}`"))) };
        dev["state"] = serde_json::from_str(&state).unwrap_or(Value::Null);
        let mut s = conn.prepare(
            "SELECT at, rollout_id, kind, detail FROM events WHERE device_id = ?1 ORDER BY id DESC LIMIT 200",
        )?;
        let history: Vec<Value> = s
            .query_map([&id], |r| {
                Ok(json!({"at": r.get::<_, i64>(0)?, "rollout": r.get::<_, Option<i64>>(1)?,
                          "kind": r.get::<_, String>(2)?, "detail": r.get::<_, String>(3)?}))
            })?
            .collect::<Result<_, _>>()?;
        dev["history"] = json!(history);
        let mut s = conn.prepare(
            "SELECT rollout_id, status, attempt, reason FROM rollout_devices WHERE device_id = ?1 ORDER BY rollout_id DESC",
        )?;
        let rollouts: Vec<Value> = s
            .query_map([&id], |r| {
                Ok(json!({"rollout": r.get::<_, i64>(0)?, "status": r.get::<_, String>(1)?,
                          "attempt": r.get::<_, i64>(2)? + 1, "reason": r.get::<_, Option<String>>(3)?}))
            })?
            .collect::<Result<_, _>>()?;
        dev["rollouts"] = json!(rollouts);
        Ok(axum::Json(dev))
    })
    .await
}

async fn releases(State(c): Shared) -> Json {
    with_db(c, |conn| Ok(axum::Json(json!(list_releases(conn)?)))).await
}

/// `POST /api/releases`: a signed offer (`{"release": ..., "roots": [...]}`, as a release
/// directory's documents make it), taken once its objects are uploaded.
async fn upload_release(State(c): Shared, body: Bytes) -> Json {
    let (offer, doc) = catalog::verify(&c.roots, &body, SystemTime::now()).map_err(bad)?;
    with_db(c, move |conn| {
        let added = catalog::add_release(conn, &offer, &doc, db::now_ms()).map_err(bad)?;
        Ok(axum::Json(added))
    })
    .await
}

fn object_name(sha256: &str) -> Result<(), ApiError> {
    if outpost_updater::is_sha256_hex(sha256) {
        Ok(())
    } else {
        Err(bad("objects are named by their SHA-256 (64 lowercase hex)"))
    }
}

async fn head_object(State(c): Shared, Path(sha256): Path<String>) -> Result<Response, ApiError> {
    object_name(&sha256)?;
    let length: Option<i64> = with_db(c, move |conn| {
        Ok(conn.query_row("SELECT length FROM blobs WHERE sha256 = ?1", [&sha256], |r| r.get(0)).optional()?)
    })
    .await?;
    Ok(match length {
        Some(n) => ([(header::CONTENT_LENGTH, n.to_string())], Body::empty()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    })
}

/// `PUT /api/objects/{sha256}`: the body is stored when it hashes to its name; it streams
/// to disk, never whole in memory, and goes into the database a piece at a time.
async fn put_object(State(c): Shared, Path(sha256): Path<String>, body: Body) -> Json {
    object_name(&sha256)?;
    let io = |e: std::io::Error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("storing the object: {e}"));
    let mut w = catalog::ObjectWriter::create(&c.objects, &sha256).map_err(io)?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| bad(format!("reading the body: {e}")))?;
        if let Some(data) = frame.data_ref() {
            // File writes off the async threads' hot path (the runtime has two).
            tokio::task::block_in_place(|| w.write(data)).map_err(bad)?;
        }
    }
    tokio::task::block_in_place(|| w.finish()).map_err(bad)?;
    let dir = c.objects.clone();
    with_db(c, move |conn| {
        let len = objects::store(conn, &dir, &sha256, db::now_ms())
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("storing the object: {e}")))?;
        Ok(axum::Json(json!({"sha256": sha256, "length": len})))
    })
    .await
}

#[derive(serde::Deserialize)]
struct ListQuery {
    limit: Option<i64>,
}

async fn rollouts(State(c): Shared, Query(q): Query<ListQuery>) -> Json {
    with_db(c, move |conn| Ok(axum::Json(json!(list_rollouts(conn, q.limit.unwrap_or(50).clamp(1, 1000))?)))).await
}

async fn start_rollout(State(c): Shared, body: Bytes) -> Json {
    let req: rollout::spec::StartRequest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("rollout request: {e}")))?;
    with_db(c, move |conn| {
        let tx = conn.transaction()?;
        let id = rollout::store::start(&tx, &req, db::now_ms()).map_err(bad)?;
        tx.commit()?;
        Ok(axum::Json(rollout::view::show(conn, id)?.unwrap_or(Value::Null)))
    })
    .await
}

async fn show_rollout(State(c): Shared, Path(id): Path<i64>) -> Json {
    with_db(c, move |conn| {
        rollout::view::show(conn, id)?.map(axum::Json).ok_or_else(|| not_found(format!("no rollout {id}")))
    })
    .await
}

async fn act(State(c): Shared, Path((id, action)): Path<(i64, String)>) -> Json {
    if !["pause", "resume", "abort", "retry"].contains(&action.as_str()) {
        return Err(not_found(format!("no action `{action}` (pause, resume, abort, retry)")));
    }
    with_db(c, move |conn| {
        let tx = conn.transaction()?;
        let r = rollout::store::act(&tx, id, &action, db::now_ms()).map_err(|e| ApiError(StatusCode::CONFLICT, e))?;
        tx.commit()?;
        Ok(axum::Json(r))
    })
    .await
}

#[derive(serde::Deserialize)]
struct EventQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

async fn events(State(c): Shared, Query(q): Query<EventQuery>) -> Json {
    with_db(c, move |conn| {
        let mut s = conn.prepare(
            "SELECT id, at, rollout_id, device_id, kind, detail FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows: Vec<Value> = s
            .query_map(params![q.after.unwrap_or(0), q.limit.unwrap_or(500).clamp(1, 5000)], |r| {
                Ok(json!({"id": r.get::<_, i64>(0)?, "at": r.get::<_, i64>(1)?, "rollout": r.get::<_, Option<i64>>(2)?,
                          "device": r.get::<_, Option<String>>(3)?, "kind": r.get::<_, String>(4)?,
                          "detail": r.get::<_, String>(5)?}))
            })?
            .collect::<Result<_, _>>()?;
        Ok(axum::Json(json!(rows)))
    })
    .await
}
