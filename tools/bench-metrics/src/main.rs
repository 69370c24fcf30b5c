//! Cost of one observation on the request path: the runtime's lock-free histogram against
//! prometheus-client's, and of rendering `/metrics` for one model's families.

#[allow(dead_code)]
#[path = "../../../runtime/src/stats.rs"]
mod stats;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::Histogram as PcHistogram;
use prometheus_client::registry::Registry;

const N: u64 = 5_000_000;

fn durations() -> impl Iterator<Item = Duration> {
    // Latencies spread over the buckets, as a request path sees them.
    (0..N).map(|i| Duration::from_nanos(20_000 + (i * 7919) % 3_000_000))
}

/// Nanoseconds per observation, each of `threads` threads making N observations.
fn per_observation(threads: usize, observe: impl Fn(Duration) + Send + Sync + 'static) -> f64 {
    let observe = Arc::new(observe);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let o = observe.clone();
            std::thread::spawn(move || durations().for_each(|d| o(black_box(d))))
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    started.elapsed().as_nanos() as f64 / (N as f64 * threads as f64)
}

fn main() {
    for threads in [1, 2] {
        let ours = Arc::new(stats::Histogram::default());
        let o = ours.clone();
        let ours_ns = per_observation(threads, move |d| o.observe(d));
        let theirs = PcHistogram::new(stats::LATENCY_BUCKETS.iter().copied());
        let t = theirs.clone();
        let theirs_ns = per_observation(threads, move |d| t.observe(d.as_secs_f64()));
        println!(
            "observe, {threads} thread(s): outpost {ours_ns:.1} ns, prometheus-client {theirs_ns:.1} ns ({:.2}x)",
            theirs_ns / ours_ns
        );
        assert_eq!(ours.count(), N * threads as u64);
    }

    // Rendering one histogram family, as /metrics does per model and version.
    let ours = stats::Histogram::default();
    let theirs = PcHistogram::new(stats::LATENCY_BUCKETS.iter().copied());
    durations().take(1000).for_each(|d| {
        ours.observe(d);
        theirs.observe(d.as_secs_f64());
    });
    let mut registry = Registry::default();
    registry.register("outpost_request_duration_seconds", "Whole request", theirs);
    let rounds = 20_000;
    let started = Instant::now();
    for _ in 0..rounds {
        let mut out = String::new();
        ours.render(&mut out, "outpost_request_duration_seconds", "model=\"m\",version=\"1\"", 1e-9);
        black_box(out);
    }
    let ours_us = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let started = Instant::now();
    for _ in 0..rounds {
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        black_box(out);
    }
    let theirs_us = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    println!("render one histogram: outpost {ours_us:.2} µs, prometheus-client {theirs_us:.2} µs");
}
