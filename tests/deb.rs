//! The `.deb`s (built by `cross/build-deb.sh x86_64`, `aarch64` and `armv7`, which the test
//! command runs first): each installed into an empty root with `dpkg --root`, its files where the
//! unit and the packaged config expect them, the packaged binary serving the packaged models with
//! the packaged config (arm64 under `qemu-aarch64`, armhf under `qemu-arm`), then removed and
//! purged without leaving a file behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_tests::{Daemon, repo_root};

fn deb(arch: &str) -> PathBuf {
    let dir = repo_root().join("target/debian");
    let found = std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(&format!("_{arch}.deb")));
    found.unwrap_or_else(|| panic!("no {arch} .deb in {}: run cross/build-deb.sh (tools/test.sh does)", dir.display()))
}

fn dpkg(root: &Path, args: &[&str]) -> String {
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-not-root", "--log=/dev/null"])
        .args(args)
        .output()
        .expect("dpkg runs");
    assert!(
        out.status.success(),
        "dpkg {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `root` but dpkg's own database.
fn files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel.starts_with("var/lib/dpkg") {
                continue;
            }
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn the_amd64_package_installs_serves_and_removes_cleanly() {
    if cfg!(target_arch = "x86_64") {
        install_serve_remove("amd64", &[]);
    }
}

#[test]
fn the_arm64_package_installs_serves_under_qemu_and_removes_cleanly() {
    if cfg!(target_arch = "x86_64") {
        install_serve_remove("arm64", &["qemu-aarch64"]);
    }
}

#[test]
fn the_armhf_package_installs_serves_under_qemu_and_removes_cleanly() {
    if cfg!(target_arch = "x86_64") {
        install_serve_remove("armhf", &["qemu-arm"]);
    }
}

fn install_serve_remove(arch: &str, runner: &[&str]) {
    let root = std::env::temp_dir().join(format!("outpost-deb-{arch}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.join(f), "").unwrap();
    }

    // A foreign architecture's package installs only when told so (this host is x86_64).
    dpkg(&root, &["--force-architecture", "--install", deb(arch).to_str().unwrap()]);
    let listed = dpkg(&root, &["--listfiles", "outpost"]);
    for want in [
        "/usr/bin/outpost",
        "/lib/systemd/system/outpost.service",
        "/etc/outpost/outpost.toml",
        "/usr/share/outpost/models/digits-edge.onnx",
        "/usr/share/doc/outpost/copyright",
    ] {
        assert!(listed.lines().any(|l| l == want), "{want} not in the package:\n{listed}");
        assert!(root.join(&want[1..]).is_file(), "{want} not installed");
    }
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/outpost.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/outpost serve --config /etc/outpost/outpost.toml"), "{unit}");
    let status = dpkg(&root, &["--status", "outpost"]);
    assert!(
        status.contains("Status: install ok installed") && status.contains(&format!("Architecture: {arch}")),
        "{status}"
    );

    // The packaged binary serves the packaged models with the packaged config (its absolute
    // paths moved under the test root).
    let config = std::fs::read_to_string(root.join("etc/outpost/outpost.toml"))
        .unwrap()
        .replace("\"/usr/share/", &format!("\"{}/usr/share/", root.display()));
    let moved = root.join("outpost.toml");
    std::fs::write(&moved, config).unwrap();
    let bin = root.join("usr/bin/outpost");
    let args = ["--config", moved.to_str().unwrap()];
    let daemon = Daemon::serve_with(&bin, runner, &args);
    // Ready (strict: every configured model loaded and golden-checked), then one model asked.
    let (status, reply) = outpost_tests::http(daemon.addr, "GET", "/v2/models/digits-cnn", &[], b"");
    assert!(status == 200 && reply.contains("\"name\":\"digits-cnn\""), "{status} {reply}");
    drop(daemon);
    std::fs::remove_file(&moved).unwrap();

    // Remove keeps the conffile (Debian policy); purge takes it too. Nothing else remains.
    dpkg(&root, &["--remove", "outpost"]);
    assert_eq!(files(&root), vec!["etc/outpost/outpost.toml".to_string()]);
    dpkg(&root, &["--purge", "outpost"]);
    assert_eq!(files(&root), Vec::<String>::new(), "purge leaves nothing");
    let _ = std::fs::remove_dir_all(&root);
}
