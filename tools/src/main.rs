//! `outpostctl`: operator tools for Outpost.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_tools::{bench, broker, console, eval, profile, releases, simulate, v2client};

#[derive(Parser)]
#[command(name = "outpostctl", version, about = "Operator tools for Outpost")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a running server with N keep-alive clients and print latency percentiles and
    /// requests/s, next to the raw backend call on the same input and, at each client count,
    /// the same server's `GET /v2/health/live` (the HTTP floor).
    Bench(BenchArgs),
    /// Run the labelled held-out set through a running edge and its central, sweep escalation
    /// policies and thresholds, print a table and write a plot.
    Eval(EvalArgs),
    /// A model's reference profile (its answers' and inputs' distributions on a reference set),
    /// written beside it for drift on the device.
    Profile(profile::ProfileArgs),
    /// Signing keys.
    #[command(subcommand)]
    Keys(releases::KeysCommand),
    /// Root documents: the fleet's root keys and the release role.
    #[command(subcommand)]
    Root(releases::RootCommand),
    /// Add a key's signature to a signed-envelope file (a root document or release.json).
    Sign {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Release directories: create, sign, verify, show.
    #[command(subcommand)]
    Release(releases::ReleaseCommand),
    /// Add zstd patch-from deltas against earlier releases to an unsigned release.
    Delta(releases::DeltaArgs),
    /// Publish a signed release to devices' retained `desired` topics over MQTT.
    Publish(broker::PublishArgs),
    /// Answer devices' chunk requests over MQTT from blob directories (one of several, through
    /// a shared subscription).
    ServeBlobs(broker::ServeBlobsArgs),
    /// Run N simulated devices (the real MQTT agent and updater, a fake inference backend)
    /// against a broker, optionally with injected failures.
    Simulate(simulate::SimulateArgs),
    /// The fleet console: device states, releases, staged rollouts, the blob server, a JSON
    /// API and a web page.
    Console(console::service::ConsoleArgs),
    /// Devices as the console sees them.
    #[command(subcommand)]
    Fleet(console::client::FleetCommand),
    /// Staged rollouts on the console.
    #[command(subcommand)]
    Rollout(console::client::RolloutCommand),
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The edge server (escalation configured for --model).
    #[arg(long, default_value = "127.0.0.1:8000")]
    edge: SocketAddr,
    /// The model on the edge.
    #[arg(long, default_value = "digits")]
    model: String,
    /// The central server, for the central-only baseline.
    #[arg(long, default_value = "127.0.0.1:8001")]
    central: SocketAddr,
    #[arg(long, default_value = "digits-central")]
    central_model: String,
    /// Labelled rows: label, then the input's values.
    #[arg(long, default_value = "models/digits-test.csv")]
    data: PathBuf,
    /// The models' input name (each row is sent as this input, shape [1, values]).
    #[arg(long, default_value = "input")]
    input: String,
    /// The input's datatype.
    #[arg(long, value_enum, default_value = "FP32")]
    datatype: eval::Datatype,
    /// Use only the first N rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Comma-separated thresholds to try for each policy.
    #[arg(long, value_delimiter = ',')]
    thresholds: Vec<f64>,
    /// Where to write the SVG plot.
    #[arg(long, default_value = "escalation.svg")]
    plot: PathBuf,
    /// Accuracy margin (percentage points) to the central model for picking the best point.
    #[arg(long, default_value_t = 0.5)]
    within: f64,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// Model name on the server.
    #[arg(long)]
    model: String,
    /// The model file, for the floor and for its golden inputs (default: models/NAME.onnx).
    #[arg(long)]
    model_file: Option<PathBuf>,
    /// Comma-separated client counts.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Seconds per concurrency level.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Rows per request (taken from the golden inputs).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Send binary tensors instead of JSON.
    #[arg(long)]
    binary: bool,
    /// Backends for the floor measurement, comma-separated (each measured in turn).
    #[arg(long, default_value = "tract", value_delimiter = ',')]
    backend: Vec<String>,
    /// Measure the backend floor only (no server needed).
    #[arg(long)]
    floor_only: bool,
    /// Threads inside one call of the floor (default: the backend's pool, every CPU this
    /// process may use; the server measures one against the pool at load).
    #[arg(long)]
    intra_op_threads: Option<usize>,
    /// Bearer token, when the server wants one.
    #[arg(long, env = "OUTPOST_TOKEN")]
    token: Option<String>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => run_bench(args),
        Command::Eval(args) => run_eval(args),
        Command::Profile(args) => profile::profile(args),
        Command::Keys(c) => releases::keys(c),
        Command::Root(c) => releases::root(c),
        Command::Sign { file, key } => releases::sign(&file, &key),
        Command::Release(c) => releases::release(c),
        Command::Delta(a) => releases::delta(a),
        Command::Publish(a) => broker::publish(a),
        Command::ServeBlobs(a) => broker::serve_blobs(a),
        Command::Simulate(a) => simulate::simulate(a),
        Command::Console(a) => console::service::run(a),
        Command::Fleet(c) => console::client::fleet(c),
        Command::Rollout(c) => console::client::rollout(c),
    }
}

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let rows = eval::read_rows(&args.data, args.limit)?;
    let thresholds =
        if args.thresholds.is_empty() { eval::DEFAULT_THRESHOLDS.to_vec() } else { args.thresholds.clone() };
    let target = eval::Target {
        edge: args.edge,
        model: args.model,
        central: args.central,
        central_model: args.central_model,
        input: args.input,
        datatype: args.datatype,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let points = runtime.block_on(eval::sweep(&target, &rows, &thresholds))?;
    println!("{} labelled rows from {}\n", rows.len(), args.data.display());
    print!("{}", eval::table(&points));
    match eval::best(&points, args.within / 100.0) {
        Some(b) => println!(
            "\nbest: {} at {} escalates {:.1}% for {:.2}% accuracy (central only: {:.2}%)",
            b.policy.unwrap_or("-"),
            b.threshold.unwrap_or(0.0),
            b.escalated * 100.0,
            b.accuracy * 100.0,
            points[1].accuracy * 100.0
        ),
        None => println!("\nno threshold comes within {} points of the central model", args.within),
    }
    std::fs::write(&args.plot, eval::plot(&points)).with_context(|| format!("writing {}", args.plot.display()))?;
    println!("plot: {}", args.plot.display());
    Ok(())
}

fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let model_file = args.model_file.clone().unwrap_or_else(|| PathBuf::from(format!("models/{}.onnx", args.model)));
    let inputs = bench::golden_input(&model_file, args.batch)?;
    let body = if args.binary { v2client::binary_request(&inputs) } else { v2client::json_request(&inputs) };
    let duration = Duration::from_secs_f64(args.duration);
    let path = format!("/v2/models/{}/infer", args.model);
    println!(
        "model {} ({}), batch {}, {} body of {} bytes, {}s per level",
        args.model,
        model_file.display(),
        args.batch,
        if args.binary { "binary" } else { "JSON" },
        body.bytes.len(),
        args.duration
    );
    println!("{}", bench::HEADER);
    for backend in &args.backend {
        let (floor, threads) = bench::floor(&model_file, backend, &inputs, args.intra_op_threads, duration)
            .with_context(|| format!("measuring the backend floor on {backend}"))?;
        println!("{}", floor.row(&format!("backend ({backend})")));
        println!("  (the {backend} call on {threads} thread{})", if threads == 1 { "" } else { "s" });
    }
    if args.floor_only {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for c in &args.concurrency {
        let s = runtime.block_on(bench::live(args.addr, args.token.as_deref(), *c, duration))?;
        println!("{}", s.row(&format!("live c={c}")));
        let s = runtime.block_on(bench::load(args.addr, &path, &body, args.token.as_deref(), *c, duration))?;
        println!("{}", s.row(&format!("http c={c}")));
    }
    Ok(())
}
