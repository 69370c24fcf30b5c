//! The fleet console end to end: real Mosquitto (the repository's config and ACL), the console
//! with its database (SQLite, and the same rollouts again on a real PostgreSQL) and built-in
//! blob server, `outpostctl simulate` fleets running the
//! real agent and updater, and the `outpostctl` client commands. The web page is checked in
//! headless Chromium.

use std::path::Path;
use std::time::Duration;

use outpost_tests::console::{Console, Sim, TOKEN, ids};
use outpost_tests::mqtt::{Broker, FLEET, ctl, publisher, wait_for};
use outpost_tests::scratch;
use outpost_tests::{postgres, repo_root};
use serde_json::Value;

fn count(r: &Value, status: &str) -> u64 {
    r["counts"][status].as_u64().unwrap_or(0)
}

fn start(console: &Console, args: &[&str]) -> u64 {
    let mut a = vec!["rollout", "start", "--fleet", FLEET];
    a.extend_from_slice(args);
    console.json(&a)["id"].as_u64().unwrap()
}

/// Devices whose state shows release `number`.
fn on_release(console: &Console, number: u64) -> usize {
    console.json(&["fleet", "ls"]).as_array().unwrap().iter().filter(|d| d["release"] == number).count()
}

#[test]
fn a_four_wave_rollout_survives_a_console_kill_and_reaches_late_joiners() {
    four_waves("waves", &[]);
}

#[test]
fn a_four_wave_rollout_on_postgresql() {
    four_waves("waves-pg", &["--database", &postgres::database("waves")]);
}

fn four_waves(name: &str, console_args: &[&str]) {
    let dir = scratch(&format!("console-{name}"));
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    let root = pubdir.join("root-1.json");
    let mut users = ids("sim", 52);
    users.extend(ids("late", 2));
    users.extend(ids("odd", 1));
    let broker = Broker::start_with_users(&dir.join("broker"), &users);
    let mut console = Console::start_named(&dir, &broker, &root, "console", console_args);
    let _sim = Sim::start(&dir, &broker, &root, "sim", 52, &[]);
    wait_for(Duration::from_secs(30), "52 devices online", || (console.online() == 52).then_some(()));

    // Upload: objects first, then the signed release; a second upload sends nothing.
    let out = console.ctl(&["release", "upload", pubdir.join("r1").to_str().unwrap()]);
    assert!(out.contains("is now on the console"), "{out}");
    let again = console.ctl(&["release", "upload", pubdir.join("r1").to_str().unwrap()]);
    assert!(again.contains("was already") && again.contains(" 0 of "), "{again}");
    let releases = console.json(&["release", "ls"]);
    assert_eq!(releases[0]["number"], 1, "{releases}");

    let id = start(&console, &["--number", "1", "--waves", "1,10%,50%,100%", "--soak", "1", "--errors", "0"]);
    // Kill the console in the middle (wave 3 open), then start it again on the same database.
    let mid = wait_for(Duration::from_secs(60), "wave 3 to open", || {
        let r = console.rollout(id);
        (r["wave"].as_u64() >= Some(3)).then_some(r)
    });
    console.kill();
    console.restart();
    let r = console.wait_rollout(id, "completed", Duration::from_secs(90));
    assert_eq!(count(&r, "succeeded"), 52, "{r:#}");
    assert_eq!(count(&r, "failed") + count(&r, "timed_out"), 0, "{r:#}");
    // Waves: 1 device, then up to 10% (6), 50% (26), 100% (52).
    let sizes: Vec<u64> = r["waves"].as_array().unwrap().iter().map(|w| w["size"].as_u64().unwrap()).collect();
    assert_eq!(sizes, [1, 5, 20, 26], "{r:#}");
    for w in r["waves"].as_array().unwrap() {
        assert_eq!(w["counts"]["succeeded"], w["size"], "every wave fully succeeded: {w}");
    }
    assert!(mid["counts"]["succeeded"].as_u64().unwrap() < 52, "the kill came mid-rollout: {mid:#}");
    // Exactly one offer per device, across the restart: the event log says so.
    let events: Vec<Value> = console_events(&console);
    let mut offers = std::collections::BTreeMap::<&str, usize>::new();
    for e in events.iter().filter(|e| e["kind"] == "offered" && e["rollout"] == id) {
        *offers.entry(e["device"].as_str().unwrap()).or_default() += 1;
    }
    assert!(offers.values().all(|n| *n == 1), "no device offered twice across the restart: {offers:?}");
    assert!(offers.len() >= 51, "{offers:?}");
    assert_eq!(on_release(&console, 1), 52);

    // Late joiners: devices that first appear after the rollout completed get the release.
    let _late = Sim::start(&dir, &broker, &root, "late", 2, &["--label", "ring=late"]);
    wait_for(Duration::from_secs(30), "the late devices to run release 1", || {
        let fleet = console.json(&["fleet", "ls"]);
        let late = fleet.as_array().unwrap().iter().filter(|d| d["id"].as_str().unwrap().starts_with("late-"));
        (late.filter(|d| d["release"] == 1).count() == 2).then_some(())
    });
    let r = console.rollout(id);
    assert_eq!(r["devices"], 54, "{r:#}");
    assert_eq!(count(&r, "succeeded"), 54, "{r:#}");
    // The device page's history tells the story.
    let d = console.device("late-0001");
    let kinds: Vec<&str> = d["history"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"joined") && kinds.contains(&"offered") && kinds.contains(&"succeeded"), "{kinds:?}");

    // A label selector: release 2 only to `ring=late`, where one more device refuses releases.
    let _odd = Sim::start(&dir, &broker, &root, "odd", 1, &["--label", "ring=late", "--refuse", "1"]);
    wait_for(Duration::from_secs(30), "odd-0001 online", || (console.online() == 55).then_some(()));
    console.ctl(&["release", "upload", pubdir.join("r2").to_str().unwrap()]);
    let id2 = start(
        &console,
        &["--number", "2", "--waves", "100%", "--label", "ring=late", "--success-pct", "50", "--errors", "1"],
    );
    let r = console.wait_rollout(id2, "completed", Duration::from_secs(60));
    assert_eq!(r["devices"], 3, "{r:#}");
    assert_eq!(count(&r, "succeeded"), 2, "{r:#}");
    assert_eq!(r["failures"][0]["device"], "odd-0001", "{r:#}");
    assert_eq!(r["failures"][0]["reason"], "policy: simulated refusal", "{r:#}");
    assert_eq!(on_release(&console, 2), 2);
    assert_eq!(on_release(&console, 1), 52, "devices without the label stay on release 1");
}

