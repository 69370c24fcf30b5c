//! Rollouts gated on shadow agreement, end to end on real processes: Mosquitto (the
//! repository's config and ACL), the console with its SQLite database and blob server, and
//! three real `outpost` daemons as devices, under live traffic from this test.
//!
//! A candidate that agrees with what the devices serve is compared, promoted on each device as
//! its gate passes, wave by wave. A candidate that disagrees on a known share of the traffic is
//! reported with that agreement (within sampling tolerance), the rollout pauses at the gate
//! naming the device, and the device drops the candidate and keeps serving. The console's page
//! (headless Chromium) shows the gate and the reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outpost_tests::console::Console;
use outpost_tests::mqtt::{Broker, Device, FLEET, ctl, publisher, wait_for};
use outpost_tests::{Server, repo_root};
use serde_json::{Value, json};

const DEVICES: [&str; 3] = ["dev1", "dev2", "dev3"];

fn digits() -> Vec<Vec<f32>> {
    let text = std::fs::read_to_string(repo_root().join("models/digits-test.csv")).unwrap();
    text.lines().skip(1).map(|l| l.split(',').skip(1).map(|v| v.parse().unwrap()).collect()).collect()
}

fn body(row: &[f32]) -> String {
    json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]}).to_string()
}

/// Each held-out row's top class under each of `models` (paths under models/), served in-process.
fn top_classes(models: &[&str]) -> Vec<Vec<usize>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let paths: Vec<PathBuf> = models.iter().map(|m| PathBuf::from(format!("models/{m}.onnx"))).collect();
        let server = Server::models_on("tract", &paths).await;
        let mut conn = server.conn().await;
        let mut out = Vec::new();
        for row in digits() {
            let mut tops = Vec::new();
            for p in &paths {
                let name = p.file_stem().unwrap().to_string_lossy();
                let body: Value = serde_json::from_str(&body(&row)).unwrap();
                let r = conn.post_json(&format!("/v2/models/{name}/infer"), &body).await.unwrap().json();
                let o = r["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "probabilities").unwrap().clone();
                let p: Vec<f64> = o["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                tops.push((0..p.len()).fold(0, |b, i| if p[i] > p[b] { i } else { b }));
            }
            out.push(tops);
        }
        out
    })
}

/// Sends each device its rows, round after round, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Traffic {
    /// The same rows to every device.
    fn start(addrs: Vec<std::net::SocketAddr>, rows: Vec<Vec<f32>>) -> Traffic {
        Traffic::each(addrs.into_iter().map(|a| (a, rows.clone())).collect())
    }

    fn each(devices: Vec<(std::net::SocketAddr, Vec<Vec<f32>>)>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut sent = 0;
            'all: for i in 0.. {
                for (addr, rows) in &devices {
                    if flag.load(Ordering::Relaxed) {
                        break 'all;
                    }
                    let (status, text) = outpost_tests::http(
                        *addr,
                        "POST",
                        "/v2/models/digits/infer",
                        &[],
                        body(&rows[i % rows.len()]).as_bytes(),
                    );
                    assert_eq!(status, 200, "{text}");
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            sent
        });
        Traffic { stop, thread: Some(thread) }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// A signed release `r{number}` of `sample` as model `digits` in the publisher's folder
/// (`extra`: more lines of its model entry).
fn release(pubdir: &Path, number: u64, sample: &str, extra: &str) {
    let models = repo_root().join("models");
    std::fs::write(
        pubdir.join(format!("r{number}.toml")),
        format!(
            "fleet = \"{FLEET}\"\nnumber = {number}\n[[models]]\nname = \"digits\"\nversion = \"{number}\"\npath = {:?}\ngolden = {:?}\n{extra}",
            models.join(format!("{sample}.onnx")),
            models.join(format!("{sample}.golden.json"))
        ),
    )
    .unwrap();
    ctl(pubdir, &["release", "create", &format!("r{number}.toml"), "-o", &format!("r{number}")]);
    ctl(pubdir, &["release", "sign", &format!("r{number}"), "--key", "release.key"]);
}

fn start(console: &Console, args: &[&str]) -> u64 {
    let mut a = vec!["rollout", "start", "--fleet", FLEET];
    a.extend_from_slice(args);
    console.json(&a)["id"].as_u64().unwrap()
}

