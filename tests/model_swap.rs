//! Zero-downtime model swaps: versions come and go under load without a failed or wrong answer,
//! a broken new version never replaces the one serving, and several versions serve at once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::Method;
use outpost_runtime::golden::{Golden, max_abs_diff};
use outpost_runtime::tensor::Tensor;
use outpost_tests::{Daemon, Server, add_repository_version, models_dir};
use outpost_tools::v2client;

/// A fresh repository folder with one model folder, `digits`.
fn repository(test: &str) -> outpost_tests::Scratch {
    let repo = outpost_tests::scratch(&format!("repo-{test}"));
    std::fs::create_dir_all(repo.join("digits")).unwrap();
    repo
}

fn golden(sample: &str) -> (Vec<Tensor>, Tensor) {
    let g = Golden::read(&models_dir().join(format!("{sample}.golden.json"))).unwrap();
    (g.inputs.iter().map(|t| t.to_tensor().unwrap()).collect(), g.outputs[0].to_tensor().unwrap())
}

fn config(repo: &Path, extra: &str) -> String {
    format!("[[models]]\nname = \"digits\"\npath = {:?}\nworkers = 2\n{extra}", repo.join("digits"))
}

/// Odd versions are the edge model, even ones the central model: answers tell them apart.
fn sample_for(version: u32) -> &'static str {
    if version % 2 == 1 { "digits-edge" } else { "digits-central" }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_swap_under_load_without_a_failed_or_wrong_answer() {
    let repo = repository("swap");
    add_repository_version(&repo, 1, sample_for(1));
    let server = Server::start(&config(&repo, "")).await;
    let (inputs, edge_out) = golden("digits-edge");
    let (_, central_out) = golden("digits-central");
    assert!(max_abs_diff(&edge_out, &central_out) > 1e-2, "the two models must answer differently");
    let body = v2client::binary_request(&inputs);

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (mut conn, stop, body) = (server.conn().await, stop.clone(), (body.headers.clone(), body.bytes.clone()));
        let (edge_out, central_out) = (edge_out.clone(), central_out.clone());
        clients.push(tokio::spawn(async move {
            let mut seen: BTreeMap<u32, usize> = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                let r = conn.send(Method::POST, "/v2/models/digits/infer", &body.0, body.1.clone()).await.unwrap();
                assert_eq!(r.status, 200, "a request failed during a swap: {}", r.error());
                let header_len: usize = r.headers["inference-header-content-length"].to_str().unwrap().parse().unwrap();
                let doc: serde_json::Value = serde_json::from_slice(&r.body[..header_len]).unwrap();
                let version: u32 = doc["model_version"].as_str().unwrap().parse().unwrap();
                let want = if sample_for(version) == "digits-edge" { &edge_out } else { &central_out };
                let got = &v2client::outputs(&r).unwrap()[0];
                let diff = max_abs_diff(want, got);
                assert!(diff <= 1e-4, "version {version} answered like another model (diff {diff:e})");
                *seen.entry(version).or_default() += 1;
            }
            seen
        }));
    }

    let swaps = 12;
    let mut control = server.conn().await;
    for version in 2..=swaps + 1 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        add_repository_version(&repo, version, sample_for(version));
        let r = control.post_json("/v2/repository/models/digits/load", &serde_json::json!({})).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.error());
        let meta = control.get("/v2/models/digits").await.unwrap().json();
        assert_eq!(meta["versions"], serde_json::json!([version.to_string()]), "latest 1: only the new version");
    }
    tokio::time::sleep(Duration::from_millis(40)).await;
    stop.store(true, Ordering::Relaxed);

    let mut seen: BTreeMap<u32, usize> = BTreeMap::new();
    for c in clients {
        for (v, n) in c.await.unwrap() {
            *seen.entry(v).or_default() += n;
        }
    }
    let total: usize = seen.values().sum();
    println!("{swaps} swaps, {total} requests, all answered correctly; per version: {seen:?}");
    assert!(seen.len() >= 3, "clients should have seen several versions: {seen:?}");
    let _ = std::fs::remove_dir_all(&repo);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_new_version_leaves_the_old_one_serving() {
    let repo = repository("broken");
    add_repository_version(&repo, 1, "digits-edge");
    let server = Server::start(&config(&repo, "")).await;
    let mut conn = server.conn().await;
    let (inputs, edge_out) = golden("digits-edge");
    let body = v2client::json_request(&inputs);

    // Version 2: a corrupt file. Version 3: a model that fails its warm-up (golden check).
    std::fs::create_dir_all(repo.join("digits/2")).unwrap();
    std::fs::write(repo.join("digits/2/model.onnx"), b"\x08\x07garbage that is not a model").unwrap();
    let cases = [(2, "not an ONNX model"), (3, "outputs disagree with the golden outputs")];
    for (version, reason) in cases {
        if version == 3 {
            std::fs::remove_dir_all(repo.join("digits/2")).unwrap();
            add_repository_version(&repo, 3, "digits-edge");
            // The golden outputs of another model: this version's warm-up fails.
            std::fs::copy(models_dir().join("digits-central.golden.json"), repo.join("digits/3/model.golden.json"))
                .unwrap();
        }
        let r = conn.post_json("/v2/repository/models/digits/load", &serde_json::json!({})).await.unwrap();
        assert_eq!(r.status, 400);
        assert!(r.error().contains(reason), "{}", r.error());

        let index = conn.post_json("/v2/repository/index", &serde_json::json!({})).await.unwrap().json();
        let entries = index.as_array().unwrap();
        assert!(entries.iter().any(|e| e["version"] == "1" && e["state"] == "READY"), "{index}");
        let broken = entries
            .iter()
            .find(|e| e["version"].as_str() == Some(&*version.to_string()))
            .expect("the broken version is listed");
        assert_eq!(broken["state"], "UNAVAILABLE");
        assert!(broken["reason"].as_str().unwrap().contains(reason), "{index}");

        let r = conn.send(Method::POST, "/v2/models/digits/infer", &body.headers, body.bytes.clone()).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.error());
        assert_eq!(r.json()["model_version"], "1");
        assert!(max_abs_diff(&edge_out, &v2client::outputs(&r).unwrap()[0]) <= 1e-4);
        assert_eq!(conn.get("/v2/health/ready").await.unwrap().status, 200);
    }
    let metrics = String::from_utf8(conn.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    assert!(metrics.contains("outpost_model_load_failures{model=\"digits\"} 1"), "{metrics}");
    let _ = std::fs::remove_dir_all(&repo);
}

