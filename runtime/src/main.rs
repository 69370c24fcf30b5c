//! `outpost`: the edge inference daemon and its local CLI.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use outpost_runtime::config::{Config, DEFAULT_MODEL_DIR, EscalationConfig, ModelConfig};
use outpost_runtime::onnx::ModelGraph;
use outpost_runtime::{App, backend, server, v2};

#[path = "bin_update.rs"]
mod update_cmd;

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a bad configuration or command line (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "outpost", version, about = "Edge inference runtime: serves ONNX models over the KServe V2 HTTP API")]
struct Cli {
    /// Log format: text (plain when not on a terminal) or json (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "OUTPOST_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over HTTP. With no options, serves every model in ./models.
    Serve(Box<ServeArgs>),
    /// Show a model's inputs, outputs and operators, and whether this build can run it.
    Inspect {
        model: PathBuf,
        #[arg(long, default_value = backend::DEFAULT_BACKEND)]
        backend: String,
    },
    /// Run one inference without a server. The input file is a V2 inference request body.
    Infer {
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value = backend::DEFAULT_BACKEND)]
        backend: String,
    },
    /// Signed releases: provision the trusted root, apply a release directory, show the state.
    Update(update_cmd::UpdateArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (outpost.toml). Conflicts with --model and --model-dir.
    #[arg(long, short, conflicts_with_all = ["model", "model_dir"])]
    config: Option<PathBuf>,
    /// A model to serve, as PATH or PATH:NAME (name defaults to the file stem). Repeatable.
    #[arg(long, short)]
    model: Vec<String>,
    /// Serve every *.onnx in this folder (default: ./models when neither --config nor --model is given).
    #[arg(long, conflicts_with = "model")]
    model_dir: Option<PathBuf>,
    /// Serve a model repository: REPO/NAME/<version>/model.onnx, with optional REPO/NAME/config.toml.
    #[arg(long, conflicts_with_all = ["config", "model", "model_dir"])]
    model_repository: Option<PathBuf>,
    /// Address to listen on (overrides the configuration), e.g. 127.0.0.1:8000.
    #[arg(long)]
    listen: Option<String>,
    /// Backend for the models of --model and --model-dir: tract or ort (default: tract when
    /// this build has it).
    #[arg(long, conflicts_with = "config")]
    backend: Option<String>,
    /// Escalate unsure cases of the --model models to this central V2 server (http://host:port
    /// or https://host:port with --central-ca).
    #[arg(long, requires = "model", conflicts_with = "config")]
    central: Option<String>,
    /// The central model's name (default: the local model's name).
    #[arg(long, requires = "central")]
    central_model: Option<String>,
    /// PEM file of the CAs that sign an https central's certificate.
    #[arg(long, requires = "central")]
    central_ca: Option<PathBuf>,
    /// Escalate when the confidence is below this.
    #[arg(long, requires = "central", default_value_t = 0.9)]
    threshold: f64,
    /// Confidence measure: max_probability, margin or entropy.
    #[arg(long, requires = "central", default_value = "max_probability")]
    policy: String,
    /// Keep hard examples here while the central is unreachable.
    #[arg(long, requires = "central")]
    hard_example_queue: Option<PathBuf>,
    /// Collect hard examples uploaded by edges (POST /v2/hard-examples) in this folder.
    #[arg(long, conflicts_with = "config")]
    hard_example_sink: Option<PathBuf>,
}

