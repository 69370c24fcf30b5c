//! The CLI side of the console's API: `outpostctl fleet`, `release ls|upload`, `rollout`.
//! Every command prints a table for people, or the API's JSON with `--json`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use hyper::http::Method;
use outpost_updater::mqtt::publish::offer_from_dir;
use outpost_updater::release_dir::ReleaseDir;
use serde_json::{Map, Value, json};

use crate::http::{Conn, Reply};

/// How to reach the console.
#[derive(clap::Args, Clone)]
pub struct ConsoleConn {
    /// The console's address.
    #[arg(long, env = "OUTPOST_CONSOLE", default_value = "127.0.0.1:8080")]
    pub console: String,
    /// A file holding the console's token (the console's DATA/token by default).
    #[arg(long, env = "OUTPOST_CONSOLE_TOKEN_FILE", default_value = "console-data/token")]
    pub token_file: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

struct Api {
    conn: Conn,
    token: String,
}

impl Api {
    async fn open(c: &ConsoleConn) -> anyhow::Result<Api> {
        let text =
            std::fs::read_to_string(&c.token_file).with_context(|| format!("reading {}", c.token_file.display()))?;
        let token = text.lines().next().unwrap_or_default().trim().to_owned();
        let addr: SocketAddr = tokio::net::lookup_host(&c.console)
            .await
            .with_context(|| format!("console `{}`", c.console))?
            .next()
            .ok_or_else(|| anyhow!("console `{}`: no address", c.console))?;
        let conn = Conn::connect(addr).await.with_context(|| format!("connecting to the console at {addr}"))?;
        Ok(Api { conn, token })
    }

    async fn call(&mut self, method: Method, path: &str, body: impl Into<Bytes>) -> anyhow::Result<Reply> {
        let headers =
            [("authorization", format!("Bearer {}", self.token)), ("content-type", "application/json".into())];
        Ok(self.conn.send(method, path, &headers, body).await?)
    }

    /// A JSON call that must succeed (the console's error message otherwise).
    async fn json(&mut self, method: Method, path: &str, body: impl Into<Bytes>) -> anyhow::Result<Value> {
        let r = self.call(method, path, body).await?;
        if r.status >= 300 {
            bail!("console: {} ({})", r.error(), r.status);
        }
        Ok(r.json())
    }

    async fn get(&mut self, path: &str) -> anyhow::Result<Value> {
        self.json(Method::GET, path, Bytes::new()).await
    }
}

/// `GET path`; with `--json` the API's answer is printed and None comes back (nothing more to
/// show).
async fn get_for_table(conn: &ConsoleConn, path: &str) -> anyhow::Result<Option<Value>> {
    let v = Api::open(conn).await?.get(path).await?;
    if conn.json {
        print_json(&v);
        return Ok(None);
    }
    Ok(Some(v))
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

/// A value as terminal text. Strings come from devices (states, errors, model names, labels):
/// their control characters (an escape sequence could rewrite the screen) are shown escaped.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => printable(s),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        other => printable(&other.to_string()),
    }
}

/// `s` with every control character escaped (`\u{1b}`, `\n`).
fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

