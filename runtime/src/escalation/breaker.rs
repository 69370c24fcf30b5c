//! A circuit breaker for the central model: after enough consecutive failures it opens and calls
//! stop; after the cool-down one probe goes through; its success closes the breaker, its failure
//! opens it again. Lock-free: the request path reads two atomics.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// The breaker's state, as metrics show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// 0 closed, 1 open, 2 half-open (probing).
    pub fn gauge(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: AtomicU32,
    /// Microseconds since [`epoch`] when the breaker opened; 0 when closed.
    opened_at: AtomicU64,
    probing: AtomicBool,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    (epoch().elapsed().as_micros() as u64).max(1)
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        epoch();
        Breaker {
            threshold,
            cooldown,
            failures: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    /// Whether a call may go now. While open, `true` once per cool-down: the probe.
    pub fn allow(&self) -> bool {
        let opened = self.opened_at.load(SeqCst);
        if opened == 0 {
            return true;
        }
        let cooled = now_us().saturating_sub(opened) >= self.cooldown.as_micros() as u64;
        cooled && self.probing.compare_exchange(false, true, SeqCst, SeqCst).is_ok()
    }

    /// A call succeeded: close.
    pub fn success(&self) {
        self.failures.store(0, SeqCst);
        self.opened_at.store(0, SeqCst);
        self.probing.store(false, SeqCst);
    }

    /// A call failed: count it; open at the threshold, or again after a failed probe.
    pub fn failure(&self) {
        if self.probing.swap(false, SeqCst) {
            self.opened_at.store(now_us(), SeqCst);
            return;
        }
        let n = self.failures.fetch_add(1, SeqCst) + 1;
        if n >= self.threshold && self.opened_at.load(SeqCst) == 0 {
            self.opened_at.store(now_us(), SeqCst);
            tracing::warn!(
                failures = n,
                cooldown_ms = self.cooldown.as_millis() as u64,
                "central model failing: circuit breaker open"
            );
        }
    }

    pub fn state(&self) -> BreakerState {
        if self.opened_at.load(SeqCst) == 0 {
            BreakerState::Closed
        } else if self.probing.load(SeqCst) {
            BreakerState::HalfOpen
        } else {
            BreakerState::Open
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_at_the_threshold_probes_after_the_cooldown_and_closes_on_success() {
        let b = Breaker::new(3, Duration::from_millis(20));
        for _ in 0..2 {
            assert!(b.allow());
            b.failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(), "open: no calls");
        std::thread::sleep(Duration::from_millis(25));
        assert!(b.allow(), "one probe after the cool-down");
        assert!(!b.allow(), "only one");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.failure();
        assert_eq!(b.state(), BreakerState::Open, "a failed probe opens it again");
        std::thread::sleep(Duration::from_millis(25));
        assert!(b.allow());
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow());
    }
}
