//! The `outpost` binary as an operator runs it: graceful SIGTERM, refusing bad models and bad
//! configuration at start, and the local CLI.

use std::time::Duration;

use outpost_runtime::golden::{Golden, max_abs_diff};
use outpost_runtime::tensor::Tensor;
use outpost_tests::scratch;
use outpost_tests::{Daemon, models_dir, outpost};
use outpost_tools::http::Conn;
use outpost_tools::v2client;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    let dir = scratch("test-sigterm");
    let config = dir.join("outpost.toml");
    let model = models_dir().join("digits-central.onnx");
    // One worker on one thread: the requests queue behind each other.
    std::fs::write(
        &config,
        format!("[[models]]\nname = \"central\"\npath = {:?}\nworkers = 1\nintra_op_threads = 1\n", model),
    )
    .unwrap();
    let mut daemon = Daemon::serve(&["--config", config.to_str().unwrap()]);

    // Enough requests of 16,384 rows to queue well over a second of work on the worker, however
    // fast this machine runs one: timed first on a request of the same size.
    let rows = 16384;
    let body = v2client::binary_request(&[Tensor::from_f32("input", vec![rows, 64], &vec![2.0; rows * 64])]);
    let mut conn = Conn::connect(daemon.addr).await.unwrap();
    let started = std::time::Instant::now();
    let one = conn.send(hyper::Method::POST, "/v2/models/central/infer", &body.headers, body.bytes.clone()).await;
    let took = started.elapsed();
    assert_eq!(one.unwrap().status, 200, "a request before SIGTERM is answered");
    let requests = (Duration::from_millis(1500).as_secs_f64() / took.as_secs_f64()).ceil() as usize;
    // At most nine: each holds 8 MiB of the default 80 MiB in-flight budget (a tenth gets 503).
    let requests = requests.clamp(6, 9);
    let mut in_flight = Vec::new();
    for _ in 0..requests {
        let mut conn = Conn::connect(daemon.addr).await.unwrap();
        let (headers, bytes) = (body.headers.clone(), body.bytes.clone());
        in_flight.push(tokio::spawn(async move {
            conn.send(hyper::Method::POST, "/v2/models/central/infer", &headers, bytes).await
        }));
    }
    // Time for the bodies (4 MiB each) to reach the server on a busy machine: a connection
    // whose request has not been read yet is closed at SIGTERM, as it should be.
    tokio::time::sleep(Duration::from_millis(400)).await;
    daemon.terminate();
    let unfinished = in_flight.iter().filter(|t| !t.is_finished()).count();
    assert!(unfinished > 0, "{requests} requests of {took:?} each should still be in flight at SIGTERM");

    for r in in_flight {
        let r = r.await.unwrap().expect("an in-flight request is answered, not cut");
        assert_eq!(r.status, 200, "{}", r.error());
        assert_eq!(v2client::outputs(&r).unwrap()[0].shape, vec![rows, 10]);
    }
    let status = tokio::task::spawn_blocking(move || {
        let s = daemon.child.wait().unwrap();
        (s, daemon)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "outpost exits 0 after draining: {}", status.0);
    assert!(Conn::connect(status.1.addr).await.is_err(), "nothing listens after exit");
}

