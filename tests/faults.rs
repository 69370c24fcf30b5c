//! Faults of the machine under a serving daemon: the state directory's disk full (ENOSPC) while
//! a release is brought into the store, the state directory read-only, and a central that
//! answers after 5 s under load. Each must leave serving untouched, the store loadable, and a
//! reason reported.
//!
//! The disk faults are real: the store lives on a small tmpfs the test mounts (filled, or
//! remounted read-only). That needs root with CAP_SYS_ADMIN, as the test command has; on a
//! machine without it, `OUTPOST_NO_MOUNT=1` skips them (said on stderr), and nothing else does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use outpost_tests::releases::{Fleet, sample_release, store_config, trusted_state};
use outpost_tests::{Daemon, Server, free_port, models_dir, outpost_with_config};
use outpost_tools::http::Conn;
use serde_json::{Value, json};

fn outpost(args: &[&str], config: &Path) -> (i32, Value) {
    let (code, json, _) = outpost_with_config(args, config);
    (code, json)
}

/// A tmpfs of `kib` KiB at `dir`, unmounted on drop; `None` where mounting is not allowed.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, kib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_owned()))
    }

    fn remount(&self, options: &str) {
        let s = Command::new("mount").args(["-o", &format!("remount,{options}")]).arg(&self.0).status().unwrap();
        assert!(s.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The served `digits` model's version (from its metadata), once the release's models are in
/// (they load after the server answers).
async fn served_version(conn: &mut Conn) -> String {
    let mut r = conn.get("/v2/models/digits").await.unwrap();
    for _ in 0..200 {
        if r.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        r = conn.get("/v2/models/digits").await.unwrap();
    }
    assert_eq!(r.status, 200, "{}", r.error());
    r.json()["parameters"]["version"].as_str().unwrap().to_owned()
}

/// One golden request to `digits`: answered 200.
async fn answers(conn: &mut Conn) -> bool {
    let g = outpost_runtime::golden::Golden::read(&models_dir().join("digits-edge.golden.json")).unwrap();
    let inputs: Vec<_> = g.inputs.iter().map(|t| t.to_tensor().unwrap()).collect();
    let body = outpost_tools::v2client::json_request(&inputs);
    let r = conn.send(hyper::Method::POST, "/v2/models/digits/infer", &body.headers, body.bytes).await.unwrap();
    r.status == 200
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_or_read_only_state_disk_refuses_the_update_and_serving_goes_on() {
    let dir = outpost_tests::scratch("faults");
    let state = dir.join("state");
    if std::env::var_os("OUTPOST_NO_MOUNT").is_some() {
        eprintln!("skipped: OUTPOST_NO_MOUNT is set");
        return;
    }
    let disk = Tmpfs::mount(&state, 1024)
        .expect("cannot mount a tmpfs (needs root with CAP_SYS_ADMIN; OUTPOST_NO_MOUNT=1 skips this test)");
    let fleet = Fleet::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = store_config(&state, &addr);
    std::fs::write(dir.join("root-1.json"), fleet.root1.to_bytes()).unwrap();
    assert_eq!(outpost(&["update", "provision", dir.join("root-1.json").to_str().unwrap()], &config).0, 0);
    let r1 = sample_release(&dir, &fleet, 1, "digits", "digits-edge");
    let r2 = sample_release(&dir, &fleet, 2, "digits", "digits-central");
    assert_eq!(outpost(&["update", "apply", r1.to_str().unwrap()], &config).0, 0);
    let daemon = Daemon::serve_at(addr.parse().unwrap(), &["--config", config.to_str().unwrap()]);
    let mut conn = Conn::connect(daemon.addr).await.unwrap();
    assert_eq!(served_version(&mut conn).await, "1");

    // Disk full: leave 64 KiB, less than release 2's 200 KB model.
    let free = || {
        let out = Command::new("df").args(["--output=avail", "-B1"]).arg(&state).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    let filler = state.join("filler");
    std::fs::write(&filler, vec![0u8; (free() - (64 << 10)) as usize]).unwrap();
    let before = trusted_state(&state);
    let (code, answer) = outpost(&["update", "apply", r2.to_str().unwrap()], &config);
    assert_eq!((code, answer["refusal"].as_str()), (2, Some("storage")), "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("No space left on device"), "{answer}");
    assert_eq!(trusted_state(&state), before, "the trusted state is as it was");
    assert_eq!(served_version(&mut conn).await, "1");
    assert!(answers(&mut conn).await, "release 1 still answers");

    // Read-only (as ext4 turns itself on errors; remounted while the daemon is down, since a
    // file open for writing keeps a mount writable): the daemon starts and serves the active
    // release, and the update is refused with the reason.
    std::fs::remove_file(&filler).unwrap();
    drop(conn);
    drop(daemon);
    disk.remount("ro");
    let daemon = Daemon::serve_at(addr.parse().unwrap(), &["--config", config.to_str().unwrap()]);
    let mut conn = Conn::connect(daemon.addr).await.unwrap();
    assert_eq!(served_version(&mut conn).await, "1");
    let (code, answer) = outpost(&["update", "apply", r2.to_str().unwrap()], &config);
    assert_eq!((code, answer["refusal"].as_str()), (2, Some("storage")), "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("Read-only file system"), "{answer}");
    assert_eq!(served_version(&mut conn).await, "1");
    assert!(answers(&mut conn).await);

    // Room again: the store was loadable all along, and the update goes through.
    disk.remount("rw");
    let (code, answer) = outpost(&["update", "apply", r2.to_str().unwrap()], &config);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(served_version(&mut conn).await, "2");
    drop(conn);
    drop(daemon);
    let (code, check) = outpost(&["update", "check"], &config);
    assert_eq!(code, 0, "after a restart the store loads: {check}");
    drop(disk);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A central that answers every request after 5 s, under 16 clients for 4 s: every answer comes
/// from the edge within the escalation timeout, flagged, and the breaker opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_central_answering_in_5_s_under_load_costs_the_edge_only_its_timeout() {
    // The fault a real central cannot produce on demand: accept, read, answer 5 s later.
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let central: SocketAddr = slow.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = slow.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
                let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
            });
        }
    });
    let config = format!(
        "[[models]]\nname = \"digits\"\npath = {:?}\n[models.escalation]\ncentral_url = \"http://{central}\"\n\
         central_model = \"digits-central\"\nthreshold = 1.0\ntimeout_ms = 200\n",
        models_dir().join("digits-edge.onnx")
    );
    let edge = Server::start(&config).await;
    let row: Vec<f32> = (0..64).map(|i| (i % 17) as f32).collect();
    let body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]});
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (addr, body) = (edge.addr, body.clone());
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await.unwrap();
            let (mut n, mut slowest) = (0u32, Duration::ZERO);
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = conn.post_json("/v2/models/digits/infer", &body).await.unwrap();
                slowest = slowest.max(t.elapsed());
                assert_eq!(r.status, 200, "{}", r.error());
                assert_eq!(r.json()["parameters"]["served_by"], "local", "{}", r.json());
                n += 1;
            }
            (n, slowest)
        }));
    }
    let (mut total, mut slowest) = (0, Duration::ZERO);
    for c in clients {
        let (n, s) = c.await.unwrap();
        total += n;
        slowest = slowest.max(s);
    }
    let mut conn = edge.conn().await;
    let metrics = String::from_utf8(conn.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    let breaker = metrics.lines().find(|l| l.starts_with("outpost_central_breaker_state{")).unwrap_or_default();
    println!("slow central: {total} answers from 16 clients in 4 s, slowest {slowest:?}; {breaker}");
    assert!(total > 16, "requests kept being answered: {total}");
    // The timeout (200 ms) bounds each answer; the rest is queueing on a shared 2-core box.
    assert!(slowest < Duration::from_secs(5), "an answer waited for the central: {slowest:?}");
    assert!(breaker.ends_with(" 1") || breaker.ends_with(" 2"), "the breaker opened: {breaker}");
}