fn ago(now: i64, at: &Value) -> String {
    match at.as_i64() {
        Some(t) => {
            let s = (now - t).max(0) / 1000;
            if s < 120 {
                format!("{s}s ago")
            } else if s < 7200 {
                format!("{}m ago", s / 60)
            } else {
                format!("{}h ago", s / 3600)
            }
        }
        None => "-".into(),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().zip(&width).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

#[derive(clap::Subcommand)]
pub enum FleetCommand {
    /// Every device: online, release, models, last seen, latency, escalation rate.
    Ls {
        #[arg(long)]
        fleet: Option<String>,
        #[command(flatten)]
        conn: ConsoleConn,
    },
    /// One device: its state, rollouts and history.
    Show {
        id: String,
        #[command(flatten)]
        conn: ConsoleConn,
    },
}

pub fn fleet(cmd: FleetCommand) -> anyhow::Result<()> {
    block_on(async move {
        match cmd {
            FleetCommand::Ls { fleet, conn } => {
                let path = fleet.map_or("/api/devices".to_owned(), |f| format!("/api/devices?fleet={f}"));
                let Some(v) = get_for_table(&conn, &path).await? else { return Ok(()) };
                let now = super::db::now_ms();
                let rows = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        let models: Vec<String> = d["models"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|m| format!("{}:{}", text(&m["name"]), text(&m["versions"][0])))
                            .collect();
                        vec![
                            text(&d["id"]),
                            text(&d["fleet"]),
                            if d["online"] == true { "online".into() } else { "offline".into() },
                            text(&d["release"]),
                            models.join(","),
                            text(&d["update_state"]),
                            ago(now, &d["last_seen"]),
                            text(&d["p50_ms"]),
                            text(&d["p99_ms"]),
                            text(&d["escalation_rate"]),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "DEVICE",
                        "FLEET",
                        "ONLINE",
                        "RELEASE",
                        "MODELS",
                        "UPDATE",
                        "SEEN",
                        "P50 MS",
                        "P99 MS",
                        "ESCALATED",
                    ],
                    rows,
                );
                Ok(())
            }
            FleetCommand::Show { id, conn } => {
                let Some(v) = get_for_table(&conn, &format!("/api/devices/{id}")).await? else { return Ok(()) };
                println!(
                    "{} ({}/{}) {} release {} update {}",
                    text(&v["id"]),
                    text(&v["fleet"]),
                    text(&v["group"]),
                    if v["online"] == true { "online" } else { "offline" },
                    text(&v["release"]),
                    text(&v["update_state"])
                );
                if !v["last_error"].is_null() {
                    println!("last error: {}", text(&v["last_error"]));
                }
                for r in v["rollouts"].as_array().into_iter().flatten() {
                    println!(
                        "rollout {}: {} (attempt {}) {}",
                        r["rollout"],
                        text(&r["status"]),
                        r["attempt"],
                        text(&r["reason"])
                    );
                }
                let now = super::db::now_ms();
                for e in v["history"].as_array().into_iter().flatten() {
                    println!("  {:>9}  {:<10} {}", ago(now, &e["at"]), text(&e["kind"]), text(&e["detail"]));
                }
                Ok(())
            }
        }
    })
}

/// `outpostctl release ls`.
pub fn release_ls(conn: ConsoleConn) -> anyhow::Result<()> {
    block_on(async move {
        let Some(v) = get_for_table(&conn, "/api/releases").await? else { return Ok(()) };
        let rows = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let models: Vec<String> = r["models"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| format!("{}:{}", text(&m["name"]), text(&m["version"])))
                    .collect();
                vec![
                    crate::short(r["id"].as_str().unwrap_or_default()).to_owned(),
                    format!("{}/{}", text(&r["fleet"]), text(&r["group"])),
                    text(&r["number"]),
                    models.join(","),
                    text(&r["bytes"]),
                    text(&r["devices"]),
                ]
            })
            .collect();
        table(&["ID", "FLEET/GROUP", "NUMBER", "MODELS", "BYTES", "DEVICES"], rows);
        Ok(())
    })
}

/// `outpostctl release upload DIR`: each object the console lacks, then the signed offer.
pub fn release_upload(dir: &Path, conn: ConsoleConn) -> anyhow::Result<()> {
    let (offer, doc) = offer_from_dir(dir).map_err(anyhow::Error::msg)?;
    block_on(async move {
        let mut api = Api::open(&conn).await?;
        let objects: Vec<(String, u64)> = doc.objects().map(|(h, l)| (h.to_owned(), l)).collect();
        let total: u64 = objects.iter().map(|o| o.1).sum();
        let bar = upload_bar(total);
        let mut sent = 0;
        for (hash, length) in &objects {
            let head = api.call(Method::HEAD, &format!("/api/objects/{hash}"), Bytes::new()).await?;
            if head.status == 200 {
                bar.inc(*length);
                continue;
            }
            let path = ReleaseDir(dir)
                .find(hash)
                .ok_or_else(|| anyhow!("{}: object {hash} is not in blobs/ or deltas/", dir.display()))?;
            let data = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
            if data.len() as u64 != *length {
                bail!("{}: {} bytes, the release says {length}", path.display(), data.len());
            }
            api.json(Method::PUT, &format!("/api/objects/{hash}"), data).await?;
            sent += length;
            bar.inc(*length);
        }
        bar.finish();
        let v = api.json(Method::POST, "/api/releases", offer.to_bytes()).await?;
        if conn.json {
            print_json(&v);
        } else {
            println!(
                "release {} ({}/{}) {} on the console: id {}, {} object(s), {sent} of {total} bytes sent",
                doc.number,
                doc.fleet,
                doc.group,
                if v["new"] == true { "is now" } else { "was already" },
                crate::short(v["id"].as_str().unwrap_or_default()),
                objects.len()
            );
        }
        Ok(())
    })
}

