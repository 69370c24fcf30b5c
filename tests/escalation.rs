//! Escalation to a central model, with a real second `outpost` (serving digits-central) as the
//! central: confident cases stay local, unsure ones go central; a dead or slow central gives a
//! flagged local answer within the timeout; the breaker opens and recovers; hard examples survive
//! a restart and drain when the central returns; the queue's bounds hold.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use outpost_runtime::golden::max_abs_diff;
use outpost_runtime::tensor::Tensor;
use outpost_tests::scratch;
use outpost_tests::tls::{make_ca, server_cert};
use outpost_tests::{Daemon, Server, free_port, repo_root};
use outpost_tools::http::Conn;
use outpost_tools::v2client;
use serde_json::{Value, json};

fn test_rows(n: usize) -> Vec<Vec<f32>> {
    let text = std::fs::read_to_string(repo_root().join("models/digits-test.csv")).unwrap();
    text.lines().skip(1).take(n).map(|l| l.split(',').skip(1).map(|v| v.parse().unwrap()).collect()).collect()
}

fn central(addr: SocketAddr, sink: Option<&Path>) -> Daemon {
    let mut args = vec!["--model", "models/digits-central.onnx"];
    if let Some(s) = sink {
        args.extend(["--hard-example-sink", s.to_str().unwrap()]);
    }
    Daemon::serve_at(addr, &args)
}

fn edge_config(central: SocketAddr, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"digits\"\npath = \"models/digits-edge.onnx\"\n\
         [models.escalation]\ncentral_url = \"http://{central}\"\ncentral_model = \"digits-central\"\n\
         threshold = 0.99\ntimeout_ms = 300\n{extra}"
    )
}

/// One row through the edge: (status, parameters, probabilities, elapsed).
async fn ask(conn: &mut Conn, row: &[f32], params: Value) -> (u16, Value, Option<Tensor>, Duration) {
    let body =
        json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}], "parameters": params});
    let t = Instant::now();
    let r = conn.post_json("/v2/models/digits/infer", &body).await.unwrap();
    let elapsed = t.elapsed();
    let out = v2client::outputs(&r).ok().and_then(|mut o| o.pop());
    (r.status, r.json()["parameters"].clone(), out, elapsed)
}

