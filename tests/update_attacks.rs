//! The update path's attack suite, in the manner of TUF's conformance tests: each malicious or
//! broken release is handed to a running daemon through `outpost update apply`, and for each we
//! assert (a) refused with its specific reason, (b) the trusted state on disk unchanged, (c) the
//! served model unchanged. Then a good release (a delta against what the device holds) applies.
//! Each attack is checked on its own: a failing one is recorded and the rest still run, and the
//! test fails at the end naming every attack that got through.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use outpost_tests::releases::{
    Fleet, model_entry, release_doc, root_version, signed, store_config, trusted_state, write_release,
};
use outpost_tests::{Daemon, free_port, outpost_bin, repo_root};
use outpost_updater::envelope::{Envelope, ROOT_TYPE};
use outpost_updater::keys::SecretKey;
use outpost_updater::release::{DeltaEntry, ReleaseDoc};
use outpost_updater::{delta, sha256_hex, time};
use serde_json::{Value, json};

fn model(name: &str) -> PathBuf {
    repo_root().join("models").join(format!("{name}.onnx"))
}

fn golden(name: &str) -> PathBuf {
    repo_root().join("models").join(format!("{name}.golden.json"))
}

/// One HTTP/1.1 exchange with the daemon: the status and the JSON answer.
fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let body = if body.is_null() { String::new() } else { body.to_string() };
    let (status, text) = outpost_tests::http(addr, method, path, &[], body.as_bytes());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// What the daemon serves as `digits`: its version and its answer to one fixed row.
fn served(addr: std::net::SocketAddr) -> (String, Value) {
    let (status, meta) = http(addr, "GET", "/v2/models/digits", &Value::Null);
    assert_eq!(status, 200, "{meta}");
    let row: Vec<f32> = (0..64).map(|i| (i % 17) as f32).collect();
    let req = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]});
    let (status, out) = http(addr, "POST", "/v2/models/digits/infer", &req);
    assert_eq!(status, 200, "{out}");
    (meta["parameters"]["version"].as_str().unwrap().to_owned(), out["outputs"].clone())
}

/// `outpost update apply DIR`: exit status and the JSON it prints.
fn apply(config: &Path, dir: &Path) -> (i32, Value) {
    let out = std::process::Command::new(outpost_bin())
        .args(["update", "apply"])
        .arg(dir)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON from update apply: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

struct Device {
    config: PathBuf,
    state: PathBuf,
    daemon: Daemon,
    /// Attacks that were not refused as they should be, with what happened instead.
    failures: std::cell::RefCell<Vec<String>>,
    cases: std::cell::Cell<usize>,
}

impl Device {
    /// Refused with `kind`, nothing trusted or served changed. A failure is recorded, and the
    /// next attack runs.
    fn assert_refused(&self, case: &str, dir: &Path, kind: &str) {
        self.cases.set(self.cases.get() + 1);
        let check = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let before = (trusted_state(&self.state), served(self.daemon.addr));
            let (code, answer) = apply(&self.config, dir);
            assert_eq!(code, 2, "{case}: {answer}");
            assert_eq!(answer["refusal"], kind, "{case}: {answer}");
            assert_eq!(trusted_state(&self.state), before.0, "{case}: the trusted state changed");
            assert_eq!(served(self.daemon.addr), before.1, "{case}: the served model changed");
            println!("{case}: refused ({})", answer["error"].as_str().unwrap());
        }));
        if let Err(panic) = check {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            self.failures.borrow_mut().push(format!("{case}: {message}"));
        }
    }

    /// Fails naming every attack that was not refused as it should be.
    fn assert_all_refused(&self) {
        let failures = self.failures.borrow();
        assert!(
            failures.is_empty(),
            "{} of {} attacks failed:\n{}",
            failures.len(),
            self.cases.get(),
            failures.join("\n")
        );
    }
}

