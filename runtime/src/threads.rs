//! How many threads one inference gets inside a backend (tract's pool, ONNX Runtime's intra-op
//! pool), when the model's configuration leaves `intra_op_threads` unset.
//!
//! A pool pays for itself only where the call is long enough to split: ONNX Runtime's threads
//! hand work over at every operator and spin between operators, so on a short call a second
//! thread buys little time and takes a core the HTTP side and the other requests need (a 50 µs
//! CNN served 5,241–5,672 req/s at c=8 with two threads, 8,409–9,539 with one; docs/backends.md,
//! "Threads"). So the call is measured at load on the model's warm-up input on one thread, and
//! the pool (every CPU this process may use) is tried only for a call of at least
//! [`POOL_MIN_CALL_US`] there, where the HTTP side's share of a request (about 100 µs) is a
//! tenth or less.
//!
//! On tract such a call is measured on the pool too, and the pool serves only where it takes at
//! most [`POOL_MAX_SHARE`] of the one-thread call ([`crate::backend::Backend::pool_may_lose`]).
//! A long call does not always split well there: tract's pool wakes at every operator large
//! enough to split, and on a mobile network of many small operators the handovers cost more
//! than the second core gives (the OCR classifier, a 1.8 ms call on one thread, took 3.0 ms on
//! two; docs/backends.md). Both measurements run alone ([`crate::choice::median_us`]): no
//! other model loads or measures beside them. ONNX Runtime's pool is not timed: its long calls
//! gained on it in every measurement, and its timing moved from start to start.

use serde::Serialize;

/// The shortest one-thread call the pool serves, in microseconds.
pub const POOL_MIN_CALL_US: f64 = 1000.0;

/// The pool serves only where its call takes at most this share of the one-thread call: a pool
/// that gains less takes cores from the HTTP side and the other requests for little.
pub const POOL_MAX_SHARE: f64 = 0.9;

/// The threads one inference of a served version gets, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ThreadChoice {
    pub threads: usize,
    /// `configured`, `measured`, or `one cpu` (this process may use one CPU only).
    pub by: &'static str,
    /// The median call on one thread, in microseconds (`measured` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_thread_p50_us: Option<f64>,
    /// The median call on the pool, in microseconds (`measured`, where the one-thread call was
    /// long enough to try the pool).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_p50_us: Option<f64>,
}

impl ThreadChoice {
    pub fn configured(threads: usize) -> ThreadChoice {
        ThreadChoice { threads, by: "configured", one_thread_p50_us: None, pool_p50_us: None }
    }

    pub fn one_cpu() -> ThreadChoice {
        ThreadChoice { threads: 1, by: "one cpu", one_thread_p50_us: None, pool_p50_us: None }
    }

    /// The choice for a pool of `pool` threads from the median call on one thread and, where
    /// that was long enough to try it, on the pool (`None`: not measured, or the run failed).
    pub fn measured(pool: usize, one_us: f64, pool_us: Option<f64>) -> ThreadChoice {
        let gains = pool_us.is_none_or(|p| p <= one_us * POOL_MAX_SHARE);
        let threads = if one_us >= POOL_MIN_CALL_US && gains { pool } else { 1 };
        ThreadChoice { threads, by: "measured", one_thread_p50_us: Some(one_us), pool_p50_us: pool_us }
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
        assert_eq!(ThreadChoice::measured(2, 11_135.0, Some(8_300.0)).threads, 2);
        assert_eq!(ThreadChoice::measured(4, 5_365.0, Some(3_200.0)).threads, 4);
        assert_eq!(ThreadChoice::measured(2, 1_000.0, Some(900.0)).threads, 2);
        // The digits CNN and the voice detector: one thread, and the pool is not tried.
        let short = ThreadChoice::measured(2, 63.6, None);
        assert_eq!((short.threads, short.by, short.one_thread_p50_us), (1, "measured", Some(63.6)));
        assert_eq!(ThreadChoice::measured(2, 160.0, None).threads, 1);
        assert_eq!(ThreadChoice::measured(2, 160.0, Some(80.0)).threads, 1);
        // A long call the pool does not speed up by a tenth (tract on the OCR classifier: 1.8
        // ms on one thread, 3.0 on two) runs on one.
        assert_eq!(ThreadChoice::measured(2, 1_800.0, Some(3_000.0)).threads, 1);
        assert_eq!(ThreadChoice::measured(2, 4_300.0, Some(4_200.0)).threads, 1);
        let split = ThreadChoice::measured(2, 10_500.0, Some(7_700.0));
        assert_eq!((split.threads, split.pool_p50_us), (2, Some(7_700.0)));
        // A failed measurement (infinite, or no pool figure) keeps the pool, the default before
        // this rule.
        assert_eq!(ThreadChoice::measured(2, f64::INFINITY, None).threads, 2);
        assert_eq!(ThreadChoice::measured(2, 5_000.0, None).threads, 2);
        assert_eq!(ThreadChoice::measured(1, 5_000.0, Some(5_000.0)).threads, 1);
    }
}