/// The event log, through the API (the CLI has no command for it).
fn console_events(console: &Console) -> Vec<Value> {
    serde_json::from_value(http_get(console.port, "/api/events?limit=5000")).unwrap()
}

/// A GET with the token.
fn http_get(port: u16, path: &str) -> Value {
    let auth = format!("Bearer {TOKEN}");
    let (status, body) =
        outpost_tests::http(([127, 0, 0, 1], port).into(), "GET", path, &[("authorization", &auth)], b"");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {status} {body}"))
}

/// Makes release 5: digits-edge again (what release 1 ran), numbered above everything since.
fn rollback_release(pubdir: &Path) {
    let models = repo_root().join("models");
    std::fs::write(
        pubdir.join("r5.toml"),
        format!(
            "fleet = \"{FLEET}\"\nnumber = 5\nchunk_size = 1024\n[[models]]\nname = \"digits\"\nversion = \"1\"\n\
             path = {:?}\ngolden = {:?}\n",
            models.join("digits-edge.onnx"),
            models.join("digits-edge.golden.json")
        ),
    )
    .unwrap();
    ctl(pubdir, &["release", "create", "r5.toml", "-o", "r5"]);
    ctl(pubdir, &["delta", "r5", "--base", "r3"]);
    ctl(pubdir, &["release", "sign", "r5", "--key", "release.key"]);
}

#[test]
fn failures_pause_a_rollout_and_resume_retry_abort_and_rollback_work() {
    failures("failures", &[]);
}

#[test]
fn failures_resume_retry_abort_and_rollback_on_postgresql() {
    failures("failures-pg", &["--database", &postgres::database("failures")]);
}