#[tokio::test(flavor = "multi_thread")]
async fn several_versions_serve_at_once_under_a_version_policy() {
    let repo = repository("policy");
    add_repository_version(&repo, 1, "digits-edge");
    add_repository_version(&repo, 2, "digits-central");
    add_repository_version(&repo, 3, "digits-edge-qop");
    let server = Server::start(&config(&repo, "[models.version_policy]\nspecific = [1, 2]\n")).await;
    let mut conn = server.conn().await;
    let meta = conn.get("/v2/models/digits").await.unwrap().json();
    assert_eq!(meta["versions"], serde_json::json!(["1", "2"]));
    let (inputs, _) = golden("digits-edge");
    let body = v2client::json_request(&inputs);
    for (path, version, sample) in [
        ("/v2/models/digits/versions/1/infer", "1", "digits-edge"),
        ("/v2/models/digits/versions/2/infer", "2", "digits-central"),
        ("/v2/models/digits/infer", "2", "digits-central"),
    ] {
        let r = conn.send(Method::POST, path, &body.headers, body.bytes.clone()).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.error());
        assert_eq!(r.json()["model_version"], version, "{path}");
        assert!(max_abs_diff(&golden(sample).1, &v2client::outputs(&r).unwrap()[0]) <= 1e-4, "{path}");
    }
    let r = conn.send(Method::POST, "/v2/models/digits/versions/3/infer", &body.headers, body.bytes).await.unwrap();
    assert_eq!(r.status, 404);
    assert!(r.error().contains("serving versions: 1, 2"), "{}", r.error());
    let _ = std::fs::remove_dir_all(&repo);
}

#[test]
fn sighup_picks_up_a_new_version() {
    let repo = repository("sighup");
    add_repository_version(&repo, 1, "digits-edge");
    let daemon = Daemon::serve(&["--model-repository", repo.to_str().unwrap()]);
    add_repository_version(&repo, 2, "digits-central");
    let ok = std::process::Command::new("kill").args(["-HUP", &daemon.child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let versions = rt.block_on(async {
        let mut conn = outpost_tools::http::Conn::connect(daemon.addr).await.unwrap();
        for _ in 0..500 {
            let meta = conn.get("/v2/models/digits").await.unwrap().json();
            if meta["versions"] == serde_json::json!(["2"]) {
                return meta["versions"].clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        conn.get("/v2/models/digits").await.unwrap().json()["versions"].clone()
    });
    assert_eq!(versions, serde_json::json!(["2"]), "version 2 replaced version 1 after SIGHUP");
    let _ = std::fs::remove_dir_all(&repo);
}
