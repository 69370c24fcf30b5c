//! Choosing and loading backends: what each refuses at load time, ONNX Runtime's library and its
//! execution-provider fallback.

use outpost_runtime::backend::{self, SessionOptions};
use outpost_tests::{Server, models_dir, ort_library, outpost, repo_root};

fn load_error(backend_name: &str, model: &str) -> String {
    if backend_name == "ort" {
        backend::ort::set_library(&ort_library());
    }
    let b = backend::by_name(backend_name).unwrap();
    match backend::load(b.as_ref(), &models_dir().join(model), &SessionOptions::default()) {
        Ok(_) => panic!("{backend_name} loaded {model}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_unknown_operator_is_refused_at_load_naming_it_on_both_backends() {
    for b in ["tract", "ort"] {
        let e = load_error(b, "hazards/unknown-op.onnx");
        assert!(e.contains("Frobnicate"), "{b}: {e}");
    }
}

#[test]
fn a_file_that_is_not_a_model_is_refused_on_both_backends() {
    for b in ["tract", "ort"] {
        let e = load_error(b, "digits-test.csv");
        assert!(e.contains("not an ONNX model"), "{b}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn execution_providers_fall_back_in_order_and_say_which_runs() {
    let server = Server::start(
        "[[models]]\nname = \"cnn\"\npath = \"models/digits-cnn.onnx\"\nbackend = \"ort\"\n\
         execution_providers = [\"tensorrt\", \"cuda\", \"cpu\"]\n\
         [models.provider_options.cuda]\ndevice_id = 0\n",
    )
    .await;
    let meta = server.conn().await.get("/v2/models/cnn").await.unwrap().json();
    let params = &meta["parameters"];
    assert_eq!(params["backend"], "ort");
    if params["execution_provider"] == "cpu" {
        // The CPU-only wheel: both GPU providers are skipped, each with its reason.
        let skipped = params["execution_providers_skipped"].as_array().unwrap();
        assert_eq!(skipped.len(), 2, "{params}");
        assert!(skipped[0].as_str().unwrap().starts_with("tensorrt: "), "{params}");
        assert!(skipped[1].as_str().unwrap().starts_with("cuda: "), "{params}");
    } else {
        println!("running on {}", params["execution_provider"]);
    }
}

/// Where each version's calls run is decided at load and shown: a batching model on worker
/// threads; a model with no batching on its measured call (inline at most
/// `executor::INLINE_MAX_US`); a configured executor as configured. Every one answers.
#[tokio::test(flavor = "multi_thread")]
async fn each_version_says_where_its_calls_run_and_answers_from_there() {
    let server = Server::start(
        "[[models]]\nname = \"auto\"\npath = \"models/digits-edge.onnx\"\n\
         [[models]]\nname = \"batched\"\npath = \"models/digits-edge.onnx\"\n[models.batching]\nmax_batch_size = 8\nmode = \"always\"\n\
         [[models]]\nname = \"threads\"\npath = \"models/digits-edge.onnx\"\nexecutor = \"threads\"\n\
         [[models]]\nname = \"inline\"\npath = \"models/digits-cnn.onnx\"\nexecutor = \"inline\"\n",
    )
    .await;
    let mut conn = server.conn().await;
    let executor = |meta: &serde_json::Value| meta["parameters"]["executor"].clone();
    let auto = executor(&conn.get("/v2/models/auto").await.unwrap().json());
    assert_eq!(auto["by"], "measured", "{auto}");
    let inline = auto["call_us"].as_f64().unwrap() <= outpost_runtime::executor::INLINE_MAX_US;
    assert_eq!(auto["kind"], if inline { "inline" } else { "threads" }, "{auto}");
    let batched = executor(&conn.get("/v2/models/batched").await.unwrap().json());
    assert_eq!((batched["kind"].as_str(), batched["by"].as_str()), (Some("threads"), Some("batching")));
    for (name, kind) in [("threads", "threads"), ("inline", "inline")] {
        let e = executor(&conn.get(&format!("/v2/models/{name}")).await.unwrap().json());
        assert_eq!((e["kind"].as_str(), e["by"].as_str()), (Some(kind), Some("configured")), "{e}");
    }
    for (name, file) in
        [("auto", "digits-edge"), ("batched", "digits-edge"), ("threads", "digits-edge"), ("inline", "digits-cnn")]
    {
        let file = std::path::PathBuf::from(format!("models/{file}.onnx"));
        outpost_tests::check_golden_as(&mut conn, name, &file).await;
    }
}

/// The intra-op threads, on both backends: the call measured at load on one thread where the
/// configuration names no count (and on the pool where it is long), and the rule's pick serves
/// (shown in metadata); a configured count as configured. Each answers.
#[tokio::test(flavor = "multi_thread")]
async fn the_intra_op_thread_count_is_measured_unless_configured_and_shown() {
    let server = Server::start(
        "[[models]]\nname = \"measured\"\npath = \"models/digits-cnn.onnx\"\nbackend = \"ort\"\n\
         [[models]]\nname = \"configured\"\npath = \"models/digits-cnn.onnx\"\nbackend = \"ort\"\nintra_op_threads = 3\n\
         [[models]]\nname = \"tract\"\npath = \"models/digits-cnn.onnx\"\nbackend = \"tract\"\n\
         [[models]]\nname = \"tract-configured\"\npath = \"models/digits-cnn.onnx\"\nbackend = \"tract\"\nintra_op_threads = 2\n",
    )
    .await;
    let mut conn = server.conn().await;
    let pool = outpost_runtime::threads::available();
    for name in ["measured", "tract"] {
        let measured = intra_op_threads(&mut conn, name).await;
        if pool == 1 {
            assert_eq!(
                (measured["threads"].as_u64(), measured["by"].as_str()),
                (Some(1), Some("one cpu")),
                "{measured}"
            );
            continue;
        }
        assert_eq!(measured["by"], "measured", "{measured}");
        let one_us = measured["one_thread_p50_us"].as_f64().unwrap();
        assert!(one_us > 0.0, "{measured}");
        // The pool is timed on tract only, and only for a call long enough to try it.
        let pool_us = measured.get("pool_p50_us").and_then(|p| p.as_f64());
        let timed = name == "tract" && one_us >= outpost_runtime::threads::POOL_MIN_CALL_US;
        assert_eq!(pool_us.is_some(), timed, "{measured}");
        let expected = outpost_runtime::threads::ThreadChoice::measured(pool, one_us, pool_us).threads;
        assert_eq!(measured["threads"].as_u64(), Some(expected as u64), "{measured}");
    }
    for (name, threads) in [("configured", 3), ("tract-configured", 2)] {
        let configured = intra_op_threads(&mut conn, name).await;
        assert_eq!((configured["threads"].as_u64(), configured["by"].as_str()), (Some(threads), Some("configured")));
        assert!(configured.get("one_thread_p50_us").is_none(), "{configured}");
    }
    for name in ["measured", "configured", "tract", "tract-configured"] {
        outpost_tests::check_golden_as(&mut conn, name, std::path::Path::new("models/digits-cnn.onnx")).await;
    }
}

async fn intra_op_threads(conn: &mut outpost_tools::http::Conn, model: &str) -> serde_json::Value {
    conn.get(&format!("/v2/models/{model}")).await.unwrap().json()["parameters"]["intra_op_threads"].clone()
}

#[test]
fn a_missing_or_wrong_onnx_runtime_library_is_a_clear_error_at_start() {
    let run = |lib: &str| {
        std::process::Command::new(outpost_tests::outpost_bin())
            .args(["serve", "--backend", "ort", "--model", "models/digits-edge.onnx", "--listen", "127.0.0.1:0"])
            .env("ORT_DYLIB_PATH", lib)
            .current_dir(repo_root())
            .output()
            .unwrap()
    };
    let out = run("/nonexistent/libonnxruntime.so");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ONNX Runtime library /nonexistent/libonnxruntime.so does not exist"), "{stderr}");

    let not_a_library = models_dir().join("digits-edge.onnx");
    let out = run(not_a_library.to_str().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot load ONNX Runtime from"), "{stderr}");
}

#[test]
fn asking_for_an_unknown_backend_names_the_known_ones() {
    let out = outpost(&["serve", "--backend", "onnx", "--model", "models/digits-edge.onnx"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("models[0].backend: `onnx` is not a backend (tract, ort, auto)")
    );
}
