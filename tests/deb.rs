//! The `.deb`s (built by `cross/build-deb.sh` for x86_64, aarch64 and armv7, and in the `ort`
//! flavour for x86_64 and aarch64, which the test command runs first): each installed into an
//! empty root with `dpkg --root`, its files where the unit and the packaged config expect them, the
//! packaged binary serving the packaged models with the packaged config (arm64 under
//! `qemu-aarch64`, armhf under `qemu-arm`), then removed and purged without leaving a file behind.
//! `outpost-ort` serves twice: without a `libonnxruntime.so` the dynamic loader can find (tract
//! alone), then with the one from PyPI's `onnxruntime` wheel where the loader looks (both backends
//! prepare each model and the faster serves it).

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_tests::{Daemon, repo_root};

fn deb(package: &str, arch: &str) -> PathBuf {
    let dir = repo_root().join("target/debian");
    let found = std::fs::read_dir(&dir).ok().into_iter().flatten().flatten().map(|e| e.path()).find(|p| {
        let name = p.file_name().unwrap().to_string_lossy();
        name.starts_with(&format!("{package}_")) && name.ends_with(&format!("_{arch}.deb"))
    });
    found.unwrap_or_else(|| {
        panic!("no {package} {arch} .deb in {}: run cross/build-deb.sh (tools/test.sh does)", dir.display())
    })
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
        install_serve_remove("outpost", "amd64", &[], None);
    }
}

#[test]
fn the_arm64_package_installs_serves_under_qemu_and_removes_cleanly() {
    if cfg!(target_arch = "x86_64") {
        install_serve_remove("outpost", "arm64", &["qemu-aarch64"], None);
    }
}

#[test]
fn the_armhf_package_installs_serves_under_qemu_and_removes_cleanly() {
    if cfg!(target_arch = "x86_64") {
        install_serve_remove("outpost", "armhf", &["qemu-arm"], None);
    }
}

#[test]
fn the_amd64_ort_package_serves_on_tract_alone_then_with_onnx_runtime_and_removes_cleanly() {
    if cfg!(target_arch = "x86_64") {
        install_serve_remove("outpost-ort", "amd64", &[], Some(outpost_tests::ort_library()));
    }
}

#[test]
fn the_arm64_ort_package_serves_under_qemu_on_tract_alone_then_with_onnx_runtime() {
    if cfg!(target_arch = "x86_64") {
        let lib = repo_root().join("target/cross-tools/onnxruntime-aarch64/libonnxruntime.so");
        assert!(lib.is_file(), "no {}: run cross/fetch-onnxruntime.sh aarch64 (tools/test.sh does)", lib.display());
        let runner = outpost_tests::qemu_aarch64_glibc();
        let runner: Vec<&str> = runner.iter().map(String::as_str).collect();
        install_serve_remove("outpost-ort", "arm64", &runner, Some(lib));
    }
}

