//! The model suite: every sample model gives ONNX Runtime's golden outputs through `outpost`'s
//! HTTP API, over JSON and over binary tensors, within the golden file's tolerance (1e-4 max abs
//! difference), on each backend. The suite is the golden files: model, inputs, expected outputs
//! and tolerance, listed once beside each model.

use std::path::PathBuf;

use outpost_runtime::golden::Golden;
use outpost_tests::{
    Daemon, Server, check_golden_models, models_dir, ort_library, outpost_bin, repo_root, sample_models,
};
use outpost_tools::http::Conn;
use outpost_tools::v2client;

/// What each backend claims to run: every sample model, and the quantized Softmax that ONNX
/// Runtime's static quantizer writes by default (tract serves it rewritten).
fn suite() -> Vec<PathBuf> {
    let mut models = sample_models();
    assert!(models.len() >= 7, "expected the seven sample models, found {}", models.len());
    models.push("models/hazards/digits-edge-qsoftmax.onnx".into());
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
    let models = suite();
    let server = Server::models_on(backend, &models).await;
    check_golden_models(&mut server.conn().await, backend, &models).await;
}

/// ONNX Runtime's integer kernels differ by CPU: with AVX-512 VNNI its u8s8 products are exact,
/// on AVX2 alone they go through VPMADDUBSW, which saturates at int16 and moves the answer (the
/// sample models are quantized so that it cannot: models/README.md). Each model's load-time
/// check on the `ort` backend (`outpost inspect`: check, prepare, golden inputs) inside
/// `qemu-x86_64 -cpu Haswell`, an AVX2 CPU without VNNI whatever the host has, so a golden file
/// that holds only on some CPUs fails here on every machine (an x86_64 host runs the test build
/// of `outpost`; others skip it).
#[cfg(target_arch = "x86_64")]
#[test]
fn every_model_matches_onnx_runtime_on_ort_on_a_cpu_without_vnni() {
    for model in suite() {
        let out = std::process::Command::new("qemu-x86_64")
            .args(["-cpu", "Haswell"])
            .arg(outpost_bin())
            .args(["inspect", "--backend", "ort"])
            .arg(&model)
            .env("ORT_DYLIB_PATH", ort_library())
            .current_dir(repo_root())
            .output()
            .expect("run qemu-x86_64 (Debian's qemu-user)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}: {stdout}{}", model.display(), String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("(golden inputs): outputs match"), "{}: {stdout}", model.display());
    }
}

/// The static musl build of `outpost` (tract backend), as `cross/build-static.sh x86_64` makes
/// it: the same suite through the real binary.
#[tokio::test(flavor = "multi_thread")]
async fn every_model_matches_onnx_runtime_in_the_static_musl_binary() {
    static_suite("x86_64", &[]).await;
}

/// The static aarch64 build, as `cross/build-static.sh aarch64` makes it, run under Debian's
/// `qemu-aarch64` (user-mode emulation): the same suite over the HTTP API.
#[tokio::test(flavor = "multi_thread")]
async fn every_model_matches_onnx_runtime_in_the_aarch64_binary_under_qemu() {
    static_suite("aarch64", &["qemu-aarch64"]).await;
}

/// The static armv7 (32-bit ARM, hard float) build under Debian's `qemu-arm`.
#[tokio::test(flavor = "multi_thread")]
async fn every_model_matches_onnx_runtime_in_the_armv7_binary_under_qemu() {
    static_suite("armv7", &["qemu-arm"]).await;
}

async fn static_suite(arch: &str, runner: &[&str]) {
    let target = match arch {
        "armv7" => "armv7-unknown-linux-musleabihf".to_string(),
        _ => format!("{arch}-unknown-linux-musl"),
    };
    let bin = repo_root().join(format!("target/{target}/{}/outpost", static_profile()));
    assert!(
        bin.is_file(),
        "{} is missing: build it with cross/build-static.sh {arch} (tools/test.sh does)",
        bin.display()
    );
    let mut models = suite();
    models.extend(
        ["successors/digits-edge-head", "successors/digits-edge-requant", "successors/digits-edge-retrain"]
            .map(|m| PathBuf::from(format!("models/{m}.onnx"))),
    );
    let args: Vec<String> = models.iter().flat_map(|m| ["--model".to_string(), m.display().to_string()]).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::serve_with(&bin, runner, &args);
    let mut conn = Conn::connect(daemon.addr).await.unwrap();
    check_golden_models(&mut conn, "tract", &models).await;
}

/// The glibc build with ONNX Runtime (`cross/build-ort.sh x86_64`, what the `outpost-ort`
/// package ships): the suite on its `ort` backend, with the onnxruntime wheel's library.
#[tokio::test(flavor = "multi_thread")]
async fn every_model_matches_onnx_runtime_in_the_glibc_ort_binary() {
    ort_suite("x86_64", &[], ort_library()).await;
}

/// The aarch64 glibc build with ONNX Runtime under `qemu-aarch64`, on the aarch64 wheel's
/// library (`cross/fetch-onnxruntime.sh aarch64`) and Debian's cross glibc as the guest's root
/// ([`outpost_tests::qemu_aarch64_glibc`]): ONNX Runtime's ARM kernels against the same golden
/// files.
#[tokio::test(flavor = "multi_thread")]
async fn every_model_matches_onnx_runtime_in_the_aarch64_ort_binary_under_qemu() {
    let lib = repo_root().join("target/cross-tools/onnxruntime-aarch64/libonnxruntime.so");
    assert!(lib.is_file(), "no {}: run cross/fetch-onnxruntime.sh aarch64 (tools/test.sh does)", lib.display());
    let runner = outpost_tests::qemu_aarch64_glibc();
    ort_suite("aarch64", &runner.iter().map(String::as_str).collect::<Vec<_>>(), lib).await;
}

async fn ort_suite(arch: &str, runner: &[&str], library: PathBuf) {
    let bin = repo_root().join(format!("target/{arch}-unknown-linux-gnu/{}/outpost", static_profile()));
    assert!(
        bin.is_file(),
        "{} is missing: build it with cross/build-ort.sh {arch} (tools/test.sh does)",
        bin.display()
    );
    let models = suite();
    let mut args: Vec<String> = vec!["--backend".into(), "ort".into()];
    args.extend(models.iter().flat_map(|m| ["--model".to_string(), m.display().to_string()]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let library = library.display().to_string();
    let daemon = Daemon::serve_command(Daemon::command(&bin, runner, &[("ORT_DYLIB_PATH", &library)]), &args);
    let mut conn = Conn::connect(daemon.addr).await.unwrap();
    check_golden_models(&mut conn, "ort", &models).await;
}

/// The cargo profile the static builds under test were made with: `OUTPOST_STATIC_PROFILE` as
/// `cross/build-static.sh` reads it (tools/test.sh sets the quicker `static-test`), else the
/// shipped `small`.
fn static_profile() -> String {
    std::env::var("OUTPOST_STATIC_PROFILE").unwrap_or_else(|_| "small".into())
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
