//! `outpost update`: signed releases from the command line. When the daemon runs, it holds the
//! store and the command hands the release to it over the local HTTP API; when it does not, the
//! command applies the release itself (same checks, same health gate on this machine's runtime),
//! and the daemon serves it at its next start.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use outpost_runtime::App;
use outpost_runtime::config::{Config, Validated};
use outpost_runtime::releases::{OpenError, ReleaseService};
use outpost_updater::store::StoreBusy;
use serde_json::{Value, json};

#[derive(clap::Subcommand)]
pub enum UpdateCommand {
    /// Trust a fleet's first root document (self-signed by its root keys' threshold).
    Provision { root: PathBuf },
    /// Verify and apply a release directory (offline, or through the running daemon).
    Apply { release_dir: PathBuf },
    /// Verify and stage a release directory as the candidate: its models run beside the
    /// serving ones as shadows, on a share of the requests (running daemon only).
    Candidate { release_dir: PathBuf },
    /// Activate the candidate release (running daemon only).
    Promote,
    /// Drop the candidate release (running daemon only).
    Drop,
    /// Return to the release that ran before the active one: once, and the release reverted
    /// from can never be applied again (its fix comes as a release with a higher number).
    Revert,
    /// Show the trusted state and the last update's outcome.
    Status,
    /// Check the store and load the active release as the daemon does at start (stopped
    /// daemon only): exit 0 when the active release loads and passes its golden check.
    Check,
}

#[derive(clap::Args)]
pub struct UpdateArgs {
    /// The daemon's configuration file (its [updates] section names the store).
    #[arg(long, short, global = true, default_value = "outpost.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: UpdateCommand,
}

/// Exit status for a refused update.
const EXIT_REFUSED: u8 = 2;

pub fn run(args: UpdateArgs) -> anyhow::Result<ExitCode> {
    let config = Config::read(&args.config).and_then(|c| c.validate()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(updates_config) = config.updates.clone() else {
        bail!("{}: no [updates] section (state_dir, fleet)", args.config.display());
    };
    let app = App::new(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let _entered = runtime.enter();
    let local = match ReleaseService::open(&updates_config, &app.registry) {
        Ok(u) => Some(u),
        Err(OpenError::Busy(StoreBusy::Locked)) => None,
        Err(e) => bail!("{}: {e}", updates_config.state_dir.display()),
    };
    match (args.command, local) {
        (UpdateCommand::Provision { root }, Some(u)) => match u.provision(&root) {
            Ok(msg) => {
                println!("{msg}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => refused(&e.to_string()),
        },
        (UpdateCommand::Provision { .. }, None) => bail!("stop the daemon to provision its store"),
        (UpdateCommand::Apply { release_dir }, local) => {
            let dir = std::fs::canonicalize(&release_dir).with_context(|| release_dir.display().to_string())?;
            let answer = match local {
                Some(u) => {
                    // The store check of a start (staging needs nothing of the active models);
                    // a broken active release must not stop the release that fixes it.
                    if let Err(e) = u.check_store() {
                        eprintln!("outpost: warning: {e}");
                    }
                    match u.apply(&dir) {
                        Ok(a) => json!({ "applied": a }),
                        Err(e) => json!({ "error": e.to_string(), "refusal": e.kind.as_str() }),
                    }
                }
                None => daemon_call(&config, "POST", "/v2/update/apply", Some(&json!({ "release_dir": dir })))?,
            };
            println!("{}", serde_json::to_string_pretty(&answer)?);
            if answer.get("applied").is_some() { Ok(ExitCode::SUCCESS) } else { Ok(ExitCode::from(EXIT_REFUSED)) }
        }
        (UpdateCommand::Candidate { .. } | UpdateCommand::Promote | UpdateCommand::Drop, Some(_)) => {
            bail!("a candidate runs as a shadow in the running daemon: start it, then run this again")
        }
        (UpdateCommand::Candidate { release_dir }, None) => {
            let dir = std::fs::canonicalize(&release_dir).with_context(|| release_dir.display().to_string())?;
            answered(daemon_call(&config, "POST", "/v2/update/candidate", Some(&json!({ "release_dir": dir })))?)
        }
        (UpdateCommand::Promote, None) => {
            answered(daemon_call(&config, "POST", "/v2/update/promote", Some(&json!({})))?)
        }
        (UpdateCommand::Drop, None) => answered(daemon_call(&config, "POST", "/v2/update/drop", Some(&json!({})))?),
        (UpdateCommand::Revert, Some(u)) => {
            if let Err(e) = u.check_store() {
                eprintln!("outpost: warning: {e}");
            }
            answered(match u.revert() {
                Ok(a) => json!({ "applied": a }),
                Err(e) => json!({ "error": e.to_string(), "refusal": e.kind.as_str() }),
            })
        }
        (UpdateCommand::Revert, None) => answered(daemon_call(&config, "POST", "/v2/update/revert", Some(&json!({})))?),
        (UpdateCommand::Status, Some(u)) => {
            println!("{}", serde_json::to_string_pretty(&u.status())?);
            Ok(ExitCode::SUCCESS)
        }
        (UpdateCommand::Status, None) => {
            println!("{}", serde_json::to_string_pretty(&daemon_call(&config, "GET", "/v2/update/status", None)?)?);
            Ok(ExitCode::SUCCESS)
        }
        (UpdateCommand::Check, Some(u)) => {
            let fell_back = load_active(&u)?;
            let mut status = u.status();
            status["fell_back"] = json!(fell_back);
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(ExitCode::SUCCESS)
        }
        (UpdateCommand::Check, None) => bail!("the daemon holds the store; ask it: outpost update status"),
    }
}

/// Checks the store as the daemon does at start (falling back from a damaged active release)
/// and loads the active release's models with their golden check.
fn load_active(u: &Arc<ReleaseService>) -> anyhow::Result<Option<String>> {
    u.serve_active().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Prints the daemon's answer; exit status 2 when it refused.
fn answered(answer: Value) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if answer.get("error").is_some() { Ok(ExitCode::from(EXIT_REFUSED)) } else { Ok(ExitCode::SUCCESS) }
}

fn refused(msg: &str) -> anyhow::Result<ExitCode> {
    eprintln!("outpost: refused: {msg}");
    Ok(ExitCode::from(EXIT_REFUSED))
}

/// One request to the local daemon (HTTP/1.1, connection closed after the answer).
fn daemon_call(config: &Validated, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
    let addr = config.listen;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("the store is locked, but no daemon answers on {addr}"))?;
    // Applying loads and checks models: allow it time.
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = config.auth_token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{auth}\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").context("a malformed answer from the daemon")?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    serde_json::from_str(body).with_context(|| format!("the daemon answered {status} with: {body}"))
}
