//! The MQTT path end to end, with a real Mosquitto (the repository's config and ACL), real
//! `outpost` daemons as devices, and `outpostctl publish` / `serve-blobs` as the publisher:
//! full and delta updates, resume across a broker restart and a device kill, refusals that
//! change nothing, and a device with no broker at all.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use outpost_tests::mqtt::{BlobServer, Broker, Device, FLEET, ctl, publisher, wait_for};
use outpost_tests::releases::trusted_state;
use outpost_tests::scratch;
use serde_json::Value;

fn publish(broker: &Broker, publisher: &Path, release: &str, devices: &str) -> String {
    let mut args = vec!["publish".to_string(), release.into(), "--devices".into(), devices.into()];
    args.extend(broker.ctl_args("console"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ctl(publisher, &args)
}

/// Bytes of a release's objects as a device fetching them whole would receive.
fn full_bytes(publisher: &Path, release: &str) -> u64 {
    std::fs::read_dir(publisher.join(release).join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn a_published_release_arrives_whole_then_as_a_delta_and_the_console_sees_it() {
    let dir = scratch("mqtt-e2e");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    let broker = Broker::start(&dir.join("broker"));
    // Two blob servers share the requests through one MQTT 5 shared subscription.
    let blobs_a = BlobServer::start(&broker, "blobs-a", &[&pubdir.join("r1"), &pubdir.join("r2")]);
    let blobs_b = BlobServer::start(&broker, "blobs-b", &[&pubdir.join("r1"), &pubdir.join("r2")]);
    let mut dev = Device::start(&dir, "dev1", &broker.address(), &pubdir, "labels = { site = \"lab\" }");
    assert_eq!(dev.served_version().as_deref(), Some("0"));

    // Whole: the device holds nothing of release 1.
    publish(&broker, &pubdir, "r1", "dev1");
    let u = dev.wait_update("idle", Some(1), Duration::from_secs(30));
    let t = &u["last_applied"]["transfer"];
    assert_eq!(u["last_applied"]["number"], 1, "{u}");
    assert_eq!(t["full_objects"], 2, "model and golden file came whole: {u}");
    assert_eq!(t["bytes_received"].as_u64(), Some(full_bytes(&pubdir, "r1")), "{u}");
    assert_eq!(t["chunks_fetched"], t["chunks_total"], "{u}");
    assert_eq!(t["requests"], t["chunks_total"], "one request per chunk on a clean link: {u}");
    assert_eq!(dev.served_version().as_deref(), Some("1"));
    let first = t["requests"].as_u64().unwrap();

    // Delta: the device holds release 1's blobs, the bases of release 2's deltas.
    publish(&broker, &pubdir, "r2", "dev1");
    let u = dev.wait_update("idle", Some(2), Duration::from_secs(30));
    let t = &u["last_applied"]["transfer"];
    assert_eq!(t["delta_objects"], 2, "{u}");
    assert_eq!(t["full_objects"], 0, "{u}");
    let received = t["bytes_received"].as_u64().unwrap();
    assert!(received * 3 < full_bytes(&pubdir, "r2"), "a delta update costs under a third of a whole one: {u}");
    assert_eq!(dev.served_version().as_deref(), Some("2"));
    let (a, b) = (blobs_a.stop(), blobs_b.stop());
    assert_eq!(a + b, first + t["requests"].as_u64().unwrap(), "every request answered once");
    assert!(a > 0 && b > 0, "the shared subscription spread the requests ({a} and {b})");

    // The console's view: the retained state.
    // A report sent while release 2 was being applied can already name it, with the models and
    // the update state of the moment: wait for the report made after.
    let state = wait_for(Duration::from_secs(10), "the state to show release 2 applied", || {
        broker.state("dev1").filter(|s| {
            s["release"]["number"] == 2 && s["models"][0]["versions"][0] == "2" && s["update"]["state"] == "idle"
        })
    });
    assert_eq!(state["online"], true);
    assert!(state["resources"]["rss_bytes"].as_u64().unwrap() > 0, "{state}");
    assert_eq!(state["runtime"].as_str().map(|r| r.starts_with("outpost ")), Some(true));
    assert_eq!(state["labels"]["site"], "lab", "configured labels are reported: {state}");

    // Inference statistics since the last report reach the console.
    for _ in 0..20 {
        assert_eq!(dev.get("/v2/models/digits/ready").0, 200);
    }
    let (code, _) = post_golden_row(&dev);
    assert_eq!(code, 200);
    let state = wait_for(Duration::from_secs(10), "a report with one inference", || {
        broker.state("dev1").filter(|s| s["stats"]["count"] == 1)
    });
    assert!(state["stats"]["p50_ms"].as_f64().unwrap() > 0.0, "{state}");

    // A clean stop says goodbye; a kill leaves the last will. Both read offline.
    dev.terminate();
    let gone = wait_for(Duration::from_secs(10), "offline after SIGTERM", || {
        broker.state("dev1").filter(|s| s["online"] == false)
    });
    assert_eq!(gone["device"], "dev1");
    dev.restart();
    wait_for(Duration::from_secs(10), "online again", || broker.state("dev1").filter(|s| s["online"] == true));
    dev.kill();
    wait_for(Duration::from_secs(90), "the last will", || broker.state("dev1").filter(|s| s["online"] == false));
}

/// POSTs one 8x8 digit to the device.
fn post_golden_row(dev: &Device) -> (u16, String) {
    post_golden_row_to(dev.addr)
}

fn post_golden_row_to(addr: std::net::SocketAddr) -> (u16, String) {
    let body = r#"{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]}]}"#;
    outpost_tests::http(
        addr,
        "POST",
        "/v2/models/digits/infer",
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
}

#[test]
fn downloads_resume_after_a_broker_restart_and_after_a_device_kill() {
    let dir = scratch("mqtt-resume");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    let mut broker = Broker::start(&dir.join("broker"));
    let _blobs = BlobServer::start(&broker, "blobs", &[&pubdir.join("r1")]);
    // 2 KiB/s: release 1 (about 14 KB in 14 chunks) takes about 7 s, time to interrupt it.
    let slow = "max_bytes_per_second = 2048\nmin_bytes_per_second = 64\n";

    // The broker goes away mid-download and comes back.
    let dev = Device::start(&dir, "dev1", &broker.address(), &pubdir, slow);
    publish(&broker, &pubdir, "r1", "dev1");
    wait_for(Duration::from_secs(30), "a few chunks", || {
        let p = &dev.status()["mqtt"]["update"]["progress"];
        (p["chunks_done"].as_u64()? >= 3).then_some(())
    });
    // Inference goes on the whole time the broker is away and the download resumes.
    let load = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (running, addr) = (load.clone(), dev.addr);
    let traffic = std::thread::spawn(move || {
        let (mut ok, mut other) = (0u32, Vec::new());
        while running.load(std::sync::atomic::Ordering::Relaxed) {
            match post_golden_row_to(addr) {
                (200, _) => ok += 1,
                (status, text) => other.push(format!("{status}: {text}")),
            }
            // A new connection each time: paced, so the client's ports are not used up.
            std::thread::sleep(Duration::from_millis(5));
        }
        (ok, other)
    });
    broker.stop();
    let down = dev.status();
    wait_for(Duration::from_secs(10), "the agent to notice", || {
        (dev.status()["mqtt"]["connection"]["connected"] == false).then_some(())
    });
    assert_eq!(dev.served_version().as_deref(), Some("0"), "serving goes on without the broker");
    std::thread::sleep(Duration::from_secs(1));
    broker.restart();
    let u = dev.wait_update("idle", Some(1), Duration::from_secs(60));
    let t = &u["last_applied"]["transfer"];
    let total = t["chunks_total"].as_u64().unwrap();
    assert_eq!(t["chunks_fetched"].as_u64(), Some(total), "each chunk written once: {u}");
    let n = |k: &str| t[k].as_u64().unwrap();
    assert!(n("reasked") <= 4, "at most the window was in flight when the link dropped: {u}");
    assert!(
        n("requests") <= total + n("chunks_retried") + n("reasked"),
        "every request was a first ask, a retry or a re-ask of a chunk in flight, never a chunk already written: {u} (before the stop: {down})"
    );
    assert_eq!(dev.served_version().as_deref(), Some("1"));
    load.store(false, std::sync::atomic::Ordering::Relaxed);
    let (ok, other) = traffic.join().unwrap();
    assert!(ok > 0 && other.is_empty(), "{ok} answered, and not: {other:?}");

    // The device is killed mid-download and restarted: it resumes from what is on disk.
    let mut dev2 = Device::start(&dir, "dev2", &broker.address(), &pubdir, slow);
    publish(&broker, &pubdir, "r1", "dev2");
    let done_before = wait_for(Duration::from_secs(30), "a few chunks", || {
        let p = &dev2.status()["mqtt"]["update"]["progress"];
        p["chunks_done"].as_u64().filter(|n| *n >= 4)
    });
    dev2.kill();
    let parts: Vec<_> = std::fs::read_dir(dev2.state_dir().join("downloads"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path().join("blobs")).into_iter().flatten().flatten())
        .collect();
    assert!(!parts.is_empty(), "partial files stay on disk");
    dev2.restart();
    let u = dev2.wait_update("idle", Some(1), Duration::from_secs(60));
    let t = &u["last_applied"]["transfer"];
    let (total, resumed, fetched) = (
        t["chunks_total"].as_u64().unwrap(),
        t["chunks_resumed"].as_u64().unwrap(),
        t["chunks_fetched"].as_u64().unwrap(),
    );
    assert!(resumed >= done_before, "chunks seen done before the kill were kept ({resumed} < {done_before}): {u}");
    assert_eq!(resumed + fetched, total, "nothing fetched twice: {u}");
    assert_eq!(dev2.served_version().as_deref(), Some("1"));
    assert!(!dev2.state_dir().join("downloads").join(u["release"]["id"].as_str().unwrap()).exists(), "cleaned up");
}

#[test]
fn refusals_over_mqtt_change_nothing_and_are_reported() {
    let dir = scratch("mqtt-refusals");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    // A copy of release 3 whose served files are corrupted (the blob server's disk rotted).
    let rotten = dir.join("r3-rotten");
    assert!(Command::new("cp").arg("-a").arg(pubdir.join("r3")).arg(&rotten).status().unwrap().success());
    for sub in ["blobs", "deltas"] {
        for e in std::fs::read_dir(rotten.join(sub)).unwrap().flatten() {
            let mut bytes = std::fs::read(e.path()).unwrap();
            let at = 100.min(bytes.len() - 1);
            bytes[at] ^= 0x40;
            std::fs::write(e.path(), bytes).unwrap();
        }
    }
    let broker = Broker::start(&dir.join("broker"));
    let blobs = BlobServer::start(&broker, "blobs", &[&pubdir.join("r1"), &pubdir.join("r2"), &rotten]);
    let dev = Device::start(&dir, "dev1", &broker.address(), &pubdir, "chunk_tries = 3\nmax_attempts = 1\n");
    publish(&broker, &pubdir, "r2", "dev1");
    dev.wait_update("idle", Some(2), Duration::from_secs(30));
    let trusted = trusted_state(&dev.state_dir());
    let unchanged = |what: &str| {
        assert_eq!(trusted_state(&dev.state_dir()), trusted, "{what}: trusted state changed");
        assert_eq!(dev.served_version().as_deref(), Some("2"), "{what}: serving changed");
    };
    let reported = |kind: &str| {
        wait_for(Duration::from_secs(10), &format!("the console to see {kind}"), || {
            broker.state("dev1").filter(|s| s["update"]["last_error"]["kind"] == kind)
        })
    };
    let downloads = |dev: &Device| -> Vec<String> {
        std::fs::read_dir(dev.state_dir().join("downloads"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };

    // A replayed older release (the retained offer of release 1 again).
    publish(&broker, &pubdir, "r1", "dev1");
    let u = dev.wait_update("refused", Some(1), Duration::from_secs(20));
    assert_eq!(u["last_error"]["kind"], "rollback", "{u}");
    assert!(downloads(&dev).is_empty(), "nothing fetched for a replay");
    reported("rollback");
    unchanged("replay");

    // Not an offer at all (the console's own credentials, a broken payload).
    let junk = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-u", "console", "-P", "pw-console", "-q", "1", "-r"])
        .args(["-t", &format!("outpost/v1/{FLEET}/devices/dev1/desired"), "-m", "{\"release\": 42"])
        .status()
        .unwrap();
    assert!(junk.success());
    // The device is still "refused" for the replay from the step before: wait for this refusal.
    let u = wait_for(Duration::from_secs(20), "the broken offer refused", || {
        let u = dev.status()["mqtt"]["update"].clone();
        (u["state"] == "refused" && u["last_error"]["kind"] == "malformed").then_some(u)
    });
    assert!(u["release"].is_null(), "a payload that is no offer names no release: {u}");
    reported("malformed");
    unchanged("malformed offer");

    // Release 3 signed by a key the root does not know.
    let forged = dir.join("r3-forged");
    assert!(Command::new("cp").arg("-a").arg(pubdir.join("r3")).arg(&forged).status().unwrap().success());
    let release = std::fs::read_to_string(forged.join("release.json")).unwrap();
    let mut env: Value = serde_json::from_str(&release).unwrap();
    env["signatures"] = Value::Array(vec![]);
    std::fs::write(forged.join("release.json"), env.to_string()).unwrap();
    ctl(&dir, &["keys", "gen", "rogue"]);
    ctl(&dir, &["release", "sign", forged.to_str().unwrap(), "--key", "rogue.key"]);
    publish(&broker, &dir, forged.to_str().unwrap(), "dev1");
    let u = dev.wait_update("refused", Some(3), Duration::from_secs(20));
    assert_eq!(u["last_error"]["kind"], "unknown_key", "{u}");
    assert!(downloads(&dev).is_empty(), "nothing fetched for a forgery");
    reported("unknown_key");
    unchanged("wrong key");

    // The real release 3 beside a junk root document: refused, and that refusal must not stick
    // to release 3 itself (next step).
    let env: Value = serde_json::from_str(&std::fs::read_to_string(pubdir.join("r3/release.json")).unwrap()).unwrap();
    let junk = serde_json::json!({"release": env, "roots": [{"payload_type": "outpost.root/v1", "payload": "!!"}]});
    let sent = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-u", "console", "-P", "pw-console", "-q", "1", "-r"])
        .args(["-t", &format!("outpost/v1/{FLEET}/devices/dev1/desired"), "-m", &junk.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    // The device is still "refused" for release 3 from the step before: wait for this refusal.
    let u = wait_for(Duration::from_secs(20), "the junk roots refused", || {
        let u = dev.status()["mqtt"]["update"].clone();
        (u["state"] == "refused" && u["last_error"]["kind"] == "malformed").then_some(u)
    });
    assert_eq!(u["release"]["number"], 3, "{u}");
    unchanged("junk roots");

    // The real release 3, but the blob server's copy is corrupted: every chunk fails its hash.
    publish(&broker, &pubdir, "r3", "dev1");
    let u = dev.wait_update("failed", Some(3), Duration::from_secs(30));
    assert_eq!(u["last_error"]["kind"], "hash_mismatch", "{u}");
    assert!(u["progress"]["chunks_corrupt"].as_u64().unwrap() >= 3, "{u}");
    reported("hash_mismatch");
    unchanged("corrupted chunks");

    // An endless stream of chunk replies (a rogue or broken server) while release 4 downloads.
    drop(blobs);
    let mut flood = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "yes 'not a chunk' | mosquitto_pub -h 127.0.0.1 -p {} -u blobs -P pw-blobs -t outpost/v1/{FLEET}/devices/dev1/blobs/reply -l",
            broker.port
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    publish(&broker, &pubdir, "r4", "dev1");
    let u = dev.wait_update("failed", Some(4), Duration::from_secs(30));
    let _ = Command::new("pkill").args(["-P", &flood.id().to_string()]).status();
    let _ = flood.kill();
    let _ = flood.wait();
    assert_eq!(u["last_error"]["kind"], "flood", "{u}");
    for d in downloads(&dev) {
        for e in
            std::fs::read_dir(dev.state_dir().join("downloads").join(d).join("blobs")).into_iter().flatten().flatten()
        {
            assert!(e.metadata().unwrap().len() <= 10_000, "partial files never grow past their signed length");
        }
    }
    reported("flood");
    unchanged("endless replies");

    // Another device cannot write this one's offer: the broker refuses it (ACL).
    let mut args = vec!["publish".to_string(), "r4".into(), "--devices".into(), "dev1".into()];
    args.extend(broker.ctl_args("dev2"));
    let out = Command::new(outpost_tests::mqtt::outpostctl()).args(&args).current_dir(&pubdir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("NotAuthorized"), "{err}");
    // ... nor read it, nor anyone's state; and anonymous clients are turned away.
    assert_eq!(broker.retained("dev2", &format!("outpost/v1/{FLEET}/devices/dev1/desired")), None);
    assert_eq!(broker.retained("dev2", &format!("outpost/v1/{FLEET}/devices/dev1/state")), None);
    let anon = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "outpost/v1/demo/devices/dev1/desired",
            "-m",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!anon.status.success(), "anonymous publish must be refused");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(dev.status()["mqtt"]["update"]["release"]["number"], 4, "the device never saw the intruder's offer");
    unchanged("unauthorised publish");
    let log = std::fs::read_to_string(dev.dir.join("dev1.log")).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn without_a_broker_the_device_serves_and_retries_with_capped_backoff() {
    let dir = scratch("mqtt-offline");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    let port = outpost_tests::free_port();
    let dev = Device::start(&dir, "dev1", &format!("127.0.0.1:{port}"), &pubdir, "");
    std::thread::sleep(Duration::from_secs(4));
    let c = dev.status()["mqtt"]["connection"].clone();
    assert_eq!(c["connected"], false, "{c}");
    let failures = c["failures"].as_u64().unwrap();
    // 100 ms doubling to a 1 s cap (each wait drawn from [d/2, d]): at least 4 tries in 4 s,
    // and never a wait over the cap.
    assert!(failures >= 4, "{c}");
    assert!(c["next_retry_ms"].as_u64().unwrap() <= 1000, "{c}");
    assert_eq!(dev.served_version().as_deref(), Some("0"));
    assert_eq!(post_golden_row(&dev).0, 200, "inference goes on offline");
    let later = wait_for(Duration::from_secs(5), "more retries", || {
        let f = dev.status()["mqtt"]["connection"]["failures"].as_u64()?;
        (f > failures).then_some(f)
    });
    assert!(later > failures);

    // The broker appears: the device connects and reports.
    let broker = Broker::start_on(&dir.join("broker"), port);
    let state = wait_for(Duration::from_secs(10), "the first report", || broker.state("dev1"));
    assert_eq!(state["online"], true);
    assert_eq!(dev.status()["mqtt"]["connection"]["connects"], 1);
}

#[test]
fn over_tls_the_device_trusts_only_its_configured_ca() {
    let dir = scratch("mqtt-tls");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = outpost_tests::tls::make_ca(&certs, "fleet-ca");
    let stranger = outpost_tests::tls::make_ca(&certs, "other-ca");
    let (cert, key) = outpost_tests::tls::server_cert(&certs, "fleet-ca", "broker");
    // mosquitto started as root reads its key as its own user.
    for f in [&cert, &key] {
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
    let broker = Broker::start_tls(&dir.join("broker"), &cert, &key);
    let tls = format!("127.0.0.1:{}", broker.tls_port.unwrap());
    let _blobs = BlobServer::start(&broker, "blobs", &[&pubdir.join("r1")]);

    let good = Device::start(&dir, "dev1", &tls, &pubdir, &format!("ca_file = {ca:?}\n"));
    publish(&broker, &pubdir, "r1", "dev1");
    good.wait_update("idle", Some(1), Duration::from_secs(30));
    assert_eq!(good.served_version().as_deref(), Some("1"), "a release arrived over TLS");

    // A device trusting another CA refuses the broker, says why, and serves on.
    let wary = Device::start(&dir, "dev2", &tls, &pubdir, &format!("ca_file = {stranger:?}\n"));
    let c = wait_for(Duration::from_secs(10), "a TLS failure", || {
        let c = wary.status()["mqtt"]["connection"].clone();
        (c["failures"].as_u64()? >= 1).then_some(c)
    });
    assert_eq!(c["connected"], false, "{c}");
    assert!(c["last_error"].as_str().unwrap().contains("TLS"), "{c}");
    assert_eq!(wary.served_version().as_deref(), Some("0"));
}

#[test]
fn simulated_devices_take_a_release_and_report_injected_failures() {
    let dir = scratch("mqtt-simulate");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    let ids: Vec<String> = (1..=20).map(|n| format!("sim-{n:04}")).collect();
    let broker = Broker::start_with_users(&dir.join("broker"), &ids);
    let _blobs = BlobServer::start(&broker, "blobs", &[&pubdir.join("r1")]);
    publish(&broker, &pubdir, "r1", &ids.join(","));
    // The console's view: every state message, as it comes.
    let log = dir.join("states.log");
    let mut watch = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-u", "console", "-P", "pw-console", "-V", "mqttv5"])
        .args(["-t", &format!("outpost/v1/{FLEET}/devices/+/state")])
        .stdout(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // 20 devices, one in ten failing its health check: 18 take the release.
    let out = Command::new(outpost_tests::mqtt::outpostctl())
        .args([
            "simulate",
            "--devices",
            "20",
            "--fleet",
            FLEET,
            "--fail-health",
            "0.1",
            "--until-release",
            "1",
            "--every",
            "1",
        ])
        .arg("--root")
        .arg(pubdir.join("root-1.json"))
        .arg("--state-dir")
        .arg(dir.join("sim"))
        .args(["--broker", &broker.address()])
        .env("OUTPOST_SIM_PASSWORD", "pw-{id}")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all 18 healthy devices run release 1"), "{stdout}");
    std::thread::sleep(Duration::from_millis(500));
    let _ = watch.kill();
    let _ = watch.wait();
    let states: Vec<Value> =
        std::fs::read_to_string(&log).unwrap().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let refused: std::collections::BTreeSet<&str> = states
        .iter()
        .filter(|s| s["update"]["last_error"]["kind"] == "health_check")
        .filter_map(|s| s["device"].as_str())
        .collect();
    assert_eq!(refused.len(), 2, "the two failing devices reported why: {refused:?}");
    let running: std::collections::BTreeSet<&str> =
        states.iter().filter(|s| s["release"]["number"] == 1).filter_map(|s| s["device"].as_str()).collect();
    assert_eq!(running.len(), 18, "{running:?}");
    assert!(running.is_disjoint(&refused));
}

/// Runs one simulated device until its state messages (collected by `mosquitto_sub` into `log`)
/// satisfy `done`, or 30 s pass; returns its states, newest last.
fn simulate_until(
    broker: &Broker,
    pubdir: &Path,
    state_dir: &Path,
    prefix: &str,
    crash: Option<&str>,
    done: impl Fn(&[Value]) -> bool,
) -> (std::process::ExitStatus, Vec<Value>) {
    let log = state_dir.with_extension(format!("{prefix}.log"));
    let mut watch = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-u", "console", "-P", "pw-console", "-V", "mqttv5"])
        .args(["-t", &format!("outpost/v1/{FLEET}/devices/{prefix}-0001/state")])
        .stdout(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut sim = Command::new(outpost_tests::mqtt::outpostctl());
    sim.args(["simulate", "--devices", "1", "--id-prefix", prefix, "--fleet", FLEET, "--every", "60"])
        .arg("--root")
        .arg(pubdir.join("root-1.json"))
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--broker", &broker.address()])
        .env("OUTPOST_SIM_PASSWORD", "pw-{id}")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(c) = crash {
        sim.args(["--crash-on-apply", c]);
    }
    let mut sim = sim.spawn().unwrap();
    let states = || -> Vec<Value> {
        std::fs::read_to_string(&log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = sim.try_wait().unwrap() {
            break status;
        }
        if done(&states()) || std::time::Instant::now() > deadline {
            let _ = sim.kill();
            break sim.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(300));
    let _ = watch.kill();
    let _ = watch.wait();
    (status, states())
}

/// A release whose staging crashes the device: a panic in the update task is an ordinary
/// refusal (the agent takes the next offer); an abort of the whole process is recorded before
/// staging, so that after the restart the retained offer is refused with the reason instead of
/// crashing the device again, and again.
#[test]
fn a_release_that_crashes_the_device_while_staging_is_refused_not_retried() {
    let dir = scratch("mqtt-crash-apply");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    let ids = ["pan-0001".to_string(), "abo-0001".to_string()];
    let broker = Broker::start_with_users(&dir.join("broker"), &ids);
    let _blobs = BlobServer::start(&broker, "blobs", &[&pubdir.join("r1")]);
    publish(&broker, &pubdir, "r1", &ids.join(","));
    // The newest report of the running device (the broker then publishes its offline will).
    let refused_with = |states: &[Value], words: &str| {
        states.iter().rev().find(|s| s["online"] == true).is_some_and(|s| {
            s["update"]["state"] == "refused"
                && s["update"]["last_error"]["kind"] == "health_check"
                && s["update"]["last_error"]["reason"].as_str().is_some_and(|r| r.contains(words))
        })
    };

    // A panic: refused, and the process carries on.
    let (status, states) = simulate_until(&broker, &pubdir, &dir.join("sim"), "pan", Some("panic"), |s| {
        refused_with(s, "applying the release panicked: simulated crash while staging")
    });
    assert!(status.code().is_none() || !status.success(), "killed by the test, not ended by the panic: {status:?}");
    assert!(refused_with(&states, "panicked"), "{states:#?}");
    assert!(states.iter().all(|s| s["release"]["number"] != 1), "never applied");

    // An abort: the process dies while staging...
    let (status, _) = simulate_until(&broker, &pubdir, &dir.join("sim"), "abo", Some("abort"), |_| false);
    assert_eq!(status.signal(), Some(6), "SIGABRT: {status:?}");
    // ...and, restarted (no crash now), it refuses the retained offer it was applying.
    let (_, states) = simulate_until(&broker, &pubdir, &dir.join("sim"), "abo", None, |s| {
        refused_with(s, "stopped while applying this release")
    });
    assert!(refused_with(&states, "stopped while applying this release"), "{states:#?}");
    assert!(states.iter().all(|s| s["release"]["number"] != 1), "not applied after the restart: {states:#?}");
}
