//! Soak: the daemon under 64 concurrent clients of mixed traffic for `OUTPOST_SOAK_SECS`
//! (default 40; `tools/soak.sh` runs 600 on a release build): good requests on three models,
//! bad bodies, oversized bodies, a hot swap of a repository model every 3 s, and a signed
//! release applied half-way. Every good request must be answered 200 with the model's answer,
//! every bad one 400 and every oversized one 413. The daemon's RSS is sampled each second and
//! printed with the counts (a figure to read, not a timed assertion: the machines are shared).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use hyper::Method;
use outpost_runtime::golden::{Golden, max_abs_diff};
use outpost_tests::releases::{Fleet, sample_release, store_config};
use outpost_tests::{Daemon, add_repository_version, free_port, models_dir, outpost_with_config};
use outpost_tools::http::Conn;
use outpost_tools::v2client;

const CLIENTS: usize = 64;
const MAX_BODY: usize = 65_536;

#[derive(Default)]
struct Counts {
    good: AtomicU64,
    bad: AtomicU64,
    oversized: AtomicU64,
    /// Answers that were not what the request should get, with the first few described.
    wrong: AtomicU64,
}

/// A request and what it must get.
struct Case {
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    /// The golden output for a good request to a model that does not change.
    golden: Option<outpost_runtime::tensor::Tensor>,
    /// The shape of a good request's first output.
    shape: Vec<usize>,
}

fn golden(sample: &str) -> Golden {
    Golden::read(&models_dir().join(format!("{sample}.golden.json"))).unwrap()
}

fn good(path: &'static str, sample: &str, fixed: bool) -> Case {
    let g = golden(sample);
    let inputs: Vec<_> = g.inputs.iter().map(|t| t.to_tensor().unwrap()).collect();
    let body = v2client::json_request(&inputs);
    let output = g.outputs[0].to_tensor().unwrap();
    Case {
        path,
        headers: body.headers,
        body: body.bytes.to_vec(),
        status: 200,
        shape: output.shape.clone(),
        golden: fixed.then_some(output),
    }
}

