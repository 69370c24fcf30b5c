//! How many threads one inference gets inside a backend that has a thread pool (ONNX Runtime),
//! when the model's configuration leaves `intra_op_threads` unset.
//!
//! A pool pays for itself only where the call is long enough to split: ONNX Runtime's threads
//! hand work over at every operator and spin between operators, so on a short call a second
//! thread buys little time and takes a core the HTTP side and the other requests need (a 50 µs
//! CNN served 5,241–5,672 req/s at c=8 with two threads, 8,409–9,539 with one; docs/backends.md,
//! "Threads"). So the call is measured at load on the model's warm-up input on one thread, and
//! the pool (every CPU this process may use) serves only a call of at least [`POOL_MIN_CALL_US`]
//! there, where the HTTP side's share of a request (about 100 µs) is a tenth or less.
//!
//! The rule reads the one-thread call only. Timing the pool against one thread was tried and
//! not kept: a pool needs every core at once, and with several models loading on a 2-core box the
//! same pool measured 1.1–2.8× slower than alone, so the choice changed from start to start.

use serde::Serialize;

/// The shortest one-thread call the pool serves, in microseconds.
pub const POOL_MIN_CALL_US: f64 = 1000.0;

/// The threads one inference of a served version gets, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ThreadChoice {
    pub threads: usize,
    /// `configured`, `measured`, or `one cpu` (this process may use one CPU only).
    pub by: &'static str,
    /// The median call on one thread, in microseconds (`measured` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_thread_p50_us: Option<f64>,
}

impl ThreadChoice {
    pub fn configured(threads: usize) -> ThreadChoice {
        ThreadChoice { threads, by: "configured", one_thread_p50_us: None }
    }

    pub fn one_cpu() -> ThreadChoice {
        ThreadChoice { threads: 1, by: "one cpu", one_thread_p50_us: None }
    }

    /// The choice for a pool of `pool` threads from the median call on one thread.
    pub fn measured(pool: usize, one_us: f64) -> ThreadChoice {
        let threads = if one_us >= POOL_MIN_CALL_US { pool } else { 1 };
        ThreadChoice { threads, by: "measured", one_thread_p50_us: Some(one_us) }
    }
}

/// The CPUs this process may use (its affinity mask and cgroup quota), the pool's default size.
pub fn available() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_serves_calls_of_a_millisecond_or_more() {
        // Measured alone on ONNX Runtime (2 CPUs), one thread: the OCR detector and the
        // orientation classifier keep the pool (8.3 and 3.2 ms on two threads).
        assert_eq!(ThreadChoice::measured(2, 11_135.0).threads, 2);
        assert_eq!(ThreadChoice::measured(4, 5_365.0).threads, 4);
        assert_eq!(ThreadChoice::measured(2, 1_000.0).threads, 2);
        // The digits CNN and the voice detector: one thread.
        let short = ThreadChoice::measured(2, 63.6);
        assert_eq!((short.threads, short.by, short.one_thread_p50_us), (1, "measured", Some(63.6)));
        assert_eq!(ThreadChoice::measured(2, 160.0).threads, 1);
        // A failed measurement (infinite) keeps the pool, the default before this rule.
        assert_eq!(ThreadChoice::measured(2, f64::INFINITY).threads, 2);
        assert_eq!(ThreadChoice::measured(1, 5_000.0).threads, 1);
    }
}
