//! With a tiny queue, excess concurrent requests get 503 at once and every accepted one succeeds.

use std::time::{Duration, Instant};

use hyper::Method;
use outpost_runtime::tensor::Tensor;
use outpost_tests::Server;
use outpost_tools::v2client;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_sheds_load_and_accepted_requests_succeed() {
    sheds_load("threads").await;
}

/// The same bound where a lone request's own task runs the call (`executor = "inline"`): one
/// call inline, one on the worker, one queued, the rest 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inline_calls_shed_load_past_the_same_bound() {
    sheds_load("inline").await;
}

async fn sheds_load(executor: &str) {
    // One worker, one queue slot, and requests big enough (2,048 rows through the central
    // model) that the worker is busy while the others arrive.
    let server = Server::start(&format!(
        "[[models]]\nname = \"central\"\npath = \"models/digits-central.onnx\"\nqueue_bound = 1\nworkers = 1\n\
         executor = \"{executor}\"\n"
    ))
    .await;
    let meta = server.conn().await.get("/v2/models/central").await.unwrap().json();
    assert_eq!(meta["parameters"]["executor"]["kind"], executor, "{meta}");
    let rows = 2048;
    let input = Tensor::from_f32("input", vec![rows, 64], &vec![3.0; rows * 64]);
    let body = v2client::binary_request(&[input]);
    let clients = 24;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut conn = server.conn().await;
        let (headers, bytes) = (body.headers.clone(), body.bytes.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = conn.send(Method::POST, "/v2/models/central/infer", &headers, bytes).await.unwrap();
            (r, t.elapsed())
        }));
    }
    let (mut ok, mut shed, mut slowest_shed) = (0, 0, Duration::ZERO);
    for t in tasks {
        let (r, took) = t.await.unwrap();
        match r.status {
            200 => {
                let out = v2client::outputs(&r).unwrap();
                assert_eq!(out[0].shape, vec![rows, 10], "an accepted request gets its whole answer");
                ok += 1;
            }
            503 => {
                assert!(r.error().contains("queue of 1 requests is full"), "{}", r.error());
                slowest_shed = slowest_shed.max(took);
                shed += 1;
            }
            other => panic!("unexpected status {other}: {}", r.error()),
        }
    }
    assert!(ok >= 1 && shed >= 1, "expected some accepted and some shed: {ok} ok, {shed} shed");
    assert_eq!(ok + shed, clients);
    let stats = server.app.registry.get("central").unwrap().stats()["1"].clone();
    assert_eq!(stats.rejected.load(std::sync::atomic::Ordering::Relaxed), shed as u64);
    println!("{ok} accepted, {shed} shed; slowest 503 took {slowest_shed:?}");
}

/// Large JSON bodies sent at once: memory is bounded in total, not only per request. Each
/// request reserves five times its body from `max_inflight_bytes` before reading it; those past
/// the budget get 503 at once, the others are answered, and every reservation is given back.
/// (Eight concurrent 14 MiB JSON bodies once took a daemon from 59 MiB to over 1 GiB of RSS.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_large_json_bodies_stay_within_the_inflight_budget() {
    let max_body = 2 << 20;
    let budget = 5 * max_body + max_body; // one largest request, and a little room
    let server = Server::start(&format!(
        "[server]\nmax_body_bytes = {max_body}\nmax_inflight_bytes = {budget}\n\
         [[models]]\nname = \"central\"\npath = \"models/digits-central.onnx\"\nqueue_bound = 64\n"
    ))
    .await;
    // 8,192 rows of 64 pixels as JSON numbers: about 1.4 MB of body each.
    let rows = 8192;
    let data: Vec<String> = (0..rows * 64).map(|i| format!("{}", i % 17)).collect();
    let body = format!(
        r#"{{"inputs":[{{"name":"input","shape":[{rows},64],"datatype":"FP32","data":[{}]}}]}}"#,
        data.join(",")
    );
    assert!(body.len() < max_body && 2 * 5 * body.len() > budget, "two requests must not fit at once");
    let clients = 8;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut conn = server.conn().await;
        let body = bytes::Bytes::from(body.clone());
        tasks.push(tokio::spawn(async move {
            let headers = [("content-type", "application/json".to_string())];
            conn.send(Method::POST, "/v2/models/central/infer", &headers, body).await.unwrap()
        }));
    }
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => {
                assert_eq!(v2client::outputs(&r).unwrap()[0].shape, vec![rows, 10]);
                ok += 1;
            }
            503 => {
                assert!(r.error().contains("server.max_inflight_bytes"), "{}", r.error());
                shed += 1;
            }
            other => panic!("unexpected status {other}: {}", r.error()),
        }
    }
    assert!(ok >= 1 && shed >= 1, "expected some answered and some shed: {ok} ok, {shed} shed");
    assert_eq!(server.app.inflight.used(), 0, "every reservation is given back");
    // Alone, the same request is always served.
    let mut conn = server.conn().await;
    let headers = [("content-type", "application/json".to_string())];
    let r = conn.send(Method::POST, "/v2/models/central/infer", &headers, bytes::Bytes::from(body)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.error());
    println!("{ok} answered, {shed} shed at once");
}