async fn metric(conn: &mut Conn, line_start: &str) -> f64 {
    let text = String::from_utf8(conn.get("/metrics").await.unwrap().body.to_vec()).unwrap();
    let line = text.lines().find(|l| l.starts_with(line_start)).unwrap_or_else(|| panic!("no metric {line_start}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The metric once it reads `want` (hard examples are written off the request path), or what
/// it read last after 10 s.
async fn metric_reaching(conn: &mut Conn, line_start: &str, want: f64) -> f64 {
    let mut got = metric(conn, line_start).await;
    for _ in 0..200 {
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = metric(conn, line_start).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confident_cases_stay_local_and_unsure_ones_go_central() {
    let central_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _central = central(central_addr, None);
    let edge = Server::start(&edge_config(central_addr, "")).await;
    let mut conn = edge.conn().await;
    let mut direct = Conn::connect(central_addr).await.unwrap();
    let (mut local, mut escalated) = (0, 0);
    for row in test_rows(60) {
        let (status, params, out, _) = ask(&mut conn, &row, json!({})).await;
        assert_eq!(status, 200);
        let out = out.unwrap();
        let confidence = params["confidence"].as_f64().unwrap();
        let (_, _, forced_local, _) = ask(&mut conn, &row, json!({"escalation": "local"})).await;
        match params["served_by"].as_str().unwrap() {
            "local" => {
                assert!(confidence >= 0.99, "{params}");
                assert_eq!(params["escalation"], "not_needed");
                assert_eq!(out, forced_local.unwrap());
                local += 1;
            }
            "central" => {
                assert!(confidence < 0.99, "{params}");
                assert_eq!(params["escalation"], "ok");
                let body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]});
                let r = direct.post_json("/v2/models/digits-central/infer", &body).await.unwrap();
                let central_out = &v2client::outputs(&r).unwrap()[0];
                assert!(max_abs_diff(central_out, &out) <= 1e-6, "the central's answer is passed on");
                escalated += 1;
            }
            other => panic!("served_by {other}"),
        }
    }
    println!("{local} answered locally, {escalated} by the central");
    assert!(local > 0 && escalated > 0, "{local} local, {escalated} escalated");
    assert_eq!(metric(&mut conn, "outpost_escalations_total{model=\"digits\"}").await, escalated as f64);

    // Per-request overrides.
    let (_, params, _, _) = ask(&mut conn, &test_rows(1)[0], json!({"escalation": "central"})).await;
    assert_eq!(params["served_by"], "central");
    let (status, _, _, _) = ask(&mut conn, &test_rows(1)[0], json!({"escalation": "sometimes"})).await;
    assert_eq!(status, 400);
    let (_, params, _, _) = ask(&mut conn, &test_rows(1)[0], json!({"escalation_threshold": 1.0})).await;
    assert_eq!(params["served_by"], "central", "every confidence is below 1.0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_central_gives_a_flagged_local_answer_within_the_timeout() {
    let nowhere: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let edge = Server::start(&edge_config(nowhere, "")).await;
    let mut conn = edge.conn().await;
    let (status, params, out, elapsed) = ask(&mut conn, &test_rows(1)[0], json!({"escalation": "central"})).await;
    assert_eq!(status, 200);
    assert!(out.is_some());
    assert_eq!((params["served_by"].as_str(), params["escalation"].as_str()), (Some("local"), Some("failed")));
    assert!(params["escalation_error"].as_str().unwrap().contains("cannot reach the central"), "{params}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_central_is_cut_off_at_the_timeout() {
    // A central that accepts connections and never answers: a fault a real server won't produce
    // on demand.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let edge = Server::start(&edge_config(addr, "")).await;
    let mut conn = edge.conn().await;
    let (status, params, _, elapsed) = ask(&mut conn, &test_rows(1)[0], json!({"escalation": "central"})).await;
    assert_eq!(status, 200);
    assert_eq!(params["escalation"], "failed");
    assert!(params["escalation_error"].as_str().unwrap().contains("no answer within 300ms"), "{params}");
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert_eq!(metric(&mut conn, "outpost_central_failures_total{model=\"digits\",kind=\"timeout\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_breaker_opens_after_failures_and_recovers() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let edge = Server::start(&edge_config(addr, "breaker_failures = 3\nbreaker_cooldown_ms = 300\n")).await;
    let mut conn = edge.conn().await;
    let row = &test_rows(1)[0];
    for _ in 0..3 {
        let (_, params, _, _) = ask(&mut conn, row, json!({"escalation": "central"})).await;
        assert!(params["escalation_error"].as_str().unwrap().contains("cannot reach"), "{params}");
    }
    let (_, params, _, _) = ask(&mut conn, row, json!({"escalation": "central"})).await;
    assert!(params["escalation_error"].as_str().unwrap().contains("circuit breaker open"), "{params}");
    assert_eq!(metric(&mut conn, "outpost_central_breaker_state{model=\"digits\"}").await, 1.0);

    let _central = tokio::task::spawn_blocking(move || central(addr, None)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (_, params, _, _) = ask(&mut conn, row, json!({"escalation": "central"})).await;
    assert_eq!(params["served_by"], "central", "the probe after the cool-down gets through: {params}");
    assert_eq!(metric(&mut conn, "outpost_central_breaker_state{model=\"digits\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hard_examples_survive_a_restart_and_drain_when_the_central_returns() {
    let dir = scratch("esc-drain");
    let (queue, sink) = (dir.join("queue"), dir.join("sink"));
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = edge_config(addr, &format!("queue_dir = {queue:?}\nbreaker_failures = 100\n"));
    let edge = Server::start(&config).await;
    let mut conn = edge.conn().await;
    for row in test_rows(4) {
        let (_, params, _, _) = ask(&mut conn, &row, json!({"escalation": "central"})).await;
        assert_eq!(params["escalation"], "failed");
    }
    assert_eq!(metric_reaching(&mut conn, "outpost_hard_examples_queued{model=\"digits\"}", 4.0).await, 4.0);
    drop(conn);
    drop(edge);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let edge = Server::start(&config).await;
    let mut conn = edge.conn().await;
    assert_eq!(
        metric(&mut conn, "outpost_hard_examples_queued{model=\"digits\"}").await,
        4.0,
        "kept across the restart"
    );

    let sink_dir = sink.clone();
    let _central = tokio::task::spawn_blocking(move || central(addr, Some(&sink_dir))).await.unwrap();
    let mut stored = 0;
    for _ in 0..200 {
        stored = std::fs::read_dir(&sink).map(|d| d.count()).unwrap_or(0);
        if stored == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored, 4, "every hard example reached the central side");
    // The gauge drops once the central's answer is back, a moment after its sink wrote the file.
    assert_eq!(metric_reaching(&mut conn, "outpost_hard_examples_queued{model=\"digits\"}", 0.0).await, 0.0);
    let example: Value = serde_json::from_slice(
        &std::fs::read(std::fs::read_dir(&sink).unwrap().next().unwrap().unwrap().path()).unwrap(),
    )
    .unwrap();
    assert_eq!(example["model"], "digits");
    assert_eq!(example["inputs"][0]["shape"], json!([1, 64]));
    assert_eq!(example["local_outputs"][0]["name"], "probabilities");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hard_example_queue_keeps_its_bounds() {
    let dir = scratch("esc-bounds");
    let nowhere: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = edge_config(nowhere, &format!("queue_dir = {:?}\nqueue_max_items = 2\n", dir.join("queue")));
    let edge = Server::start(&config).await;
    let mut conn = edge.conn().await;
    for row in test_rows(5) {
        ask(&mut conn, &row, json!({"escalation": "central"})).await;
    }
    assert_eq!(metric_reaching(&mut conn, "outpost_hard_examples_dropped_total{model=\"digits\"}", 3.0).await, 3.0);
    assert_eq!(metric(&mut conn, "outpost_hard_examples_queued{model=\"digits\"}").await, 2.0);
    assert_eq!(std::fs::read_dir(dir.join("queue")).unwrap().count(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An example the central refuses (here: not JSON) is parked and counted, and the ones behind it
/// go on; a full sink answers 507 and its examples stay queued on the edge, not parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_example_is_parked_and_a_full_sink_keeps_the_rest_queued() {
    let dir = scratch("esc-park");
    let (queue, sink) = (dir.join("queue"), dir.join("sink"));
    std::fs::create_dir_all(&queue).unwrap();
    // The oldest example in the queue is one the central cannot take.
    std::fs::write(queue.join(format!("{:020}.json", 1)), b"{not json").unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let central_config = dir.join("central.toml");
    std::fs::write(
        &central_config,
        format!(
            "[server]\nhard_example_sink = {sink:?}\nhard_example_sink_max_items = 3\n\
             [[models]]\nname = \"digits-central\"\npath = {:?}\n",
            repo_root().join("models/digits-central.onnx")
        ),
    )
    .unwrap();
    let _central =
        tokio::task::spawn_blocking(move || Daemon::serve_at(addr, &["--config", central_config.to_str().unwrap()]))
            .await
            .unwrap();
    // The edge asks the central for a model it does not have: every escalation fails (404) and
    // leaves a hard example, while the central takes uploads.
    let config = edge_config(addr, &format!("queue_dir = {queue:?}\nbreaker_failures = 100\n"))
        .replace("central_model = \"digits-central\"", "central_model = \"absent\"");
    let edge = Server::start(&config).await;
    let mut conn = edge.conn().await;
    let parked = "outpost_hard_examples_parked_total{model=\"digits\"}";
    assert_eq!(metric_reaching(&mut conn, parked, 1.0).await, 1.0, "the refused example was set aside");
    assert!(queue.join("parked").join(format!("{:020}.json", 1)).is_file());

    // Five more: three fill the sink, two wait on the edge.
    for row in test_rows(5) {
        let (_, params, _, _) = ask(&mut conn, &row, json!({"escalation": "central"})).await;
        assert_eq!(params["escalation"], "failed", "{params}");
    }
    // The queue gauge passes through 2 on its way up while the sender fills the sink: wait for
    // the sink to hold its three first, then for the two left on the edge.
    let in_sink = || std::fs::read_dir(&sink).map_or(0, |d| d.count());
    for _ in 0..200 {
        if in_sink() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queued = "outpost_hard_examples_queued{model=\"digits\"}";
    assert_eq!(metric_reaching(&mut conn, queued, 2.0).await, 2.0);
    assert_eq!(in_sink(), 3, "the sink holds its bound");
    assert_eq!(metric(&mut conn, parked).await, 1.0, "a full sink parks nothing");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn escalation_parameters_on_a_model_without_a_central_are_refused() {
    let server = Server::start("[[models]]\nname = \"digits\"\npath = \"models/digits-edge.onnx\"\n").await;
    let mut conn = server.conn().await;
    let (status, _, _, _) = ask(&mut conn, &test_rows(1)[0], json!({"escalation": "central"})).await;
    assert_eq!(status, 400);
    let (status, params, _, _) = ask(&mut conn, &test_rows(1)[0], json!({})).await;
    assert_eq!((status, params), (200, Value::Null), "plain models answer plain V2");
}

#[test]
fn outpostctl_eval_sweeps_thresholds_and_writes_a_plot() {
    let central_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _central = central(central_addr, None);
    let central_url = format!("http://{central_addr}");
    let edge = Daemon::serve(&[
        "--model",
        "models/digits-edge.onnx:digits",
        "--central",
        &central_url,
        "--central-model",
        "digits-central",
    ]);
    let dir = scratch("esc-eval");
    let plot = dir.join("escalation.svg");
    let ctl = outpost_tests::outpost_bin().with_file_name(format!("outpostctl{}", std::env::consts::EXE_SUFFIX));
    let out = std::process::Command::new(ctl)
        .args(["eval", "--edge", &edge.addr.to_string(), "--central", &central_addr.to_string()])
        .args(["--limit", "30", "--thresholds", "0.9,0.999", "--plot", plot.to_str().unwrap()])
        .current_dir(repo_root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("30 labelled rows"), "{stdout}");
    assert!(stdout.contains("| edge only |") && stdout.contains("| central only |"), "{stdout}");
    assert_eq!(stdout.matches("| cascade |").count(), 6, "3 policies x 2 thresholds: {stdout}");
    assert!(stdout.contains("| cascade | margin | 0.999 |"), "{stdout}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    for policy in outpost_tools::eval::POLICIES {
        assert!(svg.contains(&format!("\n{policy}\n")), "a line for {policy}: {svg}");
    }
    // Each policy's line and legend line, and the two dashed levels (in pieces) with theirs.
    assert!(svg.matches("<polyline").count() >= 2 * 3 + 2, "{svg}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// TLS in front of a plain-HTTP central: socat with a server certificate for 127.0.0.1 signed
/// by the CA `ca` in `dir`; killed on drop.
struct TlsFront {
    child: std::process::Child,
    addr: SocketAddr,
}

impl TlsFront {
    fn start(dir: &Path, ca: &str, backend: SocketAddr) -> TlsFront {
        let (cert, key) = server_cert(dir, ca, "server");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listen = format!(
            "OPENSSL-LISTEN:{},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
            addr.port(),
            cert.display(),
            key.display()
        );
        let child = std::process::Command::new("socat")
            .args([listen, format!("TCP:{backend}")])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("socat runs (Debian package socat)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "socat did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsFront { child, addr }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn https_edge_config(front: SocketAddr, ca: &Path) -> String {
    format!(
        "[[models]]\nname = \"digits\"\npath = \"models/digits-edge.onnx\"\n\
         [models.escalation]\ncentral_url = \"https://{front}\"\ncentral_model = \"digits-central\"\n\
         central_ca = \"{}\"\nthreshold = 0.99\ntimeout_ms = 2000\n",
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_https_central_is_trusted_only_through_the_configured_ca() {
    let dir = scratch("esc-tls");
    let ca = make_ca(&dir, "fleet-ca");
    let stranger = make_ca(&dir, "other-ca");
    let central_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _central = central(central_addr, None);
    let front = TlsFront::start(&dir, "fleet-ca", central_addr);
    let row = &test_rows(1)[0];

    let edge = Server::start(&https_edge_config(front.addr, &ca)).await;
    let mut conn = edge.conn().await;
    for _ in 0..3 {
        let (status, params, out, _) = ask(&mut conn, row, json!({"escalation": "central"})).await;
        assert_eq!(status, 200);
        assert!(out.is_some());
        assert_eq!((params["served_by"].as_str(), params["escalation"].as_str()), (Some("central"), Some("ok")));
    }

    let wrong = Server::start(&https_edge_config(front.addr, &stranger)).await;
    let mut conn = wrong.conn().await;
    let (status, params, out, elapsed) = ask(&mut conn, row, json!({"escalation": "central"})).await;
    assert_eq!(status, 200);
    assert!(out.is_some(), "a local answer all the same");
    assert_eq!((params["served_by"].as_str(), params["escalation"].as_str()), (Some("local"), Some("failed")));
    assert!(params["escalation_error"].as_str().unwrap().contains("certificate"), "{params}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
}
