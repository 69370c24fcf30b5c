//! `outpost`: the edge inference daemon and its local CLI.
//!
//! `serve` runs the daemon ([`daemon`], its options in [`serve_args`]); `inspect` and `infer`
//! look at one model without a server ([`inspect`]); `update` works on the release store
//! ([`update`]).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use outpost_runtime::backend;

mod daemon;
mod inspect;
mod serve_args;
mod trim;
mod update;

/// Every build's allocator, musl's and glibc's alike (see runtime/Cargo.toml).
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
    Serve(Box<serve_args::ServeArgs>),
    /// Show a model's inputs, outputs and operators, and whether this build can run it.
    Inspect {
        model: PathBuf,
        #[arg(long, default_value = backend::FIRST_BACKEND)]
        backend: String,
    },
    /// Run one inference without a server. The input file is a V2 inference request body.
    Infer {
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value = backend::FIRST_BACKEND)]
        backend: String,
    },
    /// Signed releases: provision the trusted root, apply a release directory, show the state.
    Update(update::UpdateArgs),
}

fn main() -> ExitCode {
    quiet_library_backtraces();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => daemon::serve(*args),
        Command::Inspect { model, backend } => inspect::inspect(&model, &backend),
        Command::Infer { model, input, backend } => inspect::infer(&model, &input, &backend),
        Command::Update(args) => update::run(args),
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
    // ONNX Runtime's own log (target `ort`) says a dozen lines per session at info: warnings only,
    // unless OUTPOST_LOG asks for more.
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| "info,ort=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
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
