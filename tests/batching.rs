//! Dynamic batching: concurrent requests stacked into one backend call get the answers they get
//! unbatched (to float rounding), and the batcher really batches.

use std::sync::atomic::Ordering::Relaxed;

use hyper::Method;
use outpost_runtime::golden::{Golden, max_abs_diff};
use outpost_runtime::tensor::Tensor;
use outpost_tests::{Server, models_dir};
use outpost_tools::v2client;

/// Row `i` of a batch-first tensor.
fn row(t: &Tensor, i: usize) -> Tensor {
    let n = t.data.len() / t.shape[0];
    let mut shape = t.shape.clone();
    shape[0] = 1;
    Tensor { name: t.name.clone(), datatype: t.datatype, shape, data: t.data[i * n..(i + 1) * n].to_vec() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_answers_equal_unbatched_ones() {
    for model in ["digits-cnn", "digits-edge", "digits-cnn-qop", "digits-central"] {
        let server = Server::start(&format!(
            "[[models]]\nname = \"plain\"\npath = \"models/{model}.onnx\"\n\
             [[models]]\nname = \"batched\"\npath = \"models/{model}.onnx\"\n\
             [models.batching]\nmax_batch_size = 16\nmax_queue_delay_us = 20000\nmode = \"always\"\n"
        ))
        .await;
        let golden = Golden::read(&models_dir().join(format!("{model}.golden.json"))).unwrap();
        let input = golden.inputs[0].to_tensor().unwrap();
        let expected = golden.outputs[0].to_tensor().unwrap();
        let rows = input.shape[0];

        let mut tasks = Vec::new();
        for i in 0..rows {
            let mut conn = server.conn().await;
            let body = v2client::binary_request(&[row(&input, i)]);
            tasks.push(tokio::spawn(async move {
                let batched = conn
                    .send(Method::POST, "/v2/models/batched/infer", &body.headers, body.bytes.clone())
                    .await
                    .unwrap();
                let plain = conn.send(Method::POST, "/v2/models/plain/infer", &body.headers, body.bytes).await.unwrap();
                (i, batched, plain)
            }));
        }
        for t in tasks {
            let (i, batched, plain) = t.await.unwrap();
            assert_eq!(batched.status, 200, "{model}: {}", batched.error());
            let b = &v2client::outputs(&batched).unwrap()[0];
            let p = &v2client::outputs(&plain).unwrap()[0];
            assert_eq!(b.shape, vec![1, 10]);
            // Equal up to float rounding: the backend's kernels may sum in another order for
            // another batch size (seen: 1-2 ulp).
            let diff = max_abs_diff(b, p);
            assert!(diff <= 1e-6, "{model} row {i}: batched and unbatched answers differ by {diff:e}");
            assert!(max_abs_diff(&row(&expected, i), b) <= 1e-4, "{model} row {i} against ONNX Runtime");
        }
        let stats = server.app.registry.get("batched").unwrap().stats()["1"].clone();
        let (requests, executions) = (stats.success.load(Relaxed), stats.executions.load(Relaxed));
        assert_eq!(requests, rows as u64);
        assert!(
            executions < requests,
            "{model}: {requests} requests took {executions} backend calls: nothing was batched"
        );
        println!("{model}: {requests} requests in {executions} backend calls");
    }
}

/// Configured batching is measured at load (`mode = "auto"`, the default): on tract the
/// MobileNet-style orientation classifier runs a batch of 8 rows on its plan for a symbolic
/// batch, several times slower than its one-row plan 8 times, so it is served unbatched and says
/// so with the figures; `mode = "always"` batches it regardless, and so does ONNX Runtime, whose
/// batches are not timed. The two on tract answer as the golden file says, and concurrent
/// requests are stacked only where batching is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batching_that_does_not_pay_is_found_at_load_and_the_model_served_unbatched() {
    let file = "models/real/orientation.onnx";
    let server = Server::start(&format!(
        "[[models]]\nname = \"auto\"\npath = \"{file}\"\nbackend = \"tract\"\n\
         [models.batching]\nmax_queue_delay_us = 50000\n\
         [[models]]\nname = \"always\"\npath = \"{file}\"\nbackend = \"tract\"\n\
         [models.batching]\nmax_queue_delay_us = 50000\nmode = \"always\"\n\
         [[models]]\nname = \"ort\"\npath = \"{file}\"\nbackend = \"ort\"\n\
         [models.batching]\nmax_queue_delay_us = 50000\n"
    ))
    .await;
    let mut conn = server.conn().await;
    let auto = conn.get("/v2/models/auto").await.unwrap().json()["parameters"].clone();
    let measured = &auto["batching"];
    assert_eq!((measured["batches"].as_bool(), measured["by"].as_str()), (Some(false), Some("measured")), "{auto}");
    assert_eq!(measured["rows"], outpost_runtime::batch_choice::PROBE_ROWS, "{auto}");
    let (batch_us, one_row_us) =
        (measured["batch_p50_us"].as_f64().unwrap(), measured["one_row_p50_us"].as_f64().unwrap());
    assert!(batch_us > 8.0 * one_row_us * outpost_runtime::batch_choice::BATCH_MAX_SHARE, "{auto}");
    assert_ne!(auto["executor"]["by"], "batching", "an unbatched version does not wait for a batch: {auto}");
    let always = conn.get("/v2/models/always").await.unwrap().json()["parameters"].clone();
    assert_eq!(always["batching"], serde_json::json!({ "batches": true, "by": "configured" }), "{always}");
    assert_eq!(always["executor"]["by"], "batching", "{always}");
    // ONNX Runtime's batches are not timed: batched as configured.
    let ort = conn.get("/v2/models/ort").await.unwrap().json()["parameters"].clone();
    assert_eq!(ort["batching"], serde_json::json!({ "batches": true, "by": "backend" }), "{ort}");
    let metrics = String::from_utf8(conn.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    for line in [
        "outpost_model_batching{model=\"auto\",version=\"1\",by=\"measured\"} 0",
        "outpost_model_batching{model=\"always\",version=\"1\",by=\"configured\"} 1",
        "outpost_model_batching{model=\"ort\",version=\"1\",by=\"backend\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }

    let golden = Golden::read(&models_dir().join("real/orientation.golden.json")).unwrap();
    let input = golden.inputs[0].to_tensor().unwrap();
    for name in ["auto", "always"] {
        outpost_tests::check_golden_as(&mut conn, name, std::path::Path::new(file)).await;
        let before = server.app.registry.get(name).unwrap().stats()["1"].clone();
        let (requests, executions) = (before.success.load(Relaxed), before.executions.load(Relaxed));
        let send = || {
            let (server, body) = (&server, v2client::binary_request(std::slice::from_ref(&input)));
            async move {
                let mut conn = server.conn().await;
                conn.send(Method::POST, &format!("/v2/models/{name}/infer"), &body.headers, body.bytes).await.unwrap()
            }
        };
        let (a, b, c, d) = tokio::join!(send(), send(), send(), send());
        for reply in [a, b, c, d] {
            assert_eq!(reply.status, 200, "{name}: {}", reply.error());
        }
        let stats = server.app.registry.get(name).unwrap().stats()["1"].clone();
        let (requests, executions) =
            (stats.success.load(Relaxed) - requests, stats.executions.load(Relaxed) - executions);
        assert_eq!(requests, 4);
        if name == "auto" {
            assert_eq!(executions, 4, "unbatched: a call per request");
        } else {
            assert!(executions < 4, "{name}: {requests} requests took {executions} calls: nothing was batched");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_whose_rows_depend_on_each_other_refuses_batching() {
    let toml = "[[models]]\nname = \"d\"\npath = \"models/digits-cnn-dynamic.onnx\"\n[models.batching]\n";
    let mut config: outpost_runtime::config::Config = toml::from_str(toml).unwrap();
    config.models[0].path = outpost_tests::repo_root().join(&config.models[0].path);
    let app = outpost_runtime::App::new(&config.validate().unwrap());
    let failures = app.registry.load_all();
    assert_eq!(failures.len(), 1);
    assert!(failures[0].to_string().contains("DynamicQuantizeLinear"), "{}", failures[0]);
}

/// Two inputs that must agree on the batch dimension. A request whose inputs disagree, stacked
/// with a good one, once made the backend panic, killed the model's only worker, and left the
/// model "ready" while every later request got 503 (queue full). It is refused with a 400 naming
/// the inputs; the good request beside it is answered, and so is every request after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inputs_that_disagree_on_the_batch_dimension_are_refused_and_the_model_keeps_serving() {
    let server = Server::start(
        "[[models]]\nname = \"add\"\npath = \"models/hazards/add-two-inputs.onnx\"\n\
         [models.batching]\nmax_batch_size = 8\nmax_queue_delay_us = 50000\nmode = \"always\"\n",
    )
    .await;
    let request = |a_rows: usize, b_rows: usize| {
        v2client::binary_request(&[
            Tensor::from_f32("a", vec![a_rows, 4], &vec![1.0; a_rows * 4]),
            Tensor::from_f32("b", vec![b_rows, 4], &vec![2.0; b_rows * 4]),
        ])
    };
    let send = |body: v2client::Body| {
        let server = &server;
        async move {
            let mut conn = server.conn().await;
            conn.send(Method::POST, "/v2/models/add/infer", &body.headers, body.bytes).await.unwrap()
        }
    };
    // Sent together, so that the batcher would stack them (its delay is 50 ms).
    let (bad, good) = tokio::join!(send(request(1, 2)), send(request(1, 1)));
    assert_eq!(bad.status, 400, "{}", bad.error());
    assert!(bad.error().contains("`a` has 1 rows, `b` has 2"), "{}", bad.error());
    assert_eq!(good.status, 200, "{}", good.error());
    assert_eq!(v2client::outputs(&good).unwrap()[0].to_f64(), vec![3.0; 4]);
    for _ in 0..3 {
        let r = send(request(2, 2)).await;
        assert_eq!(r.status, 200, "the model keeps serving: {}", r.error());
        assert_eq!(v2client::outputs(&r).unwrap()[0].to_f64(), vec![3.0; 8]);
    }
    let mut conn = server.conn().await;
    assert_eq!(conn.get("/v2/health/ready").await.unwrap().status, 200);
    let metrics = String::from_utf8(conn.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    assert!(metrics.contains("outpost_backend_panics_total{model=\"add\",version=\"1\"} 0"), "{metrics}");
    assert!(metrics.contains("outpost_model_workers{model=\"add\",version=\"1\"} 1"), "{metrics}");
}
