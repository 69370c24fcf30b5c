//! Drift on the device: `outpostctl profile` writes a model's reference profile beside it, and the
//! server scores its live traffic against that profile per window (population stability index),
//! in `/metrics` and the model's statistics; a profile that does not fit its model is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_runtime::app::App;
use outpost_runtime::config::Config;
use outpost_tests::mqtt::outpostctl;
use outpost_tests::scratch;
use outpost_tests::{Server, repo_root};
use outpost_tools::http::Conn;
use serde_json::{Value, json};

/// Rows of the held-out digits the reference profile is built from; the rest are live traffic.
const REFERENCE_ROWS: usize = 210;
/// The live window: the 150 rows the reference did not see.
const WINDOW: usize = 150;

/// `digits-edge` copied to `dir/digits.onnx` with its golden file.
fn model_in(dir: &Path) -> PathBuf {
    let model = dir.join("digits.onnx");
    std::fs::copy(repo_root().join("models/digits-edge.onnx"), &model).unwrap();
    std::fs::copy(repo_root().join("models/digits-edge.golden.json"), dir.join("digits.golden.json")).unwrap();
    model
}

fn digits() -> Vec<Vec<f32>> {
    let text = std::fs::read_to_string(repo_root().join("models/digits-test.csv")).unwrap();
    text.lines().skip(1).map(|l| l.split(',').skip(1).map(|v| v.parse().unwrap()).collect()).collect()
}

async fn send(conn: &mut Conn, rows: &[Vec<f32>]) {
    for row in rows {
        let body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]});
        let r = conn.post_json("/v2/models/digits/infer", &body).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
}