#[test]
fn a_gated_rollout_promotes_an_agreeing_candidate_and_pauses_on_a_disagreeing_one() {
    let dir = outpost_tests::scratch("quality-gate");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    release(&pubdir, 5, "digits-central", "");
    let root = pubdir.join("root-1.json");
    let broker = Broker::start(&dir.join("broker"));
    let console = Console::start(&dir, &broker, &root);
    // The devices serve `digits-edge` (configured, version 0) until a release comes.
    let devices: Vec<Device> =
        DEVICES.iter().map(|id| Device::start(&dir, id, &broker.address(), &pubdir, "")).collect();
    let addrs: Vec<_> = devices.iter().map(|d| d.addr).collect();
    wait_for(Duration::from_secs(30), "3 devices online", || (console.online() == 3).then_some(()));

    // Which held-out digits the models agree on: edge, its retrained head (release 2), central
    // (release 5).
    let tops = top_classes(&["digits-edge", "successors/digits-edge-head", "digits-central"]);
    let rows = digits();
    let pick = |f: &dyn Fn(&Vec<usize>) -> bool| -> Vec<Vec<f32>> {
        rows.iter().zip(&tops).filter(|(_, t)| f(t)).map(|(r, _)| r.clone()).collect()
    };
    let edge_and_head_agree = pick(&|t| t[0] == t[1]);
    let (head_central_agree, head_central_differ) = (pick(&|t| t[1] == t[2]), pick(&|t| t[1] != t[2]));
    assert!(!head_central_differ.is_empty(), "the head and central models differ on some digits");

    // 1. Release 2, gated: every device shadows it on traffic where it agrees, passes the gate
    //    (90% over 20 rows) and activates it, one wave after the other.
    for r in ["r2", "r5"] {
        console.ctl(&["release", "upload", pubdir.join(r).to_str().unwrap()]);
    }
    let traffic = Traffic::start(addrs.clone(), edge_and_head_agree);
    let id =
        start(&console, &["--number", "2", "--waves", "1,100%", "--shadow-agreement", "0.9", "--shadow-rows", "20"]);
    let r = console.wait_rollout(id, "completed", Duration::from_secs(120));
    traffic.stop();
    assert_eq!(r["counts"]["succeeded"], 3, "{r:#}");
    assert_eq!(r["shadow_gate"], json!({"agreement": 0.9, "rows": 20}), "{r:#}");
    for d in &devices {
        assert_eq!(d.served_version().as_deref(), Some("2"), "{}", d.id);
        let history = console.device(&d.id)["history"].clone();
        let kinds: Vec<&str> = history.as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
        for k in ["offered", "shadowing", "gate_passed", "succeeded"] {
            assert!(kinds.contains(&k), "{}: {k} missing from {kinds:?}", d.id);
        }
    }

    // 2. Release 5 (the central model), gated at 95% over 30 rows, on traffic where one row in
    //    three is a digit the two models answer differently: the first device's comparison
    //    reports about 2/3 agreement, and the rollout pauses at the gate.
    let mixed: Vec<Vec<f32>> = (0..300)
        .map(|i| {
            if i % 3 == 0 {
                &head_central_differ[i / 3 % head_central_differ.len()]
            } else {
                &head_central_agree[i % head_central_agree.len()]
            }
        })
        .cloned()
        .collect();
    let traffic = Traffic::start(addrs.clone(), mixed);
    let id =
        start(&console, &["--number", "5", "--waves", "1,100%", "--shadow-agreement", "0.95", "--shadow-rows", "30"]);
    let r = console.wait_rollout(id, "paused", Duration::from_secs(120));
    traffic.stop();
    let failed = r["failures"][0]["device"].as_str().unwrap().to_owned();
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("shadow gate: device {failed} agreed on ")) && reason.ends_with("below 95.0%"),
        "{reason}"
    );
    let agreement: f64 = reason.split("agreed on ").nth(1).unwrap().split('%').next().unwrap().parse().unwrap();
    println!("gate failed: {reason} (expected about 66.7%)");
    assert!((55.0..=78.0).contains(&agreement), "one row in three differs: {reason}");
    assert_eq!(r["counts"]["failed"], 1, "only the first wave's device was offered: {r:#}");
    // The failing device is offered release 2 again: it drops the candidate and serves on.
    let dev = devices.iter().find(|d| d.id == failed).unwrap();
    wait_for(Duration::from_secs(30), "the candidate dropped", || {
        let s = broker.state(&failed)?;
        (s["candidate"].is_null() && s["release"]["number"] == 2).then_some(())
    });
    assert_eq!(dev.served_version().as_deref(), Some("2"));
    for d in &devices {
        assert_eq!(d.served_version().as_deref(), Some("2"), "{}", d.id);
    }

    // The console's page shows the gate and why the rollout stopped at it.
    let dom = console.page(&dir, &["--dump-dom"]);
    assert!(dom.contains("data-loaded=\"yes\""), "the page loaded its data: {dom}");
    let card = dom.split(&format!("id=\"rollout-{id}\"")).nth(1).expect("the rollout is shown");
    assert!(card.starts_with(" data-state=\"paused\""), "{card}");
    assert!(card.contains("gate: 95.0% agreement over 30 rows"), "{card}");
    assert!(card.contains(reason), "{card}");
}

