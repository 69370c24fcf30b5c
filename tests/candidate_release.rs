//! Candidate releases through the real daemon: `outpost update candidate DIR` verifies, fetches
//! and stages a signed release whose models then run as shadows of the serving ones (nothing
//! served changes); `outpost update promote` activates it, `outpost update drop` forgets it; a
//! restart stages it again; a release applied meanwhile replaces it; a candidate that cannot
//! shadow its model is refused and changes nothing. Over MQTT (a real Mosquitto), a candidate
//! offer is staged and reported with its comparisons, the same release offered for real is
//! promoted without a second download, and the active release offered again drops it.
//! `outpost update revert` returns to the release that ran before the active one, once, and the
//! release it left can never be applied again.

use std::path::Path;
use std::time::{Duration, Instant};

use outpost_tests::mqtt::{BlobServer, Broker, Device as MqttDevice, ctl, publisher, wait_for};
use outpost_tests::releases::{Fleet, sample_release, store_config, trusted_state};
use outpost_tests::{Daemon, free_port, outpost_bin, repo_root};
use serde_json::{Value, json};

fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> Value {
    let (status, text) = outpost_tests::http(addr, method, path, &[], b"");
    assert_eq!(status, 200, "{method} {path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// `outpost update ARGS --config CONFIG`: exit status and the JSON it printed.
fn update(config: &Path, args: &[&str]) -> (i32, Value) {
    let out = std::process::Command::new(outpost_bin())
        .arg("update")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    // The JSON it printed; otherwise what it said, for the failure message.
    let said = || format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let printed = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| Value::String(said()));
    (out.status.code().unwrap_or(-1), printed)
}

/// The JSON of a command that must succeed.
fn ok((code, printed): (i32, Value)) -> Value {
    assert_eq!(code, 0, "{printed}");
    printed
}

/// Sends `rows` held-out digits to `digits`, `gap` apart; returns the versions that answered.
fn send(addr: std::net::SocketAddr, rows: usize, gap: Duration) -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("models/digits-test.csv")).unwrap();
    let mut versions = Vec::new();
    for line in text.lines().skip(1).take(rows) {
        let row: Vec<f32> = line.split(',').skip(1).map(|v| v.parse().unwrap()).collect();
        let req = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]});
        let (status, out) =
            outpost_tests::http(addr, "POST", "/v2/models/digits/infer", &[], req.to_string().as_bytes());
        assert_eq!(status, 200, "{out}");
        versions.push(serde_json::from_str::<Value>(&out).unwrap()["model_version"].as_str().unwrap().to_owned());
        std::thread::sleep(gap);
    }
    versions
}

fn shadow(addr: std::net::SocketAddr) -> Value {
    http(addr, "GET", "/v2/models/digits/stats")["model_stats"][0]["shadow"].clone()
}

/// A provisioned device store in a fresh folder named for `name`: the folder, the fleet's keys,
/// the daemon's address, its state directory and its config.
struct Provisioned {
    dir: outpost_tests::Scratch,
    fleet: Fleet,
    addr: std::net::SocketAddr,
    state: std::path::PathBuf,
    config: std::path::PathBuf,
}

fn provisioned(name: &str) -> Provisioned {
    let dir = outpost_tests::scratch(name);
    let fleet = Fleet::new();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let state = dir.join("state");
    let config = store_config(&state, &addr.to_string());
    std::fs::write(dir.join("root-1.json"), fleet.root1.to_bytes()).unwrap();
    ok(update(&config, &["provision", dir.join("root-1.json").to_str().unwrap()]));
    Provisioned { dir, fleet, addr, state, config }
}

