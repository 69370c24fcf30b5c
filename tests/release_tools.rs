//! The publisher's commands end to end, as an operator runs them: `outpostctl keys gen`, `root
//! create`, `sign`, `release create`, `delta`, `release sign|verify|show`, then `outpost update
//! provision|apply|status` on a stopped device. Also: `release verify` refuses a tampered release,
//! and deltas cannot be added to a signed release.

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_tests::{outpost_bin, repo_root};
use serde_json::Value;

fn outpostctl() -> PathBuf {
    outpost_bin().with_file_name(format!("outpostctl{}", std::env::consts::EXE_SUFFIX))
}

/// Runs a command in `dir`; returns (success, stdout, stderr).
fn run(bin: &Path, args: &[&str], dir: &Path) -> (bool, String, String) {
    let out = Command::new(bin).args(args).current_dir(dir).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn ok(bin: &Path, args: &[&str], dir: &Path) -> String {
    let (success, stdout, stderr) = run(bin, args, dir);
    assert!(success, "{} {args:?} failed:\n{stdout}\n{stderr}", bin.display());
    stdout
}

fn spec(dir: &Path, number: u64, model: &str) -> String {
    let models = repo_root().join("models");
    let name = format!("r{number}.toml");
    std::fs::write(
        dir.join(&name),
        format!(
            "fleet = \"demo\"\nnumber = {number}\n[[models]]\nname = \"digits\"\nversion = \"{number}\"\n\
             path = {:?}\ngolden = {:?}\n[models.config]\nqueue_bound = 64\n",
            models.join(format!("{model}.onnx")),
            models.join(format!("{model}.golden.json"))
        ),
    )
    .unwrap();
    name
}

#[test]
fn an_operator_makes_signs_and_applies_releases_with_the_commands() {
    let dir = outpost_tests::scratch("release-tools");
    let ctl = outpostctl();
    ok(&ctl, &["keys", "gen", "root"], &dir);
    ok(&ctl, &["keys", "gen", "release"], &dir);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.join("root.key")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "secret keys are private");
    let (again, _, err) = run(&ctl, &["keys", "gen", "root"], &dir);
    assert!(!again, "an existing key is never overwritten: {err}");
    ok(
        &ctl,
        &[
            "root",
            "create",
            "--fleet",
            "demo",
            "--root-key",
            "root.pub",
            "--release-key",
            "release.pub",
            "-o",
            "root-1.json",
        ],
        &dir,
    );
    ok(&ctl, &["sign", "root-1.json", "--key", "root.key"], &dir);

    let r1 = spec(&dir, 1, "digits-edge");
    ok(&ctl, &["release", "create", &r1, "-o", "r1"], &dir);
    ok(&ctl, &["release", "sign", "r1", "--key", "release.key"], &dir);
    let r2 = spec(&dir, 2, "successors/digits-edge-head");
    ok(&ctl, &["release", "create", &r2, "-o", "r2"], &dir);
    let table = ok(&ctl, &["delta", "r2", "--base", "r1"], &dir);
    assert!(table.lines().any(|l| l.starts_with("digits") && l.contains("model") && l.contains('%')), "{table}");
    ok(&ctl, &["release", "sign", "r2", "--key", "release.key"], &dir);
    let (added, _, err) = run(&ctl, &["delta", "r2", "--base", "r1"], &dir);
    assert!(!added && err.contains("already signed"), "{err}");
    let verified = ok(&ctl, &["release", "verify", "r2", "--root", "root-1.json"], &dir);
    assert!(verified.contains("verify"), "{verified}");
    let shown = ok(&ctl, &["release", "show", "r2"], &dir);
    assert!(shown.contains("\"deltas\"") && shown.contains("\"queue_bound\": 64"), "{shown}");

    // A tampered blob fails verification.
    let tampered = dir.join("tampered");
    assert!(Command::new("cp").arg("-a").arg(dir.join("r2")).arg(&tampered).status().unwrap().success());
    let blob = std::fs::read_dir(tampered.join("blobs")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let (passed, _, err) = run(&ctl, &["release", "verify", "tampered", "--root", "root-1.json"], &dir);
    assert!(!passed && err.contains("differs"), "{err}");

    // A device, daemon stopped.
    std::fs::write(dir.join("outpost.toml"), "[updates]\nstate_dir = \"state\"\nfleet = \"demo\"\n").unwrap();
    let out = ok(&outpost_bin(), &["update", "provision", "root-1.json"], &dir);
    assert!(out.contains("root version 1"), "{out}");
    ok(&outpost_bin(), &["update", "apply", "r1"], &dir);
    let applied: Value = serde_json::from_str(&ok(&outpost_bin(), &["update", "apply", "r2"], &dir)).unwrap();
    assert_eq!(applied["applied"]["from_delta"], 2, "model and golden file both came as deltas: {applied}");
    let status: Value = serde_json::from_str(&ok(&outpost_bin(), &["update", "status"], &dir)).unwrap();
    assert_eq!(status["active"]["number"], 2, "{status}");
    assert_eq!(status["last_update"]["result"], "applied", "{status}");
    let (replayed, stdout, _) = run(&outpost_bin(), &["update", "apply", "r1"], &dir);
    assert!(!replayed && stdout.contains("\"refusal\": \"rollback\""), "{stdout}");
}
