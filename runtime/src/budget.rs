//! A byte budget shared by every request in flight: a request reserves what it may take before
//! its body is read, and gives it back when it is answered. Past the budget a request is turned
//! away at once (503), so memory stays bounded in total, not only per request.

use std::sync::atomic::{AtomicU64, Ordering};

/// How many bytes a request of a given body may hold at its peak, at most: the body, and the
/// tensors decoded from it. A JSON element takes at least two bytes of text (`0,`) and at most
/// eight once decoded (FP64, INT64); binary tensors are copied once out of the body.
pub fn request_cost(body_bytes: u64, binary: bool) -> u64 {
    body_bytes.saturating_mul(if binary { 2 } else { 5 })
}

/// The budget; see the module's documentation.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
}

/// Bytes reserved until this is dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Budget {
        Budget { limit, used: AtomicU64::new(0) }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Reserves `bytes`, or `None` when that would pass the limit.
    pub fn reserve(&self, bytes: u64) -> Option<Reservation<'_>> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .ok()
            .map(|_| Reservation { budget: self, bytes })
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_the_limit_and_are_given_back() {
        let b = Budget::new(100);
        let first = b.reserve(60).unwrap();
        assert!(b.reserve(50).is_none(), "60 + 50 is over 100");
        let second = b.reserve(40).unwrap();
        assert_eq!(b.used(), 100);
        drop(first);
        assert_eq!(b.used(), 40);
        assert!(b.reserve(60).is_some());
        drop(second);
        assert_eq!(b.used(), 0);
        assert!(b.reserve(u64::MAX).is_none());
    }
}
