//! `outpostctl`'s library: the HTTP client and V2 request helpers it shares with the end-to-end
//! tests, and the benchmark.

pub mod bench;
pub mod http;
pub mod v2client;