fn cases() -> Vec<Case> {
    let json = || vec![("content-type", "application/json".to_owned())];
    let bad = |body: &str| Case {
        path: "/v2/models/digits-cnn/infer",
        headers: json(),
        body: body.as_bytes().to_vec(),
        status: 400,
        golden: None,
        shape: Vec::new(),
    };
    vec![
        good("/v2/models/digits-cnn/infer", "digits-cnn", true),
        good("/v2/models/digits-edge-qop/infer", "digits-edge-qop", true),
        // Swapped every few seconds between two samples: the answer's shape is checked.
        good("/v2/models/digits/infer", "digits-edge", false),
        // Served from the signed releases; the second changes the model.
        good("/v2/models/released/infer", "digits-edge", false),
        good("/v2/models/digits-cnn/infer", "digits-cnn", true),
        bad("{\"inputs\": ["),
        bad(r#"{"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}"#),
        bad(r#"{"inputs": [{"name": "nope", "shape": [1, 64], "datatype": "FP32", "data": []}]}"#),
        Case {
            path: "/v2/models/digits-edge-qop/infer",
            headers: json(),
            body: vec![b' '; MAX_BODY + 1024],
            status: 413,
            golden: None,
            shape: Vec::new(),
        },
    ]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn outpost(args: &[&str], config: &Path) {
    let (code, json, err) = outpost_with_config(args, config);
    assert_eq!(code, 0, "outpost {args:?}: {json}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_holds_up_under_mixed_traffic_swaps_and_an_update() {
    let secs: u64 = std::env::var("OUTPOST_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let dir = outpost_tests::scratch("soak");
    std::fs::create_dir_all(dir.join("repo")).unwrap();
    let repo = dir.join("repo");
    add_repository_version(&repo, 1, "digits-edge");

    // The store: provisioned, release 1 applied before the daemon starts.
    let fleet = Fleet::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let state = dir.join("state");
    let config = store_config(&state, &addr);
    let models = models_dir();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replacen(
        "[server]\n",
        &format!(
            "[server]\nmax_body_bytes = {MAX_BODY}\nmax_inflight_bytes = {}\nmodel_repository = {repo:?}\n",
            16 << 20
        ),
        1,
    );
    for m in ["digits-cnn", "digits-edge-qop"] {
        text.push_str(&format!("[[models]]\nname = \"{m}\"\npath = {:?}\n", models.join(format!("{m}.onnx"))));
    }
    std::fs::write(&config, text).unwrap();
    std::fs::write(dir.join("root-1.json"), fleet.root1.to_bytes()).unwrap();
    outpost(&["update", "provision", dir.join("root-1.json").to_str().unwrap()], &config);
    let r1 = sample_release(&dir, &fleet, 1, "released", "digits-edge");
    outpost(&["update", "apply", r1.to_str().unwrap()], &config);
    let r2 = sample_release(&dir, &fleet, 2, "released", "digits-edge-qop");

    let daemon = Daemon::serve_at(addr.parse().unwrap(), &["--config", config.to_str().unwrap()]);
    // Ready means the active release serves too (its models load after the configured ones).
    let (status, body) = outpost_tests::http(daemon.addr, "GET", "/v2/models/released/ready", &[], b"");
    assert_eq!(status, 200, "ready before the release's models: {body}");
    let pid = daemon.child.id();
    let cases = Arc::new(cases());
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let first_wrong = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let started = Instant::now();

    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (cases, counts, stop, first_wrong) = (cases.clone(), counts.clone(), stop.clone(), first_wrong.clone());
        let addr = daemon.addr;
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await.unwrap();
            let mut i = client;
            while !stop.load(Relaxed) {
                let case = &cases[i % cases.len()];
                i += CLIENTS + 1;
                let r = match conn.send(Method::POST, case.path, &case.headers, case.body.clone()).await {
                    Ok(r) => r,
                    // The server closes a connection after a 413; a new one carries on.
                    Err(_) if case.status == 413 => {
                        counts.oversized.fetch_add(1, Relaxed);
                        conn = Conn::connect(addr).await.unwrap();
                        continue;
                    }
                    Err(e) => panic!("{}: {e}", case.path),
                };
                let right = r.status == case.status
                    && (case.status != 200
                        || v2client::outputs(&r).is_ok_and(|o| {
                            o[0].shape == case.shape
                                && case.golden.as_ref().is_none_or(|g| max_abs_diff(g, &o[0]) <= 1e-4)
                        }));
                let counter = match case.status {
                    200 => &counts.good,
                    400 => &counts.bad,
                    _ => &counts.oversized,
                };
                counter.fetch_add(1, Relaxed);
                if !right {
                    counts.wrong.fetch_add(1, Relaxed);
                    let mut w = first_wrong.lock().unwrap();
                    if w.len() < 5 {
                        let shape = v2client::outputs(&r).map(|o| o[0].shape.clone());
                        w.push(format!("{} -> {} {shape:?}: {}", case.path, r.status, r.error()));
                    }
                }
                // The server stops reading a connection whose body it refused: start a new one.
                if case.status == 413 || r.headers.get("connection").is_some_and(|v| v == "close") {
                    conn = Conn::connect(addr).await.unwrap();
                }
            }
        }));
    }

    // Swaps, the update and RSS samples, from here.
    let mut control = Conn::connect(daemon.addr).await.unwrap();
    let mut rss = Vec::new();
    let (mut version, mut swaps, mut updated) = (1, 0, false);
    let mut last_swap = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push((started.elapsed().as_secs(), rss_kib(pid)));
        if last_swap.elapsed() >= Duration::from_secs(3) {
            version += 1;
            add_repository_version(&repo, version, if version % 2 == 0 { "digits-edge-qop" } else { "digits-edge" });
            let r = control.send(Method::POST, "/v2/repository/models/digits/load", &[], Vec::new()).await.unwrap();
            assert_eq!(r.status, 200, "swap to version {version}: {}", r.error());
            swaps += 1;
            last_swap = Instant::now();
        }
        if !updated && started.elapsed() >= Duration::from_secs(secs / 2) {
            let config = config.clone();
            let r2 = r2.clone();
            tokio::task::spawn_blocking(move || outpost(&["update", "apply", r2.to_str().unwrap()], &config))
                .await
                .unwrap();
            updated = true;
        }
    }
    stop.store(true, Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let r = control.get("/v2/models/released").await.unwrap();
    assert_eq!(r.json()["parameters"]["version"], "2", "release 2 serves after the update");

    let elapsed = started.elapsed().as_secs_f64();
    let (good, bad, oversized, wrong) = (
        counts.good.load(Relaxed),
        counts.bad.load(Relaxed),
        counts.oversized.load(Relaxed),
        counts.wrong.load(Relaxed),
    );
    println!(
        "soak: {elapsed:.0} s, {CLIENTS} clients: {good} good, {bad} bad, {oversized} oversized requests \
         ({:.0} req/s), {wrong} wrong answers; {swaps} swaps, 1 update",
        (good + bad + oversized) as f64 / elapsed
    );
    let warm = rss.len() / 4;
    let third = |part: &[(u64, u64)]| part.iter().map(|(_, k)| k).sum::<u64>() / part.len().max(1) as u64;
    let after_warmup = &rss[warm..];
    let n = after_warmup.len() / 3;
    println!(
        "soak: RSS KiB every second: {:?}\nsoak: RSS after warm-up, first third {} KiB, last third {} KiB",
        rss.iter().map(|(_, k)| k).collect::<Vec<_>>(),
        third(&after_warmup[..n]),
        third(&after_warmup[after_warmup.len() - n..])
    );
    assert_eq!(wrong, 0, "answers that were not what they should be: {:?}", first_wrong.lock().unwrap());
    assert!(good > 0 && bad > 0 && oversized > 0 && swaps > 0);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
