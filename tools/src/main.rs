//! `outpostctl`: operator tools for Outpost.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_tools::{bench, v2client};

#[derive(Parser)]
#[command(name = "outpostctl", version, about = "Operator tools for Outpost")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a running server with N keep-alive clients and print latency percentiles and
    /// requests/s, next to the raw backend call on the same input.
    Bench(BenchArgs),
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
    /// Backend for the floor measurement.
    #[arg(long, default_value = "tract")]
    backend: String,
    /// Bearer token, when the server wants one.
    #[arg(long, env = "OUTPOST_TOKEN")]
    token: Option<String>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => run_bench(args),
    }
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
    let floor = bench::floor(&model_file, &args.backend, &inputs, duration).context("measuring the backend floor")?;
    println!("{}", floor.row(&format!("backend ({})", args.backend)));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for c in &args.concurrency {
        let s = runtime.block_on(bench::load(args.addr, &path, &body, args.token.as_deref(), *c, duration))?;
        println!("{}", s.row(&format!("http c={c}")));
    }
    Ok(())
}
