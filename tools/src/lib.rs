//! `outpostctl`'s library: the HTTP client and V2 request helpers it shares with the end-to-end
//! tests, the benchmark and the escalation evaluation.

pub mod bench;
pub mod eval;
pub mod fleet;
pub mod http;
pub mod releases;
pub mod simulate;
pub mod v2client;