/// `server.http_threads` sets the threads that serve HTTP; unset, half the CPUs. `/metrics` shows
/// the runtime's own count, and one thread serves concurrent clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_threads_are_configured_and_shown() {
    let dir = scratch("test-http-threads");
    let model = models_dir().join("digits-edge.onnx");
    let cpus = std::thread::available_parallelism().unwrap().get();
    for (set, expected) in [(Some(3), 3), (Some(1), 1), (None, (cpus / 2).clamp(1, 256))] {
        let config = dir.join("outpost.toml");
        let server = set.map_or(String::new(), |n| format!("[server]\nhttp_threads = {n}\n"));
        std::fs::write(&config, format!("{server}[[models]]\nname = \"edge\"\npath = {model:?}\n")).unwrap();
        let daemon = Daemon::serve(&["--config", config.to_str().unwrap()]);
        let mut conn = Conn::connect(daemon.addr).await.unwrap();
        let metrics = String::from_utf8(conn.get("/metrics").await.unwrap().body.to_vec()).unwrap();
        let line = metrics.lines().find(|l| l.starts_with("outpost_http_threads ")).expect("the gauge is shown");
        assert_eq!(line, format!("outpost_http_threads {expected}"), "http_threads = {set:?}");

        let body = v2client::binary_request(&[Tensor::from_f32("input", vec![1, 64], &[1.0; 64])]);
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let (addr, headers, bytes) = (daemon.addr, body.headers.clone(), body.bytes.clone());
                tokio::spawn(async move {
                    let mut conn = Conn::connect(addr).await.unwrap();
                    for _ in 0..20 {
                        let r = conn.send(hyper::Method::POST, "/v2/models/edge/infer", &headers, bytes.clone()).await;
                        assert_eq!(r.unwrap().status, 200);
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
    }
}

#[test]
fn a_quantized_softmax_is_served_on_tract_and_inspect_says_what_it_was_tried_with() {
    // ONNX Runtime's static quantizer with its default op list quantizes the final Softmax;
    // tract gets that form wrong as written, so the backend rewrites it. `inspect` runs the
    // golden inputs shipped beside the model and compares.
    let out = outpost(&["inspect", "models/hazards/digits-edge-qsoftmax.onnx"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("runs on: tract"), "{stdout}");
    assert!(stdout.contains("shapes:  one plan serves every input shape"), "{stdout}");
    assert!(stdout.contains("tried:   `input` [16, 64] (golden inputs): outputs match"), "{stdout}");
    // Without a golden file beside it, it is served as well (no refusal by pattern any more).
    let dir = scratch("test-qsoftmax");
    let model = dir.join("qsoftmax.onnx");
    std::fs::copy(models_dir().join("hazards/digits-edge-qsoftmax.onnx"), &model).unwrap();
    let out = outpost(&["inspect", model.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("tried:   no golden file"), "{stdout}");
}

#[test]
fn a_model_that_disagrees_with_its_golden_outputs_is_refused() {
    let dir = scratch("test-golden");
    let model = dir.join("edge.onnx");
    std::fs::copy(models_dir().join("digits-edge.onnx"), &model).unwrap();
    let mut golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models_dir().join("digits-edge.golden.json")).unwrap()).unwrap();
    // What a wrong backend would give: every probability off by 0.01.
    for v in golden["outputs"][0]["data"].as_array_mut().unwrap() {
        *v = serde_json::json!(v.as_f64().unwrap() + 0.01);
    }
    std::fs::write(dir.join("edge.golden.json"), golden.to_string()).unwrap();
    let out = outpost(&["serve", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("outputs disagree with the golden outputs")
            && stderr.contains("`probabilities` differs by up to 1.000e-2"),
        "{stderr}"
    );
}

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let dir = scratch("test-config");
    let config = dir.join("outpost.toml");
    std::fs::write(&config, "[[models]]\nname = \"m\"\npath = \"m.onnx\"\nqueue_bound = 0\n").unwrap();
    let out = outpost(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("models[0].queue_bound: must be between 1 and 65536"));

    std::fs::write(&config, "[server]\nlisten = \"0.0.0.0:8000\"\n[[models]]\nname = \"m\"\npath = \"m.onnx\"\n")
        .unwrap();
    let out = outpost(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("server.auth_token: required when listening on 0.0.0.0:8000")
    );

    let out = outpost(&["serve", "--model-dir", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no *.onnx file"));

    std::fs::write(dir.join("broken.onnx"), b"this is not a model").unwrap();
    let out = outpost(&["serve", "--model-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.onnx: not an ONNX model"));
}

#[test]
fn inspect_lists_the_operators_and_infer_runs_one_request() {
    let out = outpost(&["inspect", "models/digits-cnn-qop.onnx"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("input    input FP32 [-1, 1, 8, 8]"), "{stdout}");
    assert!(stdout.contains("QLinearConv") && stdout.contains("runs on: tract"), "{stdout}");

    let golden = Golden::read(&models_dir().join("digits-cnn-dynamic.golden.json")).unwrap();
    let inputs: Vec<_> = golden.inputs.iter().map(|g| g.to_tensor().unwrap()).collect();
    let dir = scratch("test-infer");
    let request = dir.join("request.json");
    std::fs::write(&request, v2client::json_request(&inputs).bytes).unwrap();
    let out = outpost(&["infer", "models/digits-cnn-dynamic.onnx", "--input", request.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let o = &doc["outputs"][0];
    let got = Tensor::from_f32(
        "probabilities",
        o["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect(),
        &o["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect::<Vec<_>>(),
    );
    assert!(max_abs_diff(&golden.outputs[0].to_tensor().unwrap(), &got) <= 1e-4);
}
