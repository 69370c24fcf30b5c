//! Crash consistency of the store: `outpost update apply` is SIGKILLed before each durable step
//! of an update in turn (every write, fsync, rename, fsync-dir and removal; the store's test hook
//! pauses the process there), and after each kill the store must hold the old or the new release
//! whole: `outpost update check` loads it and passes its golden check, and applying again
//! finishes the update. Also: a damaged active release falls back to the previous one at start.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use outpost_tests::releases::{Fleet, model_entry, release_doc, root_version, signed, store_config, write_release};
use outpost_tests::{outpost_bin, outpost_with_config, repo_root};
use outpost_updater::release::DeltaEntry;
use outpost_updater::{delta, sha256_hex};

fn models(rel: &str) -> PathBuf {
    repo_root().join("models").join(rel)
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    assert!(Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap().success());
}

/// Runs `update apply` paused before durable step `step`; kills it there with SIGKILL.
/// Returns false when the update finished before reaching that step.
fn apply_killed_at(config: &Path, dir: &Path, step: u64) -> bool {
    let mut child = Command::new(outpost_bin())
        .args(["update", "apply"])
        .arg(dir)
        .arg("--config")
        .arg(config)
        .env(outpost_updater::store::PAUSE_ENV, step.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        if line.unwrap().contains(&format!("paused before update step {step}:")) {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return true;
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "the update failed without being killed at step {step}");
    false
}

/// The active release number after a restart, checked by loading it (golden check included).
fn active_after_restart(config: &Path) -> u64 {
    let (code, status, err) = outpost_with_config(&["update", "check"], config);
    assert_eq!(code, 0, "check failed: {err}");
    status["active"]["number"].as_u64().unwrap_or_else(|| panic!("no active release: {status}"))
}

struct Scenario {
    name: &'static str,
    /// The store with release 1 applied.
    template: PathBuf,
    release2: PathBuf,
}

fn scenarios(dir: &Path) -> Vec<Scenario> {
    let fleet = Fleet::new();
    let (m1, g1) = (models("digits-edge.onnx"), models("digits-edge.golden.json"));
    let e1 = model_entry("digits", "1", &m1, Some(&g1));
    let r1 = write_release(
        &dir.join("r1"),
        &signed(&release_doc(1, vec![e1.clone()]), &[&fleet.release_key]),
        &[&m1, &g1],
        &[],
    );
    std::fs::write(dir.join("root-1.json"), fleet.root1.to_bytes()).unwrap();

    let mut out = Vec::new();
    let successor =
        |name: &str| (models(&format!("successors/{name}.onnx")), models(&format!("successors/{name}.golden.json")));

    // Full blobs.
    let (m, g) = successor("digits-edge-head");
    let doc = release_doc(2, vec![model_entry("digits", "2", &m, Some(&g))]);
    out.push(("full", write_release(&dir.join("r2-full"), &signed(&doc, &[&fleet.release_key]), &[&m, &g], &[])));

    // The model as a delta against the held blob.
    let (m, g) = successor("digits-edge-requant");
    let mut doc = release_doc(2, vec![model_entry("digits", "2", &m, Some(&g))]);
    let d =
        delta::make(&std::fs::read(&m1).unwrap(), &std::fs::read(&m).unwrap(), delta::DEFAULT_LEVEL).unwrap().unwrap();
    doc.deltas.push(DeltaEntry {
        base: e1.blob.sha256.clone(),
        target: doc.models[0].blob.sha256.clone(),
        sha256: sha256_hex(&d),
        length: d.len() as u64,
        window_log: delta::Header::parse(&d).unwrap().window_log,
    });
    let rd = write_release(&dir.join("r2-delta"), &signed(&doc, &[&fleet.release_key]), &[&g], &[]);
    std::fs::create_dir_all(rd.join("deltas")).unwrap();
    std::fs::write(rd.join("deltas").join(sha256_hex(&d)), &d).unwrap();
    out.push(("delta", rd));

    // Two models and a root rotation.
    let (m, g) = successor("digits-edge-retrain");
    let (c, cg) = (models("digits-cnn.onnx"), models("digits-cnn.golden.json"));
    let doc = release_doc(2, vec![model_entry("digits", "2", &m, Some(&g)), model_entry("cnn", "1", &c, Some(&cg))]);
    let new_release_key = outpost_updater::keys::SecretKey::generate().unwrap();
    let root2 = root_version(2, &fleet.root_key, &[&new_release_key], 1, &[], &[&fleet.root_key]);
    let env = signed(&doc, &[&new_release_key]);
    out.push(("two models + root rotation", write_release(&dir.join("r2-two"), &env, &[&m, &g, &c, &cg], &[&root2])));

    out.into_iter()
        .map(|(name, release2)| {
            let template = dir.join(format!("template-{}", name.split(' ').next().unwrap()));
            let config = store_config(&template, "127.0.0.1:1");
            assert_eq!(
                outpost_with_config(&["update", "provision", dir.join("root-1.json").to_str().unwrap()], &config).0,
                0
            );
            let (code, answer, err) = outpost_with_config(&["update", "apply", r1.to_str().unwrap()], &config);
            assert_eq!(code, 0, "{answer} {err}");
            Scenario { name, template, release2 }
        })
        .collect()
}

#[test]
fn a_kill_at_any_step_leaves_the_old_or_the_new_release_whole() {
    let dir = outpost_tests::scratch("crash");
    let state = dir.join("state");
    // Port 1: no daemon answers, and none is needed: the killed process held the store.
    let config = store_config(&state, "127.0.0.1:1");
    let mut runs = 0;
    for s in scenarios(&dir) {
        let (mut old, mut new) = (0, 0);
        for step in 1.. {
            copy_dir(&s.template, &state);
            if !apply_killed_at(&config, &s.release2, step) {
                assert_eq!(active_after_restart(&config), 2, "{}: the uninterrupted update", s.name);
                println!(
                    "{}: {} durable steps; after a kill: old release {old} times, new {new} times",
                    s.name,
                    step - 1
                );
                assert!(old > 0 && new > 0, "{}: both outcomes occur", s.name);
                break;
            }
            runs += 1;
            match active_after_restart(&config) {
                1 => old += 1,
                2 => new += 1,
                n => panic!("{}: step {step}: release {n} active", s.name),
            }
            // The interrupted update can be finished (or was already committed).
            let (code, answer, err) = outpost_with_config(&["update", "apply", s.release2.to_str().unwrap()], &config);
            assert!(code == 0 || answer["refusal"] == "rollback", "{}: step {step}: {answer} {err}", s.name);
            assert_eq!(active_after_restart(&config), 2, "{}: step {step}: after re-applying", s.name);
        }
    }
    println!("{runs} killed runs");
    assert!(runs >= 50, "only {runs} kill points");
}

#[test]
fn a_damaged_active_release_falls_back_to_the_previous_at_start() {
    let dir = outpost_tests::scratch("damage");
    let s = scenarios(&dir).into_iter().next().unwrap();
    let state = dir.join("state");
    copy_dir(&s.template, &state);
    let config = store_config(&state, "127.0.0.1:1");
    let (code, answer, err) = outpost_with_config(&["update", "apply", s.release2.to_str().unwrap()], &config);
    assert_eq!(code, 0, "{answer} {err}");
    // Damage the active release's model blob.
    let (m, _) = (models("successors/digits-edge-head.onnx"), ());
    let blob = state.join("blobs").join(sha256_hex(&std::fs::read(m).unwrap()));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let (code, status, err) = outpost_with_config(&["update", "check"], &config);
    assert_eq!(code, 0, "{err}");
    assert_eq!(status["active"]["number"], 1, "{status}");
    assert!(status["fell_back"].as_str().unwrap().contains("damaged"), "{status}");
    // The same signed release repairs the box, although its number is not above the last one.
    let (code, answer, err) = outpost_with_config(&["update", "apply", s.release2.to_str().unwrap()], &config);
    assert_eq!(code, 0, "{answer} {err}");
    assert_eq!(active_after_restart(&config), 2);
    // Once repaired, the allowance is gone: the same release again is a replay.
    let (code, answer, _) = outpost_with_config(&["update", "apply", s.release2.to_str().unwrap()], &config);
    assert_eq!((code, answer["refusal"].as_str()), (2, Some("rollback")), "{answer}");
}
