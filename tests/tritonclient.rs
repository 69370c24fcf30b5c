//! The real `tritonclient[http]` Python package against the real `outpost` binary.

use outpost_tests::{Daemon, models_dir, python, repo_root};

#[test]
fn tritonclient_http_works_unchanged() {
    let daemon = Daemon::serve(&["--model", "models/digits-edge.onnx", "--model", "models/digits-cnn.onnx"]);
    let out = std::process::Command::new(python())
        .arg(repo_root().join("tests/tritonclient_check.py"))
        .arg(daemon.addr.to_string())
        .arg(models_dir())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tritonclient checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("tritonclient checks passed"), "{stdout}");
    println!("{stdout}");
}
