//! The daemon under systemd: `sd_notify` over a test socket given as `NOTIFY_SOCKET` (READY=1
//! only once the models are warm, WATCHDOG=1 pings at half of `WATCHDOG_USEC`, STOPPING=1 on
//! SIGTERM), and the unit file checked by `systemd-analyze verify`, which must print nothing.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost_tests::{free_port, outpost_bin, repo_root};

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn ready(addr: &str) -> bool {
    outpost_tests::http(addr.parse().unwrap(), "GET", "/v2/health/ready", &[], b"").0 == 200
}

#[test]
fn the_daemon_speaks_sd_notify() {
    let dir = outpost_tests::scratch("notify");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(outpost_bin())
        .args(["serve", "--model", "models/digits-edge.onnx", "--model", "models/digits-cnn.onnx", "--listen", &addr])
        .current_dir(repo_root())
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let first = recv(&sock);
    assert!(first.starts_with("STATUS=loading 2 models"), "{first}");
    let readiness = recv(&sock);
    assert!(readiness.starts_with("READY=1\nSTATUS=serving 2 models"), "{readiness}");
    assert!(ready(&addr), "READY=1 came before the models were ready");

    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1000) {
        let m = recv(&sock);
        assert_eq!(m, "WATCHDOG=1");
        pings += 1;
    }
    // Every 100 ms for a 200 ms watchdog: about ten in a second; at least a few on a busy box.
    assert!(pings >= 4, "{pings} watchdog pings in a second");

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let mut stopping = false;
    for _ in 0..50 {
        let m = recv(&sock);
        if m.starts_with("STOPPING=1") {
            stopping = true;
            break;
        }
        assert_eq!(m, "WATCHDOG=1");
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    assert!(child.wait().unwrap().success());
}

#[test]
fn the_unit_file_verifies_cleanly() {
    // verify resolves ExecStart: check a copy that points at the binary just built.
    let unit = std::fs::read_to_string(repo_root().join("cross/systemd/outpost.service")).unwrap();
    let dir = outpost_tests::scratch("unit");
    let copy = dir.join("outpost.service");
    std::fs::write(&copy, unit.replace("/usr/bin/outpost", outpost_bin().to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian package systemd) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // systemd-analyze exits 0 on many bad values: any message is a failure.
    let relevant: Vec<&str> = stderr.lines().filter(|l| l.contains("outpost.service")).collect();
    assert!(out.status.success() && relevant.is_empty(), "systemd-analyze verify:\n{stderr}");
}