/// After activation: release 6 carries a reference profile, and a rollout with a soak gate on
/// drift and the rollback rule takes it to the fleet. The first two devices get the same kind
/// of digits as the profile and keep it; the third gets its digits with the pixels inverted,
/// its drift score passes the bound, the rollout pauses naming it, and the device goes back to
/// release 1, which it still holds, and serves it.
#[test]
fn shifted_inputs_after_activation_pause_the_rollout_and_roll_the_device_back() {
    let dir = outpost_tests::scratch("soak-gate");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    // The profile: the first 200 held-out digits; the traffic is the rest.
    const REFERENCE: usize = 200;
    let head = repo_root().join("models/successors/digits-edge-head.onnx");
    let data = repo_root().join("models/digits-test.csv");
    let profile = pubdir.join("head.profile.json");
    let limit = REFERENCE.to_string();
    let (head_s, data_s, profile_s) = (head.to_str().unwrap(), data.to_str().unwrap(), profile.to_str().unwrap());
    ctl(&pubdir, &["profile", head_s, "--data", data_s, "--limit", &limit, "--out", profile_s]);
    release(
        &pubdir,
        6,
        "successors/digits-edge-head",
        &format!("profile = {profile:?}\n[models.config.drift]\nwindow = 100\nthreshold = 0.25\n"),
    );
    let broker = Broker::start(&dir.join("broker"));
    let console = Console::start(&dir, &broker, &pubdir.join("root-1.json"));
    let devices: Vec<Device> =
        DEVICES.iter().map(|id| Device::start(&dir, id, &broker.address(), &pubdir, "")).collect();
    wait_for(Duration::from_secs(30), "3 devices online", || (console.online() == 3).then_some(()));
    for r in ["r1", "r6"] {
        console.ctl(&["release", "upload", pubdir.join(r).to_str().unwrap()]);
    }
    // Release 1 everywhere first: the release a rollback returns to.
    let id = start(&console, &["--number", "1", "--waves", "100%"]);
    console.wait_rollout(id, "completed", Duration::from_secs(60));

    let rows = digits();
    let live = rows[REFERENCE..].to_vec();
    let inverted: Vec<Vec<f32>> = live.iter().map(|r| r.iter().map(|v| 16.0 - v).collect()).collect();
    let traffic = Traffic::each(vec![
        (devices[0].addr, live.clone()),
        (devices[1].addr, live.clone()),
        (devices[2].addr, inverted),
    ]);
    let id =
        start(&console, &["--number", "6", "--waves", "1,100%", "--soak", "3", "--drift-max", "1.5", "--rollback"]);
    let r = console.wait_rollout(id, "paused", Duration::from_secs(120));
    traffic.stop();
    let reason = r["reason"].as_str().unwrap();
    println!("soak gate: {reason}");
    assert!(reason.starts_with("soak gate: device dev3 drift score "), "{r:#}");
    assert!(reason.ends_with(", over 1.5; rolled back to release 1"), "{r:#}");
    let score: f64 = reason.split("drift score ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    assert!(score > 1.5, "{reason}");
    assert_eq!(r["counts"]["rolled_back"], 1, "{r:#}");
    assert_eq!(r["soak_gate"], json!({"drift_max": 1.5, "escalation_rise": null, "p99_ratio": null, "rollback": true}));
    // dev3 returns to release 1 (from its store: nothing to fetch) and serves it.
    wait_for(Duration::from_secs(30), "dev3 back on release 1", || {
        let s = broker.state("dev3")?;
        (s["release"]["number"] == 1).then_some(())
    });
    assert_eq!(devices[2].served_version().as_deref(), Some("1"));
    // The others run release 6 within the bound: their scores as the console sees them.
    for d in &devices[..2] {
        assert_eq!(d.served_version().as_deref(), Some("6"), "{}", d.id);
        let seen = console.device(&d.id);
        let drift = seen["drift"].as_f64();
        println!("{}: drift {drift:?}", d.id);
        assert!(drift.is_none_or(|x| x <= 1.5), "{seen:#}");
        if d.id == "dev1" {
            // Activated a wave and a soak earlier: it has closed windows of its own.
            assert!(drift.is_some(), "{seen:#}");
        }
    }
    let history = console.device("dev3")["history"].clone();
    let kinds: Vec<&str> = history.as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"rolled_back"), "{kinds:?}");

    // The page: the rollout with its soak gate and the device rolled back, and release 6's
    // drift over time from the console's samples (one a second here).
    let dom = console.page(&dir, &["--dump-dom"]);
    let card = dom.split(&format!("id=\"rollout-{id}\"")).nth(1).expect("the rollout is shown");
    assert!(card.contains("soak: drift ≤ 1.5, rollback") && card.contains("1 rolled back"), "{card}");
    let chart = dom.split("class=\"drift-chart\" data-release=\"6\"").nth(1).expect("release 6's drift over time");
    assert!(chart.contains("<polyline class=\"max\" points=\""), "{chart}");
}