fn main() -> ExitCode {
    quiet_library_backtraces();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Inspect { model, backend } => inspect(&model, &backend),
        Command::Infer { model, input, backend } => infer(&model, &input, &backend),
        Command::Update(args) => update_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn build_config(args: &ServeArgs) -> Result<Config, outpost_runtime::config::ConfigError> {
    let mut config = if let Some(path) = &args.config {
        Config::read(path)?
    } else if let Some(repo) = &args.model_repository {
        Config::from_repository(repo)?
    } else if !args.model.is_empty() {
        let models = args
            .model
            .iter()
            .map(|m| match m.rsplit_once(':') {
                Some((path, name)) if !name.contains('/') => ModelConfig::for_path(Path::new(path), Some(name)),
                _ => ModelConfig::for_path(Path::new(m), None),
            })
            .collect();
        Config { models, ..Config::default() }
    } else {
        Config::from_model_dir(args.model_dir.as_deref().unwrap_or(Path::new(DEFAULT_MODEL_DIR)))?
    };
    if let Some(listen) = &args.listen {
        config.server.listen = Some(listen.clone());
    }
    if let Some(backend) = &args.backend {
        for m in &mut config.models {
            m.backend = Some(backend.clone());
        }
    }
    if let Some(central) = &args.central {
        for m in &mut config.models {
            m.escalation = Some(EscalationConfig {
                central_url: central.clone(),
                central_model: args.central_model.clone().unwrap_or_else(|| m.name.clone()),
                threshold: args.threshold,
                policy: Some(args.policy.clone()),
                central_ca: args.central_ca.clone(),
                queue_dir: args.hard_example_queue.as_ref().map(|q| q.join(&m.name)),
                ..EscalationConfig::default()
            });
        }
    }
    if let Some(sink) = &args.hard_example_sink {
        config.server.hard_example_sink = Some(sink.clone());
    }
    Ok(config)
}

/// tract returns errors as part of normal control flow while it optimises a model (a rewrite that
/// does not apply is an `Err`), and each error captures a backtrace when `RUST_BACKTRACE` is set:
/// with the static musl build's unwinder that tripled the time to load the sample models (16 ->
/// 50 ms; 24 M -> 470 M instructions to load one model, counted with callgrind). Library
/// backtraces are therefore off unless `RUST_LIB_BACKTRACE` asks for them; `RUST_BACKTRACE`
/// still governs panic backtraces.
fn quiet_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: first thing in `main`, before this process has started any other thread.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let config = match build_config(&args).and_then(|c| c.validate()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost: configuration error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let app = App::new(&config);
        if let Some(u) = &config.updates {
            let updates = outpost_runtime::update::Updates::open(u, &app.registry)
                .with_context(|| format!("cannot open the release store {}", u.state_dir.display()))?;
            let _ = app.updates.set(updates);
        }
        tracing::info!(listen = %config.listen, models = config.models.len(), "outpost listening; loading models");
        let notifier = outpost_runtime::systemd::Notifier::from_env().map(Arc::new);
        let notify = |message: &str| {
            if let Some(n) = &notifier {
                n.send(message);
            }
        };
        notify(&format!("STATUS=loading {} models", config.models.len()));

        // The signal is awaited here, not inside the server: STOPPING=1 must go out before the
        // drain starts, whichever finishes first (an idle server drains at once).
        let signal = wait_for_signal();
        tokio::pin!(signal);
        let (drain, drain_now) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(server::serve(listener, app.clone(), async move {
            let _ = drain_now.await;
        }));
        tokio::spawn(reload_on_sighup(app.clone()));

        let loader = app.clone();
        let mut loading = tokio::task::spawn_blocking(move || {
            let failures = loader.registry.load_all();
            // The active release's models replace configured ones of the same name once loaded;
            // one that does not load leaves the configured models serving.
            if let Some(updates) = loader.updates.get() {
                match updates.serve_active() {
                    Ok(Some(fell_back)) => tracing::error!(report = %fell_back, "release store"),
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "the active release is not served"),
                }
            }
            failures
        });
        tokio::select! {
            failures = &mut loading => {
                let failures = failures.context("model loading panicked")?;
                if let Some(first) = failures.first() {
                    bail!("{} of {} models failed to load; first: {first}", failures.len(), config.models.len());
                }
                tracing::info!(ready_ms = started.elapsed().as_millis() as u64, "all models ready");
                if let Some(u) = config.updates.as_ref().filter(|u| u.mqtt.is_some()) {
                    start_agent(&app, u)?;
                }
                let serving = app.registry.slots().len();
                notify(&format!("READY=1\nSTATUS=serving {serving} models on {}", config.listen));
                if let (Some(n), Some(interval)) = (&notifier, outpost_runtime::systemd::watchdog_interval()) {
                    let mut probe = config.listen;
                    if probe.ip().is_unspecified() {
                        probe.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                    }
                    tokio::spawn(outpost_runtime::systemd::feed_watchdog(n.clone(), probe, interval));
                }
            }
            _ = &mut signal => {
                tracing::info!("signal received while loading models; stopping");
                return Ok(ExitCode::SUCCESS);
            }
        }
        tokio::select! {
            result = &mut server => {
                result??;
                return Ok(ExitCode::SUCCESS);
            }
            _ = &mut signal => {}
        }
        tracing::info!(
            timeout_s = config.drain_timeout.as_secs(),
            "stopping: no new connections, finishing in-flight requests"
        );
        notify("STOPPING=1\nSTATUS=draining in-flight requests");
        let _ = drain.send(());
        if let Some(agent) = app.agent.get() {
            agent.shutdown(Duration::from_secs(2)).await;
        }
        match tokio::time::timeout(config.drain_timeout, server).await {
            Ok(result) => {
                result??;
                tracing::info!("drained; exiting");
            }
            Err(_) => tracing::warn!("drain timeout passed with requests still in flight; exiting anyway"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Starts the MQTT agent on the open release store.
fn start_agent(app: &Arc<App>, u: &outpost_runtime::config::UpdatesConfig) -> Result<()> {
    let m = u.mqtt.as_ref().expect("checked by the caller");
    let mut cfg =
        outpost_runtime::config::agent_config(u, m).map_err(|(k, r)| anyhow::anyhow!("updates.mqtt.{k}: {r}"))?;
    if let Some(path) = &m.password_file {
        let password = outpost_runtime::agent::read_password(path)
            .with_context(|| format!("updates.mqtt.password_file {}", path.display()))?;
        cfg.broker.password = Some(password);
    }
    let updates = app.updates.get().context("the release store is not open")?.clone();
    let device = outpost_runtime::agent::RuntimeDevice::new(updates, app.registry.clone(), m.labels.clone());
    tracing::info!(device = %cfg.device_id, broker = %format!("{}:{}", cfg.broker.host, cfg.broker.port), "starting the MQTT agent");
    let agent = outpost_updater::mqtt::agent::start(cfg, device).map_err(|e| anyhow::anyhow!("MQTT agent: {e}"))?;
    let _ = app.agent.set(agent);
    Ok(())
}

/// SIGHUP: bring every model in line with its files (new versions in, removed ones out, changed
/// files reloaded), keeping what serves when a load fails.
async fn reload_on_sighup(app: Arc<App>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload through the repository API instead");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading models");
            let app = app.clone();
            let failures = tokio::task::spawn_blocking(move || app.registry.load_all()).await.unwrap_or_default();
            for f in &failures {
                tracing::error!(error = %f, "reload failed; the previous version keeps serving");
            }
            tracing::info!(failures = failures.len(), "reload done");
        }
    }
    #[cfg(not(unix))]
    let _ = app;
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn inspect(path: &Path, backend_name: &str) -> anyhow::Result<ExitCode> {
    let graph = ModelGraph::read(path)?;
    println!("model:   {}", path.display());
    println!("opset:   {}", graph.opset);
    for (kind, specs) in [("input", &graph.signature.inputs), ("output", &graph.signature.outputs)] {
        for s in specs {
            println!("{kind:7}  {} {} {}", s.name, s.datatype, s.shape_text());
        }
    }
    println!("ops:     {}", graph.operators().join(", "));
    let verdict = backend::by_name(backend_name).map_err(outpost_runtime::Error::from).and_then(|b| {
        b.check(&graph)?;
        Ok(b.prepare(&graph, &Default::default())?)
    });
    let session = match verdict {
        Ok(session) => session,
        Err(e) => {
            println!("runs on: not on {backend_name}: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("runs on: {backend_name} (this build)");
    match session.plans() {
        Some(p) if p.symbolic => println!("shapes:  one plan serves every input shape"),
        Some(_) => println!(
            "shapes:  one plan per input shape: {backend_name} cannot plan the symbolic dimensions at once; declare \
             the model's `shapes` to prepare them at load, else the first request at each shape prepares one"
        ),
        None => println!("shapes:  any shape the inputs allow"),
    }
    // Tried with the golden inputs where they ship beside the model.
    let Some(golden_path) = outpost_runtime::golden::Golden::beside(path) else {
        println!("tried:   no golden file beside the model, so no inference was run");
        return Ok(ExitCode::SUCCESS);
    };
    let golden = outpost_runtime::golden::Golden::read(&golden_path)?;
    let shapes: Vec<String> = golden.inputs.iter().map(|t| format!("`{}` {:?}", t.name, t.shape)).collect();
    match golden.check(&golden_path, session.as_ref()) {
        Ok(diff) => {
            println!("tried:   {} (golden inputs): outputs match, largest difference {diff:e}", shapes.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("tried:   {} (golden inputs): {e}", shapes.join(", "));
            Ok(ExitCode::FAILURE)
        }
    }
}

fn infer(path: &Path, input: &Path, backend_name: &str) -> anyhow::Result<ExitCode> {
    let body = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let request = v2::request::parse(&body, None).map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
    let backend = backend::by_name(backend_name)?;
    let session = backend::load(backend.as_ref(), path, &Default::default())?;
    let inputs = v2::request::bind(request.inputs, &path.display().to_string(), session.signature(), false)
        .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
    let t = Instant::now();
    let outputs = session.run(&inputs)?;
    let elapsed = t.elapsed();
    let outputs: Vec<serde_json::Value> = outputs
        .iter()
        .map(|o| serde_json::json!({ "name": o.name, "datatype": o.datatype, "shape": o.shape, "data": o.to_json() }))
        .collect();
    println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "outputs": outputs }))?);
    eprintln!("inference took {:.3} ms on {backend_name}", elapsed.as_secs_f64() * 1e3);
    Ok(ExitCode::SUCCESS)
}