fn failures(name: &str, console_args: &[&str]) {
    let dir = scratch(&format!("console-{name}"));
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    rollback_release(&pubdir);
    let root = pubdir.join("root-1.json");
    let broker = Broker::start_with_users(&dir.join("broker"), &ids("sim", 50));
    let console = Console::start_named(&dir, &broker, &root, "console", console_args);
    for r in ["r1", "r2", "r3", "r5"] {
        console.ctl(&["release", "upload", pubdir.join(r).to_str().unwrap()]);
    }
    // One device in five fails its health check.
    let mut sim = Sim::start(&dir, &broker, &root, "sim", 50, &["--fail-health", "0.2"]);
    wait_for(Duration::from_secs(30), "50 devices online", || (console.online() == 50).then_some(()));

    // Waves of 5, 10 and the rest; half of a wave must succeed; more than one failure pauses.
    // sim-0005 fails in wave 1 (within the threshold), sim-0010 in wave 2: paused, by itself.
    let id = start(&console, &["--number", "1", "--waves", "5,10,100%", "--success-pct", "50", "--errors", "1"]);
    let r = console.wait_rollout(id, "paused", Duration::from_secs(60));
    assert_eq!(r["reason"], "error threshold: 2 failed or timed out, over 1", "{r:#}");
    let failures = r["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 2, "{r:#}");
    assert!(failures.iter().all(|f| f["reason"].as_str().unwrap().starts_with("health_check:")), "{r:#}");
    assert_eq!(count(&r, "pending"), 40, "{r:#}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(count(&console.rollout(id), "pending"), 40, "a paused rollout offers nothing more");

    // Resume: those two are acknowledged; wave 3 goes out and its failures pause it again.
    console.ctl(&["rollout", "resume", &id.to_string()]);
    console.wait_rollout(id, "paused", Duration::from_secs(60));
    let r = wait_for(Duration::from_secs(30), "every offer answered", || {
        let r = console.rollout(id);
        (count(&r, "offered") == 0).then_some(r)
    });
    assert_eq!(count(&r, "failed"), 10, "{r:#}");
    assert_eq!(count(&r, "succeeded"), 40, "{r:#}");

    // The failing devices are fixed (the simulator restarted healthy); retry offers them the
    // release again (a second attempt), and the rollout completes.
    sim.stop();
    wait_for(Duration::from_secs(30), "the devices to go offline", || (console.online() == 0).then_some(()));
    let mut sim = Sim::start(&dir, &broker, &root, "sim", 50, &[]);
    wait_for(Duration::from_secs(30), "50 devices back online", || (console.online() == 50).then_some(()));
    let retried = console.json(&["rollout", "retry", &id.to_string()]);
    assert_eq!(retried["retried"], 10, "{retried}");
    console.ctl(&["rollout", "resume", &id.to_string()]);
    let r = console.wait_rollout(id, "completed", Duration::from_secs(60));
    assert_eq!(count(&r, "succeeded"), 50, "{r:#}");
    let second = console.device("sim-0005");
    assert_eq!(second["rollouts"][0]["attempt"], 2, "sim-0005 failed, then took the retry: {second:#}");
    assert_eq!(on_release(&console, 1), 50);

    // Silent devices: offered, no answer within the deadline -> timed out, and the wave's
    // success share pauses the rollout. Retry once they are back completes it.
    sim.stop();
    wait_for(Duration::from_secs(30), "the devices to go offline", || (console.online() == 0).then_some(()));
    let id2 = start(&console, &["--number", "2", "--waves", "100%", "--errors", "100%", "--deadline", "2"]);
    let r = console.wait_rollout(id2, "paused", Duration::from_secs(30));
    assert_eq!(count(&r, "timed_out"), 50, "{r:#}");
    assert!(r["reason"].as_str().unwrap().contains("0.0% succeeded"), "{r:#}");
    assert!(r["failures"][0]["reason"].as_str().unwrap().contains("no answer within 2 s"), "{r:#}");
    let mut sim = Sim::start(&dir, &broker, &root, "sim", 50, &[]);
    wait_for(Duration::from_secs(30), "50 devices back online", || (console.online() == 50).then_some(()));
    console.ctl(&["rollout", "retry", &id2.to_string()]);
    console.ctl(&["rollout", "resume", &id2.to_string()]);
    let r = console.wait_rollout(id2, "completed", Duration::from_secs(60));
    assert_eq!(count(&r, "succeeded"), 50, "{r:#}");

    // The rate limit: 6 devices a minute. The page shows the running rollout; then abort.
    let id3 = start(&console, &["--number", "3", "--waves", "100%", "--rate", "6"]);
    wait_for(Duration::from_secs(20), "6 devices on release 3", || (on_release(&console, 3) == 6).then_some(()));
    let r = console.rollout(id3);
    assert_eq!(r["state"], "running");
    assert_eq!(count(&r, "succeeded"), 6, "{r:#}");
    assert_eq!(count(&r, "pending"), 44, "the rest wait for the rate limit: {r:#}");
    check_page(&dir, &console, id3);
    console.ctl(&["rollout", "abort", &id3.to_string()]);
    std::thread::sleep(Duration::from_secs(1));
    let r = console.rollout(id3);
    assert_eq!(r["state"], "aborted");
    assert_eq!(count(&r, "pending"), 44, "{r:#}");
    let refused = console.try_ctl(&["rollout", "resume", &id3.to_string()]);
    assert!(!refused.status.success(), "an aborted rollout cannot resume");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot resume a rollout that is aborted"));

    // Rollback: release 5 carries release 1's model; every device ends up serving version 1.
    let id5 = start(&console, &["--number", "5", "--waves", "10%,100%"]);
    let r = console.wait_rollout(id5, "completed", Duration::from_secs(60));
    assert_eq!(count(&r, "succeeded"), 50, "{r:#}");
    let fleet = console.json(&["fleet", "ls"]);
    for d in fleet.as_array().unwrap() {
        assert_eq!(d["release"], 5, "{d}");
        assert_eq!(d["models"][0]["versions"][0], "1", "{d}");
    }
    sim.stop();
}

/// The web page in headless Chromium: it loads with the token, shows the fleet and the running
/// rollout's progress; a screenshot is kept next to the test's files (and in docs/).
fn check_page(dir: &Path, console: &Console, rollout: u64) {
    let dom = console.page(dir, &["--dump-dom"]);
    assert!(dom.contains("data-loaded=\"yes\""), "the page loaded its data: {dom}");
    for d in ["sim-0001", "sim-0050"] {
        assert!(dom.contains(&format!("data-device=\"{d}\"")), "{d} in the fleet table");
    }
    let card = dom.split(&format!("id=\"rollout-{rollout}\"")).nth(1).expect("the rollout is shown");
    assert!(card.starts_with(" data-state=\"running\""), "{card}");
    assert!(card.contains("6 / 50 succeeded"), "its wave's progress: {card}");
    // The fleet counted by release, and the table filtered on one (from the address).
    let groups = dom.split("data-group=\"release\"").nth(1).expect("the release groups");
    assert!(groups.contains("release 3</button></td><td class=\"num\">6</td>"), "{groups}");
    assert!(dom.contains("data-total=\"50\""), "{dom}");
    let filtered = console.page_at(dir, "release=3", &["--dump-dom"]);
    assert_eq!(filtered.matches("<tr data-device=").count(), 6, "{filtered}");
    assert!(filtered.contains("1–6 of 6 devices (release 3)"), "{filtered}");
    let shot = dir.join("console.png");
    console.page(dir, &[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
    if std::env::var_os("OUTPOST_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&shot, repo_root().join("docs/console.png")).unwrap();
    }
}

/// The offer of a release with a 200 MB model (3,052 chunk hashes at the default 64 KiB chunks)
/// is larger than the console's other bodies may be; the console takes it, as devices would.
#[test]
fn a_release_of_a_200_mb_model_uploads() {
    let dir = scratch("console-large");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    let broker = Broker::start(&dir.join("broker"));
    let console = Console::start(&dir, &broker, &pubdir.join("root-1.json"));

    // Every answer under /api is JSON, for a route or method it lacks too (the fuzz target
    // found `PUT /api/objects/` answered with an empty body).
    let auth = format!("Bearer {TOKEN}");
    for (method, path, want) in
        [("PUT", "/api/objects/", 404), ("GET", "/api/nothing", 404), ("DELETE", "/api/releases", 405)]
    {
        let (status, body) =
            outpost_tests::http(([127, 0, 0, 1], console.port).into(), method, path, &[("authorization", &auth)], b"");
        assert_eq!(status, want, "{method} {path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{method} {path}: {e}: {body}"));
        assert!(v["error"].is_string(), "{method} {path}: {body}");
    }

    // 200 MB that do not compress (xorshift), as model weights do not.
    let model = pubdir.join("large.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&model).unwrap());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..(200_000_000 / 8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f.write_all(&x.to_le_bytes()).unwrap();
        }
    }
    std::fs::write(
        pubdir.join("large.toml"),
        format!(
            "fleet = \"{FLEET}\"\nnumber = 10\n[[models]]\nname = \"large\"\nversion = \"1\"\npath = {model:?}\n\
             golden = {:?}\n",
            repo_root().join("models/digits-edge.golden.json")
        ),
    )
    .unwrap();
    ctl(&pubdir, &["release", "create", "large.toml", "-o", "large"]);
    ctl(&pubdir, &["release", "sign", "large", "--key", "release.key"]);
    let offer = std::fs::metadata(pubdir.join("large/release.json")).unwrap().len();
    assert!(offer > 256 * 1024, "the offer ({offer} bytes) is over the console's limit for other bodies");

    console.ctl(&["release", "upload", pubdir.join("large").to_str().unwrap()]);
    let releases = console.json(&["release", "ls"]);
    let large = releases.as_array().unwrap().iter().find(|r| r["number"] == 10);
    assert!(large.is_some(), "{releases}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Which console steps rollouts, as `console` reports it.
fn stepping(console: &Console) -> String {
    let v = http_get(console.port, "/api/overview");
    v["console"]["stepping"]["console"].as_str().unwrap_or_default().to_owned()
}

/// The objects in a console's folder.
fn objects(console: &Console) -> std::collections::BTreeSet<String> {
    let names = std::fs::read_dir(console.data.join("objects")).into_iter().flatten().flatten();
    names.map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect()
}

/// Past one machine: two consoles on one PostgreSQL database, and devices on two brokers (half
/// on the central broker the consoles use, half on an edge broker bridged to it with
/// cross/mosquitto/bridge.conf). Both consoles serve the API and chunks; the one holding the
/// rollout lease steps rollouts. It is killed (SIGKILL) mid-wave; the other takes the lease once
/// it expires, and the rollout completes on both brokers with each device offered once.
#[test]
fn two_consoles_on_postgresql_and_a_bridged_broker_survive_a_console_kill() {
    let dir = scratch("console-takeover");
    let pubdir = dir.join("publisher");
    publisher(&pubdir);
    let root = pubdir.join("root-1.json");
    let broker = Broker::start_with_users(&dir.join("broker"), &ids("sim", 15));
    let edge = Broker::start_bridged(&dir.join("edge"), &broker, &ids("edge", 15));
    let db = postgres::database("takeover");
    let args = |id: &'static str| ["--database", db.as_str(), "--client-id", id, "--lease-secs", "3"];
    let mut a = Console::start_named(&dir, &broker, &root, "console-a", &args("console-a"));
    wait_for(Duration::from_secs(30), "console-a to step rollouts", || (stepping(&a) == "console-a").then_some(()));
    let b = Console::start_named(&dir, &broker, &root, "console-b", &args("console-b"));
    let _sim = Sim::start(&dir, &broker, &root, "sim", 15, &[]);
    let _edge_sim = Sim::start(&dir, &edge, &root, "edge", 15, &[]);
    wait_for(Duration::from_secs(30), "30 devices online, seen through b", || (b.online() == 30).then_some(()));
    assert_eq!(stepping(&b), "console-a", "b serves; a steps");

    // Uploaded through a; b copies the objects from the database and serves their chunks too.
    a.ctl(&["release", "upload", pubdir.join("r1").to_str().unwrap()]);
    let uploaded = objects(&a);
    assert!(!uploaded.is_empty());
    wait_for(Duration::from_secs(10), "b's copy of the objects", || (objects(&b) == uploaded).then_some(()));

    // Started through b, stepped by a; a is killed once wave 2 is under way.
    let id = start(&b, &["--number", "1", "--waves", "2,50%,100%", "--soak", "1", "--errors", "0"]);
    let mid = wait_for(Duration::from_secs(60), "wave 2 to open", || {
        let r = b.rollout(id);
        (r["wave"].as_u64() >= Some(2) && count(&r, "succeeded") >= 2).then_some(r)
    });
    a.kill();
    let killed = std::time::Instant::now();
    // The lease lasts 3 s; b asks at every step (200 ms).
    wait_for(Duration::from_secs(15), "console-b to take over", || (stepping(&b) == "console-b").then_some(()));
    eprintln!("console-b took over {:.1} s after console-a was killed", killed.elapsed().as_secs_f64());
    let r = b.wait_rollout(id, "completed", Duration::from_secs(90));
    assert!(count(&mid, "succeeded") < 30, "the kill came mid-rollout: {mid:#}");
    assert_eq!(count(&r, "succeeded"), 30, "{r:#}");
    assert_eq!(count(&r, "failed") + count(&r, "timed_out"), 0, "{r:#}");
    let fleet = b.json(&["fleet", "ls"]);
    let on_edge = fleet.as_array().unwrap().iter().filter(|d| d["id"].as_str().unwrap().starts_with("edge-"));
    assert_eq!(on_edge.filter(|d| d["release"] == 1).count(), 15, "the edge broker's devices too: {fleet}");
    assert_eq!(on_release(&b, 1), 30);

    // Each device was offered the release once, on its first attempt, across the takeover.
    let events = console_events(&b);
    let mut offers = std::collections::BTreeMap::<&str, Vec<&str>>::new();
    for e in events.iter().filter(|e| e["kind"] == "offered" && e["rollout"] == id) {
        offers.entry(e["device"].as_str().unwrap()).or_default().push(e["detail"].as_str().unwrap());
    }
    assert_eq!(offers.len(), 30, "{offers:?}");
    assert!(offers.values().all(|o| o.len() == 1 && o[0].ends_with("attempt 1")), "{offers:?}");
    let served = http_get(b.port, "/api/overview")["summary"]["chunks_served"].as_u64().unwrap();
    assert!(served > 0, "b served chunks from its copy of the objects");
}
