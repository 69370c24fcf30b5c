//! Shadow evaluation: a candidate model beside the one serving runs on a share of the live
//! requests, off their path, and the server reports how often its top class agrees with the
//! active model's, the mean difference of their scores and the candidate's latency. A candidate
//! that does not take the model's inputs is refused at load.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outpost_runtime::app::App;
use outpost_runtime::config::Config;
use outpost_tests::{Server, repo_root};
use outpost_tools::http::Conn;
use serde_json::{Value, json};

fn digits() -> Vec<Vec<f32>> {
    let text = std::fs::read_to_string(repo_root().join("models/digits-test.csv")).unwrap();
    text.lines().skip(1).map(|l| l.split(',').skip(1).map(|v| v.parse().unwrap()).collect()).collect()
}

async fn probabilities(conn: &mut Conn, model: &str, row: &[f32]) -> Vec<f64> {
    let body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]});
    let r = conn.post_json(&format!("/v2/models/{model}/infer"), &body).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let out = r.json()["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "probabilities").cloned().unwrap();
    out["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

fn top(p: &[f64]) -> usize {
    (0..p.len()).fold(0, |best, i| if p[i] > p[best] { i } else { best })
}

async fn shadow_stats(conn: &mut Conn) -> Value {
    conn.get("/v2/models/digits/stats").await.unwrap().json()["model_stats"][0]["shadow"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_candidate_runs_beside_the_model_and_reports_the_agreement_it_has() {
    // The active model is the quantized edge MLP; the candidate the float central MLP, which
    // answers some of the held-out digits differently. Every request is sampled.
    let edge = repo_root().join("models/digits-edge.onnx");
    let central = repo_root().join("models/digits-central.onnx");
    let server = Server::start(&format!(
        "[[models]]\nname = \"digits\"\npath = {edge:?}\n\
         [models.shadow]\npath = {central:?}\nversion = \"v2-rc\"\nshare = 1.0\nmax_per_second = 1000000\nmax_in_flight = 64\n\
         [[models]]\nname = \"central\"\npath = {central:?}\n"
    ))
    .await;
    let mut conn = server.conn().await;
    let rows = digits();
    let (mut agreed, mut diff) = (0, 0.0);
    for row in &rows {
        let ours = probabilities(&mut conn, "digits", row).await;
        let theirs = probabilities(&mut conn, "central", row).await;
        agreed += usize::from(top(&ours) == top(&theirs));
        diff += ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).sum::<f64>() / ours.len() as f64;
    }
    // The candidate's runs finish after their answers went back: wait for the last.
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let r = shadow_stats(&mut conn).await;
        if r["compared"].as_u64().unwrap() + r["failed"].as_u64().unwrap() == r["started"].as_u64().unwrap()
            && r["started"].as_u64().unwrap() + r["skipped"].as_u64().unwrap() == rows.len() as u64
        {
            break r;
        }
        assert!(Instant::now() < deadline, "the candidate's runs did not finish: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("shadow report: {report}");
    println!("expected: {agreed} of {} rows agree, mean abs diff {}", rows.len(), diff / rows.len() as f64);
    assert_eq!(report["candidate"], "v2-rc");
    assert_eq!(
        (report["seen"].as_u64(), report["skipped"].as_u64(), report["failed"].as_u64()),
        (Some(rows.len() as u64), Some(0), Some(0)),
        "{report}"
    );
    assert_eq!(report["rows"].as_u64(), Some(rows.len() as u64), "{report}");
    assert_eq!(report["agreed_rows"].as_u64(), Some(agreed as u64), "{report}");
    assert!(agreed < rows.len() && agreed > rows.len() * 9 / 10, "the two models differ on a few digits: {agreed}");
    let mean = report["mean_abs_diff"].as_f64().unwrap();
    assert!((mean - diff / rows.len() as f64).abs() < 1e-5, "{report}");
    assert!(report["p50_ms"].as_f64().unwrap() > 0.0, "{report}");

    let metrics = String::from_utf8(conn.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    let l = "model=\"digits\",candidate=\"v2-rc\"";
    assert!(metrics.contains(&format!("outpost_shadow_agreed_rows_total{{{l}}} {agreed}\n")), "{metrics}");
    assert!(
        metrics.contains(&format!("outpost_shadow_requests_total{{{l},outcome=\"compared\"}} {}\n", rows.len())),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("outpost_shadow_duration_seconds_count{{{l}}} {}\n", rows.len())), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_share_and_a_rate_bound_the_candidates_runs() {
    let edge = repo_root().join("models/digits-edge.onnx");
    // A quarter of the requests, at most 2 runs a second: 100 requests sent quickly start 1-3.
    let server = Server::start(&format!(
        "[[models]]\nname = \"digits\"\npath = {edge:?}\n[models.shadow]\npath = {edge:?}\nshare = 0.25\nmax_per_second = 2\n"
    ))
    .await;
    let mut conn = server.conn().await;
    let rows = digits();
    let started = Instant::now();
    for row in &rows[..100] {
        probabilities(&mut conn, "digits", row).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = shadow_stats(&mut conn).await;
    let (run, skipped) = (r["started"].as_u64().unwrap(), r["skipped"].as_u64().unwrap());
    assert_eq!(run + skipped, 25, "a quarter of 100 sampled: {r}");
    assert!(run >= 1 && run as f64 <= 1.0 + elapsed * 2.0, "at most 2 a second over {elapsed:.2} s: {r}");
    // The same model as its own candidate agrees on every row it compared.
    assert_eq!(r["agreed_rows"], r["rows"], "{r}");
    assert_eq!(r["mean_abs_diff"].as_f64(), Some(0.0), "{r}");
}

#[test]
fn a_candidate_that_does_not_take_the_models_inputs_is_refused_at_load() {
    let edge = repo_root().join("models/digits-edge.onnx");
    let cnn: PathBuf = repo_root().join("models/digits-cnn.onnx");
    let config: Config =
        toml::from_str(&format!("[[models]]\nname = \"digits\"\npath = {edge:?}\n[models.shadow]\npath = {cnn:?}\n"))
            .unwrap();
    let app = App::new(&config.validate().unwrap());
    let failures = app.registry.load_all();
    assert_eq!(failures.len(), 1, "{failures:?}");
    let e = failures[0].to_string();
    assert!(
        e.contains("shadow candidate")
            && e.contains("its input `input` is FP32 [-1, 1, 8, 8], the model's FP32 [-1, 64]"),
        "{e}"
    );
    // The model itself serves.
    assert!(app.registry.get("digits").unwrap().is_ready());
    assert!(app.registry.shadow("digits").is_none());
}
