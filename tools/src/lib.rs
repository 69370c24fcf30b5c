//! `outpostctl`'s library: the HTTP client and V2 request helpers it shares with the end-to-end
//! tests, the benchmark and the escalation evaluation.

pub mod bench;
pub mod broker;
pub mod console;
pub mod eval;
pub mod http;
pub mod profile;
pub mod releases;
pub mod simulate;
pub mod v2client;

/// Logs to stderr, filtered by `OUTPOST_LOG` (default `info`), colour only on a terminal.
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The first 12 characters of an id, for people.
pub fn short(id: &str) -> &str {
    outpost_updater::short(id)
}
