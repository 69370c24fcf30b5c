//! The model suite: every sample model gives ONNX Runtime's golden outputs through `outpost`'s
//! HTTP API, over JSON and over binary tensors, within the golden file's tolerance (1e-4 max abs
//! difference), on each backend. The suite is the golden files: model, inputs, expected outputs
//! and tolerance, listed once beside each model.

use std::path::PathBuf;

use outpost_runtime::golden::{Golden, max_abs_diff};
use outpost_tests::{Daemon, Server, models_dir, repo_root, sample_models};
use outpost_tools::http::Conn;
use outpost_tools::v2client;

/// What each backend claims to run: every sample model, and for ONNX Runtime also the quantized
/// Softmax that tract refuses.
fn suite(backend: &str) -> Vec<PathBuf> {
    let mut models = sample_models();
    assert!(models.len() >= 7, "expected the seven sample models, found {}", models.len());
    if backend == "ort" {
        models.push("models/hazards/digits-edge-qsoftmax.onnx".into());
    }
    models
}

#[tokio::test(flavor = "multi_thread")]
async fn every_model_matches_onnx_runtime_on_tract() {
    run_suite("tract").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_model_matches_onnx_runtime_on_ort() {
    run_suite("ort").await;
}

async fn run_suite(backend: &str) {
    let models = suite(backend);
    let server = Server::models_on(backend, &models).await;
    check_models(&mut server.conn().await, backend, &models).await;
}

/// The static musl build of `outpost` (tract backend), as `cross/build-static.sh x86_64` makes
/// it: the same suite through the real binary.
#[tokio::test(flavor = "multi_thread")]
async fn every_model_matches_onnx_runtime_in_the_static_musl_binary() {
    static_suite("x86_64", None).await;
}

/// The static aarch64 build, as `cross/build-static.sh aarch64` makes it, run under Debian's
/// `qemu-aarch64` (user-mode emulation): the same suite over the HTTP API.
#[tokio::test(flavor = "multi_thread")]
async fn every_model_matches_onnx_runtime_in_the_aarch64_binary_under_qemu() {
    static_suite("aarch64", Some("qemu-aarch64")).await;
}

/// The static armv7 (32-bit ARM, hard float) build under Debian's `qemu-arm`.
#[tokio::test(flavor = "multi_thread")]
async fn every_model_matches_onnx_runtime_in_the_armv7_binary_under_qemu() {
    static_suite("armv7", Some("qemu-arm")).await;
}

async fn static_suite(arch: &str, runner: Option<&str>) {
    let target = match arch {
        "armv7" => "armv7-unknown-linux-musleabihf".to_string(),
        _ => format!("{arch}-unknown-linux-musl"),
    };
    let bin = repo_root().join(format!("target/{target}/small/outpost"));
    assert!(
        bin.is_file(),
        "{} is missing: build it with cross/build-static.sh {arch} (tools/test.sh does)",
        bin.display()
    );
    let mut models = suite("tract");
    models.extend(
        ["successors/digits-edge-head", "successors/digits-edge-requant", "successors/digits-edge-retrain"]
            .map(|m| PathBuf::from(format!("models/{m}.onnx"))),
    );
    let args: Vec<String> = models.iter().flat_map(|m| ["--model".to_string(), m.display().to_string()]).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::serve_with(&bin, runner, &args);
    let mut conn = Conn::connect(daemon.addr).await.unwrap();
    check_models(&mut conn, "tract", &models).await;
}

async fn check_models(conn: &mut Conn, backend: &str, models: &[PathBuf]) {
    for path in models {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let golden = Golden::read(&Golden::beside(&repo_root().join(path)).expect("a golden file")).unwrap();
        let meta = conn.get(&format!("/v2/models/{name}")).await.unwrap().json();
        assert_eq!(meta["parameters"]["backend"], backend, "{name}");
        let inputs: Vec<_> = golden.inputs.iter().map(|g| g.to_tensor().unwrap()).collect();
        let tolerance = golden.tolerance.unwrap();
        assert!(tolerance <= 1e-4, "{name}: tolerance {tolerance} is looser than 1e-4");
        for (form, body) in [("json", v2client::json_request(&inputs)), ("binary", v2client::binary_request(&inputs))] {
            let path = format!("/v2/models/{name}/infer");
            let reply = conn.send(hyper::Method::POST, &path, &body.headers, body.bytes).await.unwrap();
            assert_eq!(reply.status, 200, "{name} on {backend} over {form}: {}", reply.error());
            let outputs = v2client::outputs(&reply).unwrap();
            for expected in &golden.outputs {
                let want = expected.to_tensor().unwrap();
                let got =
                    outputs.iter().find(|o| o.name == want.name).unwrap_or_else(|| panic!("{name}: no {}", want.name));
                let diff = max_abs_diff(&want, got);
                assert!(diff <= tolerance, "{name} on {backend} over {form}: `{}` differs by {diff:e}", want.name);
            }
            if form == "binary" {
                assert!(reply.headers.contains_key(outpost_runtime::v2::HEADER_LENGTH), "{name}: binary answer");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_in_the_path_are_honoured() {
    let server =
        Server::start("[[models]]\nname = \"edge\"\npath = \"models/digits-edge.onnx\"\nversion = \"3\"\n").await;
    let mut conn = server.conn().await;
    let golden = Golden::read(&models_dir().join("digits-edge.golden.json")).unwrap();
    let inputs: Vec<_> = golden.inputs.iter().map(|g| g.to_tensor().unwrap()).collect();
    let body = v2client::json_request(&inputs);
    let ok = conn
        .send(hyper::Method::POST, "/v2/models/edge/versions/3/infer", &body.headers, body.bytes.clone())
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["model_version"], "3");
    let missing =
        conn.send(hyper::Method::POST, "/v2/models/edge/versions/2/infer", &body.headers, body.bytes).await.unwrap();
    assert_eq!(missing.status, 404);
    assert!(missing.error().contains("no version `2`"), "{}", missing.error());
    let meta = conn.get("/v2/models/edge/versions/3").await.unwrap().json();
    assert_eq!(meta["versions"], serde_json::json!(["3"]));
    assert_eq!(meta["inputs"][0], serde_json::json!({"name": "input", "datatype": "FP32", "shape": [-1, 64]}));
    assert_eq!(conn.get("/v2/models/edge/versions/3/ready").await.unwrap().status, 200);
    assert_eq!(conn.get("/v2/models/edge/versions/4/ready").await.unwrap().status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_stats_count_what_happened() {
    let server = Server::start("[[models]]\nname = \"cnn\"\npath = \"models/digits-cnn.onnx\"\n").await;
    let mut conn = server.conn().await;
    let golden = Golden::read(&models_dir().join("digits-cnn.golden.json")).unwrap();
    let inputs: Vec<_> = golden.inputs.iter().map(|g| g.to_tensor().unwrap()).collect();
    let body = v2client::binary_request(&inputs);
    for _ in 0..3 {
        let r =
            conn.send(hyper::Method::POST, "/v2/models/cnn/infer", &body.headers, body.bytes.clone()).await.unwrap();
        assert_eq!(r.status, 200);
    }
    let bad = conn.post_json("/v2/models/cnn/infer", &serde_json::json!({"inputs": []})).await.unwrap();
    assert_eq!(bad.status, 400);

    let stats = conn.get("/v2/models/cnn/stats").await.unwrap().json();
    let s = &stats["model_stats"][0];
    assert_eq!(s["inference_count"], 3);
    assert_eq!(s["execution_count"], 3);
    assert_eq!(s["inference_stats"]["success"]["count"], 3);
    assert_eq!(s["inference_stats"]["fail"]["count"], 1);
    assert_eq!(s["inference_stats"]["queue"]["count"], 3);
    assert!(s["inference_stats"]["compute_infer"]["ns"].as_u64().unwrap() > 0);

    let metrics = conn.get("/metrics").await.unwrap();
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("outpost_inference_requests_total{model=\"cnn\",version=\"1\",outcome=\"success\"} 3\n"),
        "{text}"
    );
    assert!(text.contains("outpost_inference_requests_total{model=\"cnn\",version=\"1\",outcome=\"failure\"} 1\n"));
    assert!(text.contains("outpost_request_duration_seconds_count{model=\"cnn\",version=\"1\"} 4\n"));
    assert!(text.contains("outpost_compute_duration_seconds_count{model=\"cnn\",version=\"1\"} 3\n"));
    assert!(text.contains("outpost_queue_duration_seconds_bucket{model=\"cnn\",version=\"1\",le=\"+Inf\"} 3\n"));
    assert!(text.contains("outpost_model_ready{model=\"cnn\",version=\"1\"} 1\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn repository_index_unload_and_load() {
    let server = Server::start(
        "[[models]]\nname = \"edge\"\npath = \"models/digits-edge.onnx\"\n[[models]]\nname = \"cnn\"\npath = \"models/digits-cnn.onnx\"\n",
    )
    .await;
    let mut conn = server.conn().await;
    let index = conn.post_json("/v2/repository/index", &serde_json::json!({})).await.unwrap().json();
    assert_eq!(
        index,
        serde_json::json!([
            {"name": "edge", "version": "1", "state": "READY"},
            {"name": "cnn", "version": "1", "state": "READY"},
        ])
    );
    assert_eq!(conn.get("/v2/health/ready").await.unwrap().status, 200);

    let r = conn.post_json("/v2/repository/models/cnn/unload", &serde_json::json!({})).await.unwrap();
    assert_eq!(r.status, 200);
    let index = conn.post_json("/v2/repository/index", &serde_json::json!({"ready": true})).await.unwrap().json();
    assert_eq!(index.as_array().unwrap().len(), 1, "{index}");
    let ready = conn.get("/v2/health/ready").await.unwrap();
    assert_eq!(ready.status, 400, "not every configured model is ready");
    assert!(ready.error().contains("cnn (UNAVAILABLE)"), "{}", ready.error());
    let infer = conn.post_json("/v2/models/cnn/infer", &serde_json::json!({"inputs": []})).await.unwrap();
    assert_eq!(infer.status, 503);
    assert_eq!(conn.get("/v2/models/edge/ready").await.unwrap().status, 200, "the other model still serves");

    let r = conn.post_json("/v2/repository/models/cnn/load", &serde_json::json!({})).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.error());
    assert_eq!(conn.get("/v2/health/ready").await.unwrap().status, 200);
    let missing = conn.post_json("/v2/repository/models/nope/load", &serde_json::json!({})).await.unwrap();
    assert_eq!(missing.status, 404);
}