fn re_sign_root(payload: &Value, signers: &[&SecretKey]) -> Envelope {
    let mut env = Envelope::new(ROOT_TYPE, &serde_json::to_vec(payload).unwrap());
    for s in signers {
        env.sign(s).unwrap();
    }
    env
}

#[test]
fn every_attack_is_refused_and_changes_nothing() {
    let dir = outpost_tests::scratch("attacks");
    let fleet = Fleet::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let state = dir.join("state");
    let config = store_config(&state, &addr);
    std::fs::write(dir.join("root-1.json"), fleet.root1.to_bytes()).unwrap();
    let out = std::process::Command::new(outpost_bin())
        .args(["update", "provision"])
        .arg(dir.join("root-1.json"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Release 1 (digits-edge), applied while the daemon is stopped.
    let (m1, g1) = (model("digits-edge"), golden("digits-edge"));
    let (m2, g2) = (model("digits-edge-qop"), golden("digits-edge-qop"));
    let e1 = model_entry("digits", "1", &m1, Some(&g1));
    let r1 = release_doc(1, vec![e1.clone()]);
    let r1_dir = write_release(&dir.join("r1"), &signed(&r1, &[&fleet.release_key]), &[&m1, &g1], &[]);
    let (code, answer) = apply(&config, &r1_dir);
    assert_eq!(code, 0, "{answer}");

    let device = Device {
        config: config.clone(),
        state: state.clone(),
        daemon: Daemon::serve_at(addr.parse().unwrap(), &["--config", config.to_str().unwrap()]),
        failures: Default::default(),
        cases: Default::default(),
    };
    assert_eq!(served(device.daemon.addr).0, "1");

    let e2 = model_entry("digits", "2", &m2, Some(&g2));
    let r2 = release_doc(2, vec![e2.clone()]);
    let files2: [&Path; 2] = [&m2, &g2];
    let case_dir = |name: &str| dir.join(name);
    let stranger = SecretKey::generate().unwrap();

    // Signatures and keys.
    let mut env = signed(&r2, &[&fleet.release_key]);
    env.signatures[0].sig = signed(&r1, &[&fleet.release_key]).signatures[0].sig.clone();
    device.assert_refused("bad signature", &write_release(&case_dir("bad-sig"), &env, &files2, &[]), "bad_signature");
    let env = signed(&r2, &[&stranger]);
    device.assert_refused("unknown key", &write_release(&case_dir("unknown"), &env, &files2, &[]), "unknown_key");
    let revoked = SecretKey::generate().unwrap();
    let root2 =
        root_version(2, &fleet.root_key, &[&fleet.release_key], 1, &[revoked.public().id()], &[&fleet.root_key]);
    let env = signed(&r2, &[&revoked]);
    device.assert_refused("revoked key", &write_release(&case_dir("revoked"), &env, &files2, &[&root2]), "revoked_key");
    let second = SecretKey::generate().unwrap();
    let root2t = root_version(2, &fleet.root_key, &[&fleet.release_key, &second], 2, &[], &[&fleet.root_key]);
    let env = signed(&r2, &[&fleet.release_key]);
    let d = write_release(&case_dir("threshold"), &env, &files2, &[&root2t]);
    device.assert_refused("threshold not met", &d, "threshold_not_met");

    // A weak (small-order) key slipped into a rotated root, properly signed.
    let mut weak_root: Value = serde_json::from_slice(&root2.payload(ROOT_TYPE).unwrap()).unwrap();
    let identity = format!("01{}", "00".repeat(31));
    let weak_id = sha256_hex(&hex_bytes(&identity));
    weak_root["keys"][&weak_id] = json!(identity);
    weak_root["release"]["keyids"].as_array_mut().unwrap().push(json!(weak_id));
    let weak_env = re_sign_root(&weak_root, &[&fleet.root_key]);
    let env = signed(&r2, &[&fleet.release_key]);
    device.assert_refused("weak key", &write_release(&case_dir("weak"), &env, &files2, &[&weak_env]), "weak_key");

    // A root chain with a skipped version.
    let root3 = root_version(3, &fleet.root_key, &[&fleet.release_key], 1, &[], &[&fleet.root_key]);
    let d = write_release(&case_dir("skipped-root"), &env, &files2, &[&root3]);
    device.assert_refused("root version skipped", &d, "root_version");

    // Time, number, target.
    let mut expired = r2.clone();
    let past = SystemTime::now() - Duration::from_secs(86_400);
    (expired.issued, expired.expires) = (time::format(past - Duration::from_secs(86_400)), time::format(past));
    let d = write_release(&case_dir("expired"), &signed(&expired, &[&fleet.release_key]), &files2, &[]);
    device.assert_refused("expired release", &d, "expired");
    let mut old = r2.clone();
    old.number = 1;
    let d = write_release(&case_dir("rollback"), &signed(&old, &[&fleet.release_key]), &files2, &[]);
    device.assert_refused("release number not above the current", &d, "rollback");
    device.assert_refused("replay of the current release", &r1_dir, "rollback");
    for (case, fleet_name, group) in [("another group", "demo", "lab"), ("another fleet", "other", "default")] {
        let mut other = r2.clone();
        (other.fleet, other.group) = (fleet_name.into(), group.into());
        let d = write_release(&case_dir(case), &signed(&other, &[&fleet.release_key]), &files2, &[]);
        device.assert_refused(case, &d, "wrong_target");
    }

    // Mix and match: the new model with the old release's config, under the new signatures.
    let mut with_config = r2.clone();
    with_config.models[0].config.insert("queue_bound".into(), json!(64));
    let mut env = signed(&with_config, &[&fleet.release_key]);
    let mut mixed = with_config.clone();
    mixed.models[0].config = r1.models[0].config.clone();
    env.payload =
        Envelope::new(outpost_updater::envelope::RELEASE_TYPE, &serde_json::to_vec_pretty(&mixed).unwrap()).payload;
    device.assert_refused("mix and match", &write_release(&case_dir("mix"), &env, &files2, &[]), "bad_signature");

    // Blobs: endless data, altered bytes.
    let good = signed(&r2, &[&fleet.release_key]);
    let d = write_release(&case_dir("longer"), &good, &files2, &[]);
    let blob = d.join("blobs").join(&e2.blob.sha256);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes.extend(std::iter::repeat_n(0u8, 1 << 20));
    std::fs::write(&blob, &bytes).unwrap();
    device.assert_refused("blob longer than signed", &d, "wrong_length");
    let d = write_release(&case_dir("altered"), &good, &files2, &[]);
    let blob = d.join("blobs").join(&e2.blob.sha256);
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();
    device.assert_refused("hash mismatch", &d, "hash_mismatch");
    // A blob that is a pipe (which could stall the update or never end) is refused unread.
    let d = write_release(&case_dir("fifo"), &good, &[&g2], &[]);
    let fifo = d.join("blobs").join(&e2.blob.sha256);
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    device.assert_refused("blob that is a FIFO", &d, "malformed");

    // A release whose model fails its golden check is staged, fails, and is rolled back.
    let mut bad_golden = r2.clone();
    bad_golden.models[0].golden = e1.golden.clone();
    let d = write_release(&case_dir("golden"), &signed(&bad_golden, &[&fleet.release_key]), &[&m2, &g1], &[]);
    device.assert_refused("failing health check", &d, "health_check");

    // Deltas: against the wrong base; rebuilding the wrong bytes.
    let (b1, b2) = (std::fs::read(&m1).unwrap(), std::fs::read(&m2).unwrap());
    let not_held = std::fs::read(model("digits-edge-dynamic")).unwrap();
    let wrong_base = delta::make(&not_held, &b2, delta::DEFAULT_LEVEL).unwrap().unwrap();
    let d = delta_release(&case_dir("wrong-base"), &r2, &e1.blob.sha256, &wrong_base, &g2, &fleet.release_key);
    device.assert_refused("delta against the wrong base", &d, "bad_delta");
    let mut near = b2.clone();
    let at = mid.min(near.len() - 1);
    near[at] ^= 0x01;
    let mut wrong_bytes = delta::make(&b1, &near, delta::DEFAULT_LEVEL).unwrap().unwrap();
    wrong_bytes[40..72].copy_from_slice(&hex_bytes(&e2.blob.sha256));
    let d = delta_release(&case_dir("wrong-bytes"), &r2, &e1.blob.sha256, &wrong_bytes, &g2, &fleet.release_key);
    device.assert_refused("delta rebuilding the wrong bytes", &d, "hash_mismatch");

    // Endless data from a delta: a few KB that decode to megabytes; decoding stops past the
    // signed length.
    let mut bomb_target = b2.clone();
    bomb_target.extend(std::iter::repeat_n(0u8, 8 << 20));
    let mut bomb = delta::make(&b1, &bomb_target, delta::DEFAULT_LEVEL).unwrap().unwrap();
    bomb[40..72].copy_from_slice(&hex_bytes(&e2.blob.sha256));
    bomb[72..80].copy_from_slice(&e2.blob.length.to_le_bytes());
    assert!(bomb.len() < 8 << 10, "the bomb is small: {} bytes", bomb.len());
    let d = delta_release(&case_dir("bomb"), &r2, &e1.blob.sha256, &bomb, &g2, &fleet.release_key);
    device.assert_refused("delta decoding past the signed length", &d, "wrong_length");

    // Not a document at all.
    let d = write_release(&case_dir("garbage"), &good, &files2, &[]);
    std::fs::write(d.join("release.json"), b"{\"payload_type\": 7").unwrap();
    device.assert_refused("malformed document", &d, "malformed");
    device.assert_all_refused();

    // And the good release, as a delta against the held blob, applies and serves.
    let good_delta = delta::make(&b1, &b2, delta::DEFAULT_LEVEL).unwrap().unwrap();
    let d = delta_release(&case_dir("good"), &r2, &e1.blob.sha256, &good_delta, &g2, &fleet.release_key);
    let (code, answer) = apply(&config, &d);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(answer["applied"]["from_delta"], 1, "{answer}");
    assert_eq!(served(device.daemon.addr).0, "2");
    let (status, report) = http(device.daemon.addr, "GET", "/v2/update/status", &Value::Null);
    assert_eq!((status, report["active"]["number"].as_u64()), (200, Some(2)), "{report}");
    // The store holds exactly the active and the previous release's blobs.
    let blobs: std::collections::BTreeSet<String> = std::fs::read_dir(state.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let wanted: std::collections::BTreeSet<String> =
        [&e1.blob, e1.golden.as_ref().unwrap(), &e2.blob, e2.golden.as_ref().unwrap()]
            .iter()
            .map(|b| b.sha256.clone())
            .collect();
    assert_eq!(blobs, wanted);
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

/// A release of `doc` whose model blob travels only as `delta` against `base`.
fn delta_release(dir: &Path, doc: &ReleaseDoc, base: &str, delta: &[u8], golden: &Path, key: &SecretKey) -> PathBuf {
    let mut doc = doc.clone();
    let header = delta::Header::parse(delta).unwrap();
    doc.deltas.push(DeltaEntry {
        base: base.into(),
        target: doc.models[0].blob.sha256.clone(),
        sha256: sha256_hex(delta),
        length: delta.len() as u64,
        window_log: header.window_log,
    });
    let d = write_release(dir, &signed(&doc, &[key]), &[golden], &[]);
    std::fs::create_dir_all(d.join("deltas")).unwrap();
    std::fs::write(d.join("deltas").join(sha256_hex(delta)), delta).unwrap();
    d
}