#[derive(clap::Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per command
pub enum RolloutCommand {
    /// Start a rollout of an uploaded release (older live rollouts of its fleet and group are
    /// superseded). Rolling back is a rollout of a release made from the earlier models.
    Start(StartArgs),
    /// One rollout's waves, counts and failures (the latest few without an id).
    Status {
        id: Option<i64>,
        /// Redraw until the rollout completes, pauses or stops.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: ConsoleConn,
    },
    Pause(ActArgs),
    Resume(ActArgs),
    Abort(ActArgs),
    /// Offer the release again to the devices that failed or timed out.
    Retry(ActArgs),
}

#[derive(clap::Args)]
pub struct ActArgs {
    id: i64,
    #[command(flatten)]
    conn: ConsoleConn,
}

#[derive(clap::Args)]
pub struct StartArgs {
    /// The release id (or 8+ characters of it).
    #[arg(long, conflicts_with = "number")]
    release: Option<String>,
    /// Or its number, with --fleet (and --group).
    #[arg(long, requires = "fleet")]
    number: Option<u64>,
    #[arg(long)]
    fleet: Option<String>,
    #[arg(long)]
    group: Option<String>,
    /// Only devices with these labels (key=value, repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Cumulative waves: device counts or shares; the last is 100%.
    #[arg(long, default_value = "1,10%,50%,100%")]
    waves: String,
    /// Share of a wave's devices that must succeed before the next wave opens.
    #[arg(long, default_value_t = 100.0)]
    success_pct: f64,
    /// Seconds to wait after a wave succeeded before opening the next.
    #[arg(long, default_value_t = 0.0)]
    soak: f64,
    /// Failures that pause the rollout: a count (5) or a share of the devices offered (10%).
    #[arg(long, default_value = "5%")]
    errors: String,
    /// Devices offered per minute at most (0: no limit).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds a device has to answer its offer before it counts as timed out.
    #[arg(long, default_value_t = 900.0)]
    deadline: f64,
    /// Shadow gate: offer the release as a candidate, and activate it on a device only once at
    /// least this share (0..1) of the rows it compared on live requests agree with what it
    /// serves (with --shadow-rows). A device below it pauses the rollout.
    #[arg(long, requires = "shadow_rows")]
    shadow_agreement: Option<f64>,
    /// Shadow gate: rows a device must have compared before the gate judges it.
    #[arg(long, requires = "shadow_agreement")]
    shadow_rows: Option<u64>,
    /// Soak gate: once a device runs the release and until the rollout completes, pause the
    /// rollout when its largest drift score (PSI, last closed window) is over this.
    #[arg(long)]
    drift_max: Option<f64>,
    /// Soak gate: ...or its escalation rate rises more than this (0..1, absolute) above its rate
    /// when it was offered the release.
    #[arg(long)]
    escalation_rise: Option<f64>,
    /// Soak gate: ...or its p99 is more than this many times its p99 when offered.
    #[arg(long)]
    p99_ratio: Option<f64>,
    /// Soak gate: offer a device past a bound the release it ran before.
    #[arg(long)]
    rollback: bool,
    #[command(flatten)]
    conn: ConsoleConn,
}

