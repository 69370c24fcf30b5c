//! The console's API bodies and what devices report to it, through the real router on a real
//! (temporary) SQLite database: `POST /api/releases`, `POST /api/rollouts` (then the rollout is
//! stepped and acted on), `PUT /api/objects/{sha256}`, and a device state taken by ingest and
//! then listed. The first byte picks the route; the rest is the body.
//!
//! Every input runs on a fresh copy of a database that already holds one uploaded release (made
//! at start-up through the same API, signed by a key generated for the run) and four devices,
//! so a rollout request can get as far as choosing devices. Beyond not panicking, the console
//! must answer every body with a status below 500 and a JSON body.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use outpost_tools::console::{api, catalog, db, ingest, rollout, state::Console};
use outpost_updater::author::{self, RootParams};
use outpost_updater::keys::SecretKey;
use outpost_updater::offer::Offer;
use outpost_updater::release_dir::ReleaseDir;
use tower::ServiceExt;

const TOKEN: &str = "fuzz-token";
const FLEET: &str = "fuzz";

struct Fixture {
    dir: PathBuf,
    template: PathBuf,
    roots_file: PathBuf,
    rt: tokio::runtime::Runtime,
    /// The one input running (libFuzzer is single-threaded; the lock keeps it so).
    lock: Mutex<()>,
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let _one = f.lock.lock().unwrap();
    let Some((&route, body)) = data.split_first() else { return };
    let console = open_console(f);
    match route % 4 {
        0 => {
            let (status, _) = call(f, &console, Method::POST, "/api/releases", body.to_vec());
            assert!(status != StatusCode::OK || catalog::verify(&roots(f), body, std::time::SystemTime::now()).is_ok());
        }
        1 => {
            let (status, reply) = call(f, &console, Method::POST, "/api/rollouts", body.to_vec());
            if status == StatusCode::OK {
                let id = reply["id"].as_i64().expect("a started rollout has an id");
                step(&console, 3);
                for action in ["pause", "resume", "retry", "abort"] {
                    call(f, &console, Method::POST, &format!("/api/rollouts/{id}/{action}"), Vec::new());
                }
                step(&console, 1);
                let (status, _) = call(f, &console, Method::GET, &format!("/api/rollouts/{id}"), Vec::new());
                assert_eq!(status, StatusCode::OK);
            }
        }
        2 => {
            // Half the time under its own hash, so the write goes through.
            let name = if body.first().is_some_and(|b| b & 1 == 0) {
                outpost_updater::sha256_hex(body)
            } else {
                body.iter().take(70).map(|&b| if b.is_ascii_alphanumeric() { b as char } else { 'x' }).collect()
            };
            call(f, &console, Method::PUT, &format!("/api/objects/{name}"), body.to_vec());
        }
        _ => {
            if let Ok(state) = ingest::parse(FLEET, "dev-0", body) {
                let conn = console.db();
                ingest::record(&conn, &state, db::now_ms()).expect("a parsed state is recorded");
            }
            for path in ["/api/devices", "/api/devices/dev-0", "/api/overview"] {
                let (status, _) = call(f, &console, Method::GET, path, Vec::new());
                assert_eq!(status, StatusCode::OK, "{path}");
            }
        }
    }
});

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("outpost-fuzz-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("objects")).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let root_key = SecretKey::generate().unwrap();
        let release_key = SecretKey::generate().unwrap();
        let mut root = author::root_doc(&RootParams {
            fleet: FLEET,
            version: 1,
            expires_in_days: 365,
            root_keys: &[root_key.public()],
            root_threshold: 1,
            release_keys: &[release_key.public()],
            release_threshold: 1,
            release_expires_in_days: 365,
            revoked: &[],
        });
        root.sign(&root_key).unwrap();
        let roots_file = dir.join("root.json");
        std::fs::write(&roots_file, root.to_bytes()).unwrap();
        let template = dir.join("template.db");
        let f = Fixture { dir, template, roots_file, rt, lock: Mutex::new(()) };
        let release = make_release(&f.dir, &release_key);
        {
            let conn = db::open(&db::Database::Sqlite(f.template.clone())).unwrap();
            for i in 0..4 {
                let state = format!(
                    r#"{{"device":"dev-{i}","fleet":"{FLEET}","group":"default","online":true,"labels":{{"site":"s{}"}}}}"#,
                    i % 2
                );
                let state = ingest::parse(FLEET, &format!("dev-{i}"), state.as_bytes()).unwrap();
                ingest::record(&conn, &state, db::now_ms()).unwrap();
            }
        }
        // The release goes in the way an operator's upload does.
        let console = open_console_at(&f, &f.template);
        let offer = Offer::from_dir(&release).unwrap();
        for (hash, _) in offer.unverified_doc().unwrap().objects() {
            let data = std::fs::read(ReleaseDir(&release).find(hash).unwrap()).unwrap();
            let (status, reply) = call(&f, &console, Method::PUT, &format!("/api/objects/{hash}"), data);
            assert_eq!(status, StatusCode::OK, "{reply}");
        }
        let (status, reply) = call(&f, &console, Method::POST, "/api/releases", offer.to_bytes());
        assert_eq!(status, StatusCode::OK, "{reply}");
        drop(console);
        f
    })
}