/// Installs `package` for `arch` into an empty root, serves the packaged config with the packaged
/// binary (under `runner`), and removes and purges it. With `ort_library` (an `outpost-ort`
/// package), it serves twice: with no ONNX Runtime the loader can find, then with `ort_library`
/// in a folder on the loader's search path, as a box would have it in /usr/local/lib.
fn install_serve_remove(package: &str, arch: &str, runner: &[&str], ort_library: Option<PathBuf>) {
    let root = outpost_tests::scratch(&format!("deb-{package}-{arch}"));
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.join(f), "").unwrap();
    }

    // A foreign architecture's package installs only when told so (this host is x86_64); the
    // ort flavour's dependencies (glibc, libgcc) are the host's, not in the empty root.
    let deb = deb(package, arch);
    dpkg(&root, &["--force-architecture", "--force-depends", "--install", deb.to_str().unwrap()]);
    let listed = dpkg(&root, &["--listfiles", package]);
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
    let status = dpkg(&root, &["--status", package]);
    assert!(
        status.contains("Status: install ok installed") && status.contains(&format!("Architecture: {arch}")),
        "{status}"
    );
    let other = if package == "outpost" { "outpost-ort" } else { "outpost" };
    assert!(status.contains(&format!("Conflicts: {other}")), "the two flavours must conflict: {status}");

    // The packaged binary serves the packaged models with the packaged config (its absolute
    // paths moved under the test root).
    let config = std::fs::read_to_string(root.join("etc/outpost/outpost.toml"))
        .unwrap()
        .replace("\"/usr/share/", &format!("\"{}/usr/share/", root.display()));
    let moved = root.join("outpost.toml");
    std::fs::write(&moved, config).unwrap();
    let bin = root.join("usr/bin/outpost");
    let args = ["--config", moved.to_str().unwrap()];
    match ort_library {
        None => {
            let daemon = Daemon::serve_with(&bin, runner, &args);
            assert_served(&daemon, "tract", "only");
        }
        Some(library) => {
            // A folder on the loader's path, first empty (no ONNX Runtime on the box), then
            // with libonnxruntime.so in it.
            let search = root.join("usr/local/lib");
            std::fs::create_dir_all(&search).unwrap();
            let daemon = Daemon::serve_command(with_loader_path(&bin, runner, &search), &args);
            assert_served(&daemon, "tract", "only");
            let log = daemon.log();
            assert!(log.contains("libonnxruntime.so"), "the log names the library it did not find:\n{log}");
            drop(daemon);

            std::os::unix::fs::symlink(&library, search.join("libonnxruntime.so")).unwrap();
            let daemon = Daemon::serve_command(with_loader_path(&bin, runner, &search), &args);
            assert!(daemon.log().contains("ONNX Runtime loaded"), "{}", daemon.log());
            // Both backends prepared the float model and were timed on it; the faster serves.
            let meta = metadata(&daemon, "digits-edge");
            assert_eq!(meta["parameters"]["backend_choice"]["by"], "measured", "{meta}");
            std::fs::remove_dir_all(&search).unwrap();
        }
    }
    std::fs::remove_file(&moved).unwrap();

    // Remove keeps the conffile (Debian policy); purge takes it too. Nothing else remains.
    dpkg(&root, &["--remove", package]);
    assert_eq!(files(&root), vec!["etc/outpost/outpost.toml".to_string()]);
    dpkg(&root, &["--purge", package]);
    assert_eq!(files(&root), Vec::<String>::new(), "purge leaves nothing");
}

/// The command that runs `bin` (under `runner`) with `dir` as the loader's library path (the
/// guest's, under an emulator) and without `ORT_DYLIB_PATH` (the test command sets one), so ONNX
/// Runtime is found as on a box, or not at all.
fn with_loader_path(bin: &Path, runner: &[&str], dir: &Path) -> Command {
    let mut cmd = Daemon::command(bin, runner, &[("LD_LIBRARY_PATH", &dir.display().to_string())]);
    cmd.env_remove("ORT_DYLIB_PATH");
    cmd
}

fn metadata(daemon: &Daemon, model: &str) -> serde_json::Value {
    let (status, reply) = outpost_tests::http(daemon.addr, "GET", &format!("/v2/models/{model}"), &[], b"");
    assert_eq!(status, 200, "{reply}");
    serde_json::from_str(&reply).unwrap()
}

/// Every packaged model is ready (the daemon was: strict, each loaded and golden-checked) on
/// `backend`, chosen `by`.
fn assert_served(daemon: &Daemon, backend: &str, by: &str) {
    for model in ["digits-edge", "digits-cnn"] {
        let meta = metadata(daemon, model);
        assert_eq!(meta["name"], model, "{meta}");
        assert_eq!(meta["parameters"]["backend"], backend, "{meta}");
        assert_eq!(meta["parameters"]["backend_choice"]["by"], by, "{meta}");
    }
}
