//! `outpostctl bench`: load on a running server from N keep-alive clients, next to the raw
//! backend call on the same input (the floor the HTTP path adds to).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::http::Method;
use outpost_runtime::backend;
use outpost_runtime::golden::Golden;
use outpost_runtime::tensor::Tensor;
use outpost_runtime::{choice, threads};

use crate::http::Conn;
use crate::v2client;

/// Latency percentiles and throughput of one run.
#[derive(Debug)]
pub struct Summary {
    pub requests: usize,
    pub errors: usize,
    pub rps: f64,
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
}

impl Summary {
    fn of(mut latencies: Vec<Duration>, errors: usize, elapsed: Duration) -> Summary {
        latencies.sort_unstable();
        let pct = |p: f64| {
            if latencies.is_empty() {
                Duration::ZERO
            } else {
                latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
            }
        };
        Summary {
            requests: latencies.len(),
            errors,
            rps: latencies.len() as f64 / elapsed.as_secs_f64(),
            p50: pct(0.50),
            p95: pct(0.95),
            p99: pct(0.99),
        }
    }

    /// One table row.
    pub fn row(&self, label: &str) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        format!(
            "{label:<18} {:>9} {:>7} {:>11.0} {:>10.1} {:>10.1} {:>10.1}",
            self.requests,
            self.errors,
            self.rps,
            us(self.p50),
            us(self.p95),
            us(self.p99)
        )
    }
}

/// The table header matching [`Summary::row`].
pub const HEADER: &str = "what                requests  errors       req/s    p50(us)    p95(us)    p99(us)";

/// The golden file beside `model`.
fn golden_of(model: &Path) -> anyhow::Result<Golden> {
    let path = Golden::beside(model).with_context(|| format!("no golden file beside {}", model.display()))?;
    Ok(Golden::read(&path)?)
}

/// The golden inputs, whole.
fn golden_tensors(golden: &Golden) -> anyhow::Result<Vec<Tensor>> {
    golden.inputs.iter().map(|g| g.to_tensor().map_err(anyhow::Error::msg)).collect()
}

/// The first `batch` rows of the golden inputs beside `model`: the benchmark's input.
pub fn golden_input(model: &Path, batch: usize) -> anyhow::Result<Vec<Tensor>> {
    golden_tensors(&golden_of(model)?)?
        .into_iter()
        .map(|t| match t.first_rows(batch) {
            Some(rows) if batch > 0 => Ok(rows),
            _ => {
                bail!("--batch must be between 1 and {} (the golden inputs' batch)", t.shape.first().unwrap_or(&0))
            }
        })
        .collect()
}

/// The raw backend call on `inputs`, back to back from one thread, for `duration`, with the
/// threads it gets when served: `threads` where given, else those the server's rule picks at
/// load on the same input ([`choice::threads`]). Returns the threads with the summary.
pub fn floor(
    model: &Path,
    backend_name: &str,
    inputs: &[Tensor],
    threads: Option<usize>,
    duration: Duration,
) -> anyhow::Result<(Summary, usize)> {
    anyhow::ensure!(threads != Some(0), "--intra-op-threads must be at least 1");
    let backend = backend::by_name(backend_name)?;
    let options = backend::SessionOptions { intra_op_threads: threads, ..Default::default() };
    let session = backend::load(backend.as_ref(), model, &options)?;
    // As the server does at load: plans for the golden inputs' shapes, where they are faster.
    let golden = golden_of(model)?;
    let specialise = |session: &dyn backend::Session| -> anyhow::Result<()> {
        session.specialise(&golden_tensors(&golden)?, golden.allowed_diff());
        Ok(())
    };
    specialise(session.as_ref())?;
    let (session, threads) = match threads {
        Some(n) => (session, n),
        None => served_threads(backend.as_ref(), model, session, inputs, &specialise)?,
    };
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        let t = Instant::now();
        session.run(inputs)?;
        latencies.push(t.elapsed());
    }
    Ok((Summary::of(latencies, 0, started.elapsed()), threads))
}

/// The session on the threads the server would serve `pooled`'s model with (a short call on a
/// backend with a pool runs on one thread), and their count. A one-thread session loaded here
/// gets the same plans as `pooled` (`specialise`).
fn served_threads(
    backend: &dyn backend::Backend,
    model: &Path,
    pooled: Box<dyn backend::Session>,
    inputs: &[Tensor],
    specialise: &dyn Fn(&dyn backend::Session) -> anyhow::Result<()>,
) -> anyhow::Result<(Box<dyn backend::Session>, usize)> {
    if !backend.has_thread_pool() || threads::available() < 2 {
        return Ok((pooled, 1));
    }
    let one = match pooled.on_threads(1) {
        Some(one) => one,
        None => {
            let options = backend::SessionOptions { intra_op_threads: Some(1), ..Default::default() };
            let one = backend::load(backend, model, &options)?;
            specialise(one.as_ref())?;
            one
        }
    };
    let choice = choice::threads(pooled.as_ref(), one.as_ref(), backend.pool_may_lose(), inputs);
    Ok(if choice.threads == 1 { (one, 1) } else { (pooled, choice.threads) })
}

/// `concurrency` keep-alive clients sending the same request back to back for `duration`.
pub async fn load(
    addr: SocketAddr,
    path: &str,
    body: &v2client::Body,
    token: Option<&str>,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Summary> {
    load_with(addr, Method::POST, path, body, token, concurrency, duration).await
}

/// `GET /v2/health/live` under the same clients: the HTTP floor of this server and client (no
/// body to parse, no model), which inference adds to.
pub async fn live(
    addr: SocketAddr,
    token: Option<&str>,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Summary> {
    let none = v2client::Body { headers: Vec::new(), bytes: Vec::new() };
    load_with(addr, Method::GET, "/v2/health/live", &none, token, concurrency, duration).await
}

async fn load_with(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &v2client::Body,
    token: Option<&str>,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Summary> {
    let mut headers = body.headers.clone();
    if let Some(t) = token {
        headers.push(("authorization", format!("Bearer {t}")));
    }
    let payload = bytes::Bytes::from(body.bytes.clone());
    let started = Instant::now();
    let deadline = started + duration;
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let mut conn = Conn::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let (headers, payload, path, method) = (headers.clone(), payload.clone(), path.to_owned(), method.clone());
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            while Instant::now() < deadline {
                let t = Instant::now();
                match conn.send(method.clone(), &path, &headers, payload.clone()).await {
                    Ok(r) if r.status == 200 => latencies.push(t.elapsed()),
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        match Conn::connect(addr).await {
                            Ok(c) => conn = c,
                            Err(_) => break,
                        }
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for c in clients {
        let (l, e) = c.await?;
        latencies.extend(l);
        errors += e;
    }
    Ok(Summary::of(latencies, errors, started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_rank() {
        let l: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = Summary::of(l, 2, Duration::from_secs(1));
        assert_eq!(
            (s.p50, s.p95, s.p99),
            (Duration::from_micros(50), Duration::from_micros(95), Duration::from_micros(99))
        );
        assert_eq!((s.requests, s.errors), (100, 2));
        assert_eq!(s.rps, 100.0);
    }

    #[test]
    fn golden_input_takes_the_first_rows() {
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits-cnn.onnx");
        let t = golden_input(&model, 4).unwrap();
        assert_eq!(t[0].shape, vec![4, 1, 8, 8]);
        assert_eq!(t[0].data.len(), 4 * 64 * 4);
        assert!(golden_input(&model, 17).is_err());
    }
}