async fn drift(conn: &mut Conn) -> Value {
    conn.get("/v2/models/digits/stats").await.unwrap().json()["model_stats"][0]["drift"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn held_out_digits_score_low_and_inverted_digits_pass_the_threshold() {
    let dir = scratch("drift-shift");
    let model = model_in(&dir);
    let out = Command::new(outpostctl())
        .args(["profile", model.to_str().unwrap(), "--limit", &REFERENCE_ROWS.to_string()])
        .current_dir(repo_root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("210 reference rows, class output `probabilities`; inputs: input"), "{stdout}");
    let profile: Value = serde_json::from_slice(&std::fs::read(dir.join("digits.profile.json")).unwrap()).unwrap();
    assert_eq!(profile["class"]["fractions"].as_array().unwrap().len(), 10, "{profile}");

    let server = Server::start(&format!(
        "[[models]]\nname = \"digits\"\npath = {model:?}\n[models.drift]\nwindow = {WINDOW}\nthreshold = 0.25\n"
    ))
    .await;
    let mut conn = server.conn().await;
    let before = drift(&mut conn).await;
    assert_eq!((before["rows"].as_u64(), before["windows"].as_u64()), (Some(0), Some(0)), "{before}");
    assert!(before["last"].is_null(), "{before}");

    // The rows the reference did not see, from the same distribution: a low score.
    let rows = digits();
    send(&mut conn, &rows[REFERENCE_ROWS..REFERENCE_ROWS + WINDOW]).await;
    let held_out = drift(&mut conn).await;
    assert_eq!((held_out["windows"].as_u64(), held_out["alerts"].as_u64()), (Some(1), Some(0)), "{held_out}");
    let scores = |d: &Value| -> Vec<(String, f64)> { serde_json::from_value(d["last"]["psi"].clone()).unwrap() };
    let names: Vec<String> = scores(&held_out).into_iter().map(|s| s.0).collect();
    assert_eq!(names, ["confidence", "class", "input:input"]);
    let max = |d: &Value| scores(d).iter().map(|s| s.1).fold(0.0, f64::max);
    println!("held-out window: {:?}", scores(&held_out));
    assert!(max(&held_out) < 0.25, "{held_out}");

    // The same digits with their pixels inverted (16 - v): every signal moves far.
    let inverted: Vec<Vec<f32>> =
        rows[REFERENCE_ROWS..REFERENCE_ROWS + WINDOW].iter().map(|r| r.iter().map(|v| 16.0 - v).collect()).collect();
    send(&mut conn, &inverted).await;
    let shifted = drift(&mut conn).await;
    println!("inverted window: {:?}", scores(&shifted));
    assert_eq!((shifted["windows"].as_u64(), shifted["alerts"].as_u64()), (Some(2), Some(1)), "{shifted}");
    assert!(scores(&shifted).iter().find(|s| s.0 == "input:input").unwrap().1 > 1.0, "{shifted}");
    assert!(max(&shifted) > 4.0 * max(&held_out), "{shifted}");

    let metrics = String::from_utf8(conn.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    let l = "model=\"digits\",version=\"1\"";
    assert!(metrics.contains(&format!("outpost_drift_windows_total{{{l}}} 2\n")), "{metrics}");
    assert!(metrics.contains(&format!("outpost_drift_alerts_total{{{l}}} 1\n")), "{metrics}");
    let psi = metrics
        .lines()
        .find_map(|line| line.strip_prefix(&format!("outpost_drift_psi{{{l},signal=\"input:input\"}} ")))
        .unwrap_or_else(|| panic!("no input drift metric: {metrics}"));
    assert!(psi.parse::<f64>().unwrap() > 1.0, "{psi}");
}

#[tokio::test]
async fn a_profile_that_does_not_fit_its_model_is_refused_at_load_naming_it() {
    let dir = scratch("drift-bad");
    let model = model_in(&dir);
    let config = |dir: &Path| -> Config {
        toml::from_str(&format!("[[models]]\nname = \"digits\"\npath = {:?}\n", dir.join("digits.onnx"))).unwrap()
    };
    let load = |text: &str| {
        std::fs::write(dir.join("digits.profile.json"), text).unwrap();
        let app = App::new(&config(&dir).validate().unwrap());
        let failures = app.registry.load_all();
        assert_eq!(failures.len(), 1, "{failures:?}");
        failures[0].to_string()
    };
    let e = load("{ not json");
    assert!(e.contains("reference profile") && e.contains("digits.profile.json"), "{e}");
    // A profile of another model: built for an output this one does not have.
    let profile =
        outpost_tools::profile::build(&model, &repo_root().join("models/digits-test.csv"), Some(50), "tract").unwrap();
    let mut other = serde_json::to_value(&profile).unwrap();
    other["output"] = json!("scores");
    let e = load(&other.to_string());
    assert!(e.contains("no output `scores`"), "{e}");
    // The profile as built loads.
    std::fs::write(dir.join("digits.profile.json"), serde_json::to_string(&profile).unwrap()).unwrap();
    assert!(App::new(&config(&dir).validate().unwrap()).registry.load_all().is_empty());
}

/// Reads one sample's value off a Prometheus text exposition.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series}:\n{metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_the_metrics_and_promtool_passes_them() {
    let dir = scratch("drift-prometheus");
    let model = model_in(&dir);
    let profile =
        outpost_tools::profile::build(&model, &repo_root().join("models/digits-test.csv"), Some(100), "tract").unwrap();
    std::fs::write(dir.join("digits.profile.json"), serde_json::to_string(&profile).unwrap()).unwrap();
    let server =
        Server::start(&format!("[[models]]\nname = \"digits\"\npath = {model:?}\n[models.drift]\nwindow = 50\n")).await;
    let mut conn = server.conn().await;
    send(&mut conn, &digits()[100..150]).await;
    let metrics = String::from_utf8(conn.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    let l = "model=\"digits\",version=\"1\"";
    let psi = sample(&metrics, &format!("outpost_drift_psi{{{l},signal=\"class\"}}"));

    // promtool's linter: names, suffixes, HELP and TYPE for every family.
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let lint = lint.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&lint.stdout), String::from_utf8_lossy(&lint.stderr));
    assert!(lint.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\n{metrics}");

    // The server itself, scraped every second; its series queried back through Prometheus's API.
    let port = outpost_tests::free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: outpost\n    static_configs:\n      - targets: ['{}']\n",
            server.addr
        ),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (Debian package prometheus)");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let query = |q: &str| {
        let encoded: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!("/api/v1/query?query={encoded}")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (up, scraped) = loop {
        let answer = async {
            let mut api = Conn::connect(addr).await.ok()?;
            let up = api.get(&query("up{job=\"outpost\"}")).await.ok()?.json();
            let psi = api.get(&query("outpost_drift_psi{model=\"digits\",signal=\"class\"}")).await.ok()?.json();
            let value = |v: &Value| v["data"]["result"][0]["value"][1].as_str()?.parse::<f64>().ok();
            Some((value(&up)?, value(&psi)?))
        }
        .await;
        if let Some(found) = answer {
            break found;
        }
        if let Ok(Some(status)) = prometheus.try_wait() {
            panic!("prometheus exited with {status}: {}", std::fs::read_to_string(dir.join("prometheus.log")).unwrap());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert_eq!(up, 1.0, "the target is up");
    assert_eq!(scraped, psi, "the scraped score is the one /metrics shows");

    // The Grafana dashboard (tools/grafana): every panel's query runs on this Prometheus, with
    // the dashboard's variables at "All", and names only metric families the server exposes.
    let dashboard: Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("tools/grafana/outpost-dashboard.json")).unwrap())
            .unwrap();
    let families: Vec<&str> = metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    let mut api = Conn::connect(addr).await.unwrap();
    let mut drift_series = 0;
    for target in dashboard["panels"].as_array().unwrap().iter().flat_map(|p| p["targets"].as_array().unwrap()) {
        let expr = target["expr"].as_str().unwrap();
        for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("outpost_"))
        {
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            assert!(families.contains(&family), "the dashboard queries `{name}`, which /metrics does not expose");
        }
        let promql = expr
            .replace("$instance", ".+")
            .replace("$model", ".+")
            .replace("$version", ".+")
            .replace("$__rate_interval", "1m");
        let answer = api.get(&query(&promql)).await.unwrap().json();
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        if expr.starts_with("outpost_drift_psi") {
            drift_series = answer["data"]["result"].as_array().unwrap().len();
        }
    }
    assert_eq!(drift_series, 3, "the drift panel shows the model's three signals");
    let _ = prometheus.kill();
    let _ = prometheus.wait();
}