#[test]
fn a_candidate_release_runs_as_a_shadow_until_promoted_or_dropped() {
    let Provisioned { dir, fleet, addr, state, config } = provisioned("candidate");
    let r1 = sample_release(&dir, &fleet, 1, "digits", "digits-edge");
    ok(update(&config, &["apply", r1.to_str().unwrap()]));
    // Offline, a candidate has nothing to run beside.
    let r2 = sample_release(&dir, &fleet, 2, "digits", "digits-central");
    let out = std::process::Command::new(outpost_bin())
        .args(["update", "candidate", r2.to_str().unwrap(), "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("running daemon"));

    let mut daemon = Daemon::serve_at(addr, &["--config", config.to_str().unwrap()]);
    let (code, answer) = update(&config, &["candidate", r2.to_str().unwrap()]);
    assert_eq!((code, answer["candidate"]["number"].as_u64()), (0, Some(2)), "{answer}");
    let status = http(addr, "GET", "/v2/update/status");
    assert_eq!(
        (status["active"]["number"].as_u64(), status["candidate"]["number"].as_u64()),
        (Some(1), Some(2)),
        "{status}"
    );

    // Every 10th request also runs on the candidate (the default share), at most 50 a second:
    // 150 requests 25 ms apart sample 15, none over the rate. Release 1 answers every one.
    let versions = send(addr, 150, Duration::from_millis(25));
    assert!(versions.iter().all(|v| v == "1"), "{versions:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let report = loop {
        let r = shadow(addr);
        if r["compared"].as_u64().unwrap_or(0) + r["failed"].as_u64().unwrap_or(0) == 15 {
            break r;
        }
        assert!(Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("candidate release 2 beside release 1: {report}");
    assert_eq!((report["candidate"].as_str(), report["seen"].as_u64()), (Some("2"), Some(150)), "{report}");
    assert_eq!(
        (report["skipped"].as_u64(), report["failed"].as_u64(), report["rows"].as_u64()),
        (Some(0), Some(0), Some(15)),
        "{report}"
    );
    assert!(report["agreed_rows"].as_u64().unwrap() >= 12, "the two digits models mostly agree: {report}");

    // Promoted: release 2 serves, the shadow is gone, and its number is the last one.
    let (code, answer) = update(&config, &["promote"]);
    assert_eq!((code, answer["applied"]["number"].as_u64()), (0, Some(2)), "{answer}");
    assert_eq!(send(addr, 3, Duration::ZERO), ["2", "2", "2"]);
    assert!(shadow(addr).is_null());
    let status = http(addr, "GET", "/v2/update/status");
    assert_eq!((status["active"]["number"].as_u64(), status["last_number"].as_u64()), (Some(2), Some(2)), "{status}");
    assert!(status["candidate"].is_null(), "{status}");
    let (code, answer) = update(&config, &["promote"]);
    assert_eq!((code, answer["refusal"].as_str()), (2, Some("missing")), "{answer}");

    // Dropped: nothing served changes, and the store lets go of its blobs.
    let before = trusted_state(&state);
    let r3 = sample_release(&dir, &fleet, 3, "digits", "digits-edge-qop");
    ok(update(&config, &["candidate", r3.to_str().unwrap()]));
    assert_eq!(shadow(addr)["candidate"], "3");
    let (code, answer) = update(&config, &["drop"]);
    assert_eq!((code, answer["dropped"].as_u64()), (0, Some(3)), "{answer}");
    assert!(shadow(addr).is_null());
    assert_eq!(trusted_state(&state), before, "the dropped candidate left nothing in the store");
    assert_eq!(send(addr, 1, Duration::ZERO), ["2"]);

    // A candidate that does not take the model's inputs is refused; nothing changes.
    let cnn = sample_release(&dir, &fleet, 4, "digits", "digits-cnn");
    let (code, answer) = update(&config, &["candidate", cnn.to_str().unwrap()]);
    assert_eq!((code, answer["refusal"].as_str()), (2, Some("health_check")), "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("cannot shadow"), "{answer}");
    assert_eq!(trusted_state(&state), before);

    // A restart stages the candidate again.
    let r5 = sample_release(&dir, &fleet, 5, "digits", "digits-edge-qop");
    ok(update(&config, &["candidate", r5.to_str().unwrap()]));
    daemon.terminate();
    let _ = daemon.child.wait();
    daemon = Daemon::serve_at(addr, &["--config", config.to_str().unwrap()]);
    assert_eq!(shadow(addr)["candidate"], "5", "{}", daemon.log());
    assert_eq!(send(addr, 1, Duration::ZERO), ["2"]);

    // A release applied over a candidate replaces it.
    let r6 = sample_release(&dir, &fleet, 6, "digits", "digits-edge");
    ok(update(&config, &["apply", r6.to_str().unwrap()]));
    assert!(shadow(addr).is_null());
    assert!(http(addr, "GET", "/v2/update/status")["candidate"].is_null());
    assert_eq!(send(addr, 1, Duration::ZERO), ["6"]);
}

#[test]
fn revert_returns_to_the_previous_release_once_and_the_left_release_cannot_return() {
    let Provisioned { dir, fleet, addr, state, config } = provisioned("revert");
    let r1 = sample_release(&dir, &fleet, 1, "digits", "digits-edge");
    let r2 = sample_release(&dir, &fleet, 2, "digits", "digits-central");
    let r3 = sample_release(&dir, &fleet, 3, "digits", "digits-edge-qop");
    ok(update(&config, &["apply", r1.to_str().unwrap()]));
    let (code, answer) = update(&config, &["revert"]);
    assert_eq!((code, answer["refusal"].as_str()), (2, Some("missing")), "nothing ran before: {answer}");
    assert!(answer["error"].as_str().unwrap().contains("no previous release"), "{answer}");

    // Offline: release 2 applied, then reverted; its number stays the last accepted.
    ok(update(&config, &["apply", r2.to_str().unwrap()]));
    let answer = ok(update(&config, &["revert"]));
    assert_eq!(answer["applied"]["number"], 1, "{answer}");
    let status = ok(update(&config, &["status"]));
    assert_eq!(
        (status["active"]["number"].as_u64(), status["previous"].is_null(), status["last_number"].as_u64()),
        (Some(1), true, Some(2)),
        "{status}"
    );
    let (code, answer) = update(&config, &["apply", r2.to_str().unwrap()]);
    assert_eq!((code, answer["refusal"].as_str()), (2, Some("rollback")), "the release left stays out: {answer}");

    // Through the running daemon: release 3 serves, is reverted, and release 1 serves again.
    let _daemon = Daemon::serve_at(addr, &["--config", config.to_str().unwrap()]);
    assert_eq!(send(addr, 1, Duration::ZERO), ["1"]);
    ok(update(&config, &["apply", r3.to_str().unwrap()]));
    assert_eq!(send(addr, 1, Duration::ZERO), ["3"]);
    let before = trusted_state(&state);
    let answer = ok(update(&config, &["revert"]));
    assert_eq!(answer["applied"]["number"], 1, "{answer}");
    assert_eq!(send(addr, 2, Duration::ZERO), ["1", "1"]);
    // Once: a second revert has nowhere to go, and changes nothing.
    let after = trusted_state(&state);
    assert_ne!(after, before);
    let (code, answer) = update(&config, &["revert"]);
    assert_eq!((code, answer["refusal"].as_str()), (2, Some("missing")), "{answer}");
    assert_eq!(trusted_state(&state), after);
    assert_eq!(send(addr, 1, Duration::ZERO), ["1"]);
}

/// `outpostctl publish RELEASE --devices dev1 [--candidate]` as the console user.
fn publish(broker: &Broker, publisher: &Path, release: &str, candidate: bool) -> String {
    let mut args = vec!["publish".to_string(), release.into(), "--devices".into(), "dev1".into()];
    if candidate {
        args.push("--candidate".into());
    }
    args.extend(broker.ctl_args("console"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ctl(publisher, &args)
}

#[test]
fn over_mqtt_a_candidate_offer_is_staged_reported_promoted_and_dropped() {
    let dir = outpost_tests::scratch("candidate-mqtt");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    let broker = Broker::start(&dir.join("broker"));
    let _blobs = BlobServer::start(&broker, "blobs", &[&pubdir.join("r1"), &pubdir.join("r2"), &pubdir.join("r3")]);
    let dev = MqttDevice::start(&dir, "dev1", &broker.address(), &pubdir, "");
    publish(&broker, &pubdir, "r1", false);
    dev.wait_update("idle", Some(1), Duration::from_secs(30));
    assert_eq!(dev.served_version().as_deref(), Some("1"));

    // Offered as a candidate: fetched and staged, reported, and compared on live requests while
    // release 1 answers them.
    let said = publish(&broker, &pubdir, "r2", true);
    assert!(said.contains("as a candidate"), "{said}");
    wait_for(Duration::from_secs(30), "the state to report candidate 2", || {
        broker.state("dev1").filter(|s| s["candidate"]["number"] == 2 && s["release"]["number"] == 1)
    });
    assert_eq!(send(dev.addr, 40, Duration::from_millis(25)).iter().filter(|v| *v == "1").count(), 40);
    let state = wait_for(Duration::from_secs(15), "a report with the candidate's comparisons", || {
        broker.state("dev1").filter(|s| s["models"][0]["shadow"]["compared"].as_u64() >= Some(4))
    });
    let shadow = &state["models"][0]["shadow"];
    println!("reported over MQTT: {shadow}");
    assert_eq!(shadow["candidate"], "2", "{state}");
    assert!(shadow["agreement"].as_f64().unwrap() > 0.5, "the retrained head mostly agrees: {state}");

    // The same release offered for real: promoted without fetching again.
    publish(&broker, &pubdir, "r2", false);
    // Staging the candidate left the state idle on release 2 already: wait for it applied.
    let u = dev.wait_applied(2, Duration::from_secs(30));
    assert_eq!(u["last_applied"]["download_ms"], 0, "promoted, not fetched: {u}");
    assert_eq!(dev.served_version().as_deref(), Some("2"));
    wait_for(Duration::from_secs(10), "the state to show release 2 and no candidate", || {
        broker.state("dev1").filter(|s| s["release"]["number"] == 2 && s["candidate"].is_null())
    });

    // Another candidate, then the active release offered again: the candidate is dropped.
    publish(&broker, &pubdir, "r3", true);
    wait_for(Duration::from_secs(30), "candidate 3", || broker.state("dev1").filter(|s| s["candidate"]["number"] == 3));
    publish(&broker, &pubdir, "r2", false);
    wait_for(Duration::from_secs(30), "candidate 3 dropped", || {
        broker.state("dev1").filter(|s| s["candidate"].is_null() && s["release"]["number"] == 2)
    });
    assert_eq!(dev.served_version().as_deref(), Some("2"));
}