pub fn rollout(cmd: RolloutCommand) -> anyhow::Result<()> {
    block_on(async move {
        match cmd {
            RolloutCommand::Start(a) => {
                let mut labels = Map::new();
                for l in &a.labels {
                    let (k, v) = l.split_once('=').ok_or_else(|| anyhow!("--label `{l}`: key=value"))?;
                    labels.insert(k.to_owned(), json!(v));
                }
                let body = json!({
                    "release": a.release, "number": a.number, "fleet": a.fleet, "group": a.group, "labels": labels,
                    "waves": a.waves, "success_pct": a.success_pct, "soak_secs": a.soak, "errors": a.errors,
                    "rate_per_min": a.rate, "deadline_secs": a.deadline,
                    "shadow_agreement": a.shadow_agreement, "shadow_rows": a.shadow_rows,
                    "drift_max": a.drift_max, "escalation_rise": a.escalation_rise, "p99_ratio": a.p99_ratio,
                    "rollback": a.rollback,
                });
                let mut api = Api::open(&a.conn).await?;
                let v = api.json(Method::POST, "/api/rollouts", body.to_string()).await?;
                if a.conn.json {
                    print_json(&v);
                } else {
                    println!(
                        "rollout {} started: release {} to {}/{}",
                        v["id"],
                        v["number"],
                        text(&v["fleet"]),
                        text(&v["group"])
                    );
                }
                Ok(())
            }
            RolloutCommand::Status { id, watch, conn } => {
                let mut api = Api::open(&conn).await?;
                let path = id.map_or("/api/rollouts?limit=5".into(), |i| format!("/api/rollouts/{i}"));
                let tty = std::io::stdout().is_terminal();
                let mut last = String::new();
                loop {
                    let v = api.get(&path).await?;
                    let list = if v.is_array() { v.as_array().cloned().unwrap_or_default() } else { vec![v.clone()] };
                    let shown = if conn.json {
                        serde_json::to_string_pretty(&v)?
                    } else {
                        list.iter().map(describe).collect::<Vec<_>>().join("\n")
                    };
                    if shown != last {
                        if watch && tty && !last.is_empty() {
                            print!("\x1b[{}A\x1b[J", last.lines().count());
                        }
                        println!("{shown}");
                        last = shown;
                    }
                    let live = list.iter().any(|r| r["state"] == "running");
                    if !watch || !live {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            RolloutCommand::Pause(a) => act(a, "pause").await,
            RolloutCommand::Resume(a) => act(a, "resume").await,
            RolloutCommand::Abort(a) => act(a, "abort").await,
            RolloutCommand::Retry(a) => act(a, "retry").await,
        }
    })
}

async fn act(a: ActArgs, action: &str) -> anyhow::Result<()> {
    let mut api = Api::open(&a.conn).await?;
    let v = api.json(Method::POST, &format!("/api/rollouts/{}/{action}", a.id), Bytes::new()).await?;
    if a.conn.json {
        print_json(&v);
    } else if let Some(n) = v["retried"].as_u64() {
        println!("rollout {}: {n} device(s) will be offered the release again", a.id);
    } else {
        println!("rollout {}: {action} done", a.id);
    }
    Ok(())
}

/// A rollout in a few lines: state, one progress bar per wave, the failures.
pub fn describe(r: &Value) -> String {
    let c = &r["counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let mut out = format!(
        "rollout {} release {} to {}/{}: {}{} | {} devices: {} succeeded, {} failed, {} timed out, {} in flight, {} pending",
        r["id"],
        r["number"],
        text(&r["fleet"]),
        text(&r["group"]),
        text(&r["state"]),
        r["reason"].as_str().map(|s| format!(" ({})", printable(s))).unwrap_or_default(),
        r["devices"],
        n("succeeded"),
        n("failed"),
        n("timed_out"),
        n("offered"),
        n("pending"),
    );
    for w in r["waves"].as_array().into_iter().flatten() {
        let size = w["size"].as_u64().unwrap_or(0);
        let wc = &w["counts"];
        let ok = wc["succeeded"].as_u64().unwrap_or(0);
        let bad = wc["failed"].as_u64().unwrap_or(0) + wc["timed_out"].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "\n  wave {} ({:>4}) {} {ok}/{size} ok, {bad} failed",
            w["wave"],
            text(&w["spec"]),
            bar(ok, bad, size, 30)
        ));
    }
    for f in r["failures"].as_array().into_iter().flatten().take(10) {
        out.push_str(&format!("\n  {} {}: {}", text(&f["device"]), text(&f["status"]), text(&f["reason"])));
    }
    out
}

fn bar(ok: u64, bad: u64, size: u64, width: u64) -> String {
    if size == 0 {
        return format!("[{}]", " ".repeat(width as usize));
    }
    let g = (ok * width).div_ceil(size).min(width);
    let b = (bad * width).div_ceil(size).min(width - g);
    format!("[{}{}{}]", "#".repeat(g as usize), "x".repeat(b as usize), ".".repeat((width - g - b) as usize))
}

/// The upload's byte progress on stderr (drawn on a terminal only, at most 20 times a second),
/// with its rate and time left.
fn upload_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "upload [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} left",
    )
    .expect("a valid template")
    .progress_chars("#>.");
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_reach_the_terminal_with_their_control_characters_escaped() {
        let evil = serde_json::json!("ok\u{1b}[2J\u{1b}]0;owned\u{7}\r\nnext");
        assert_eq!(text(&evil), "ok\\u{1b}[2J\\u{1b}]0;owned\\u{7}\\r\\nnext");
        assert_eq!(text(&serde_json::json!("plain ü")), "plain ü");
        let rollout = serde_json::json!({"id": 1, "number": 2, "fleet": "f", "group": "g", "state": "paused",
            "reason": "bad\u{1b}[31m", "devices": 1, "counts": {}, "waves": [],
            "failures": [{"device": "d\u{1b}c", "status": "failed", "reason": "x\u{9b}y"}]});
        let shown = describe(&rollout);
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n'), "{shown:?}");
        assert!(
            shown.contains("bad\\u{1b}[31m") && shown.contains("d\\u{1b}c") && shown.contains("x\\u{9b}y"),
            "{shown}"
        );
    }
}
