//! With a tiny queue, excess concurrent requests get 503 at once and every accepted one succeeds.

use std::time::{Duration, Instant};

use hyper::Method;
use outpost_runtime::tensor::Tensor;
use outpost_tests::Server;
use outpost_tools::v2client;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_sheds_load_and_accepted_requests_succeed() {
    // One worker, one queue slot, and requests big enough (2,048 rows through the central
    // model) that the worker is busy while the others arrive.
    let server = Server::start(
        "[[models]]\nname = \"central\"\npath = \"models/digits-central.onnx\"\nqueue_bound = 1\nworkers = 1\n",
    )
    .await;
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