/// A signed one-model release (the model's bytes need not be ONNX: the console never loads it).
fn make_release(dir: &Path, key: &SecretKey) -> PathBuf {
    std::fs::write(dir.join("model.onnx"), b"not really a model").unwrap();
    std::fs::write(dir.join("model.golden.json"), b"{}").unwrap();
    std::fs::write(
        dir.join("release.toml"),
        format!("fleet = \"{FLEET}\"\nnumber = 1\n[[models]]\nname = \"m\"\nversion = \"1\"\npath = \"model.onnx\"\ngolden = \"model.golden.json\"\n"),
    )
    .unwrap();
    let out = dir.join("r1");
    author::create(&dir.join("release.toml"), &out).unwrap();
    author::sign_file(&ReleaseDir(&out).envelope(), key).unwrap();
    out
}

fn roots(f: &Fixture) -> catalog::Roots {
    catalog::Roots::load(std::slice::from_ref(&f.roots_file)).unwrap()
}

/// A console on a fresh copy of the template database.
fn open_console(f: &Fixture) -> Arc<Console> {
    let path = f.dir.join("work.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    std::fs::copy(&f.template, &path).unwrap();
    open_console_at(f, &path)
}

fn open_console_at(f: &Fixture, path: &Path) -> Arc<Console> {
    Arc::new(Console {
        db: Mutex::new(db::open(&db::Database::Sqlite(path.to_owned())).unwrap()),
        objects: f.dir.join("objects"),
        roots: roots(f),
        token: TOKEN.into(),
        blob_stats: Default::default(),
        bad_states: Default::default(),
        states_ready: Default::default(),
        holder: "fuzz".into(),
        lease: Default::default(),
    })
}

/// One API call through the real router; every answer is under 500 and JSON.
fn call(f: &Fixture, console: &Arc<Console>, method: Method, path: &str, body: Vec<u8>) -> (StatusCode, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let router = api::router(console.clone());
    f.rt.block_on(async move {
        let reply = router.oneshot(req).await.unwrap();
        let status = reply.status();
        let bytes = reply.into_body().collect().await.unwrap().to_bytes();
        assert!(status.as_u16() < 500, "{path}: {status}: {}", String::from_utf8_lossy(&bytes));
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{path}: {status}: not JSON ({e})"));
        (status, json)
    })
}

/// Steps every live rollout, a minute apart, offering to nobody.
fn step(console: &Console, ticks: i64) {
    let conn = console.db();
    for t in 0..ticks {
        rollout::store::tick(&conn, db::now_ms() + t * 60_000, &mut |_, _, _, _| true).expect("a rollout steps");
    }
}
