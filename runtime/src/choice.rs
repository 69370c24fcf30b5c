//! Which backend serves a model under `backend = "auto"`, the default: every backend this build
//! has prepares the model (check, plan, golden check), and the fastest on the model's own input
//! serves it; the others are dropped. What was decided, and on what figures, shows in the model's
//! metadata (`parameters.backend_choice`) and in `/metrics` (`outpost_model_backend_info`).
//!
//! The input is the golden inputs where they ship, else the first declared shape, else a
//! synthetic input (every dimension fixed, or one row where only the batch is symbolic): the
//! same inputs the warm-up runs (`crate::warm_up`). Each backend runs it
//! [`RUNS`] times or for [`BUDGET`], whichever comes first, after one run to warm it, and the
//! median counts. A model with none of those inputs cannot be measured; the rule then is ONNX
//! Runtime where the build has it and it serves the model (the reference the golden files come
//! from, and the faster of the two on most real models), else the first that serves it.

use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::backend::Session;
use crate::tensor::Tensor;

/// Runs per backend at most.
pub const RUNS: usize = 7;
/// Time per backend at most (a run that takes longer still counts once).
pub const BUDGET: Duration = Duration::from_millis(300);
/// The backend the rule picks when nothing could be measured.
const RULE_FIRST: &str = "ort";

/// How a served version's backend was chosen.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendChoice {
    /// `configured` (the model names its backend), `only` (one backend serves it), `measured`,
    /// or `rule` (several serve it and there was no input to measure on).
    pub by: &'static str,
    /// Median backend call per backend measured, in microseconds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub p50_us: Vec<(&'static str, f64)>,
}

impl BackendChoice {
    pub fn configured() -> BackendChoice {
        BackendChoice { by: "configured", p50_us: Vec::new() }
    }
}

/// Picks one of `served` (backend name and session, in the build's order): its index and why.
pub fn choose(served: &[(&'static str, &dyn Session)], input: Option<&[Tensor]>) -> (usize, BackendChoice) {
    if served.len() == 1 {
        return (0, BackendChoice { by: "only", p50_us: Vec::new() });
    }
    let Some(input) = input else {
        let i = served.iter().position(|(name, _)| *name == RULE_FIRST).unwrap_or(0);
        return (i, BackendChoice { by: "rule", p50_us: Vec::new() });
    };
    let p50_us: Vec<(&'static str, f64)> =
        served.iter().map(|(name, session)| (*name, median_us(*session, input).unwrap_or(f64::INFINITY))).collect();
    let best = (0..p50_us.len()).min_by(|&a, &b| p50_us[a].1.total_cmp(&p50_us[b].1)).unwrap_or(0);
    (best, BackendChoice { by: "measured", p50_us })
}

/// Models load in parallel: a measurement takes this for writing, so that it runs alone, and
/// preparing or warming a model ([`loading`]) for reading, so that no model's load runs beside a
/// measurement on the same cores.
static MEASURING: RwLock<()> = RwLock::new(());

/// Held while preparing or warming up a model (never while measuring: that would wait on itself).
pub(crate) fn loading() -> RwLockReadGuard<'static, ()> {
    MEASURING.read().unwrap_or_else(|e| e.into_inner())
}

/// The choice for a backend whose calls run on `pooled` (the default pool) or `one` (the same
/// model on one thread), measured on `probe`: the one-thread call always, the pool's only where
/// the one-thread call is long enough to try it and the pool may lose there (`pool_may_lose`).
pub fn threads(
    pooled: &dyn Session,
    one: &dyn Session,
    pool_may_lose: bool,
    probe: &[Tensor],
) -> crate::threads::ThreadChoice {
    let one_us = median_us(one, probe).unwrap_or(f64::INFINITY);
    let pool_us =
        (pool_may_lose && one_us >= crate::threads::POOL_MIN_CALL_US).then(|| median_us(pooled, probe)).flatten();
    crate::threads::ThreadChoice::measured(crate::threads::available(), one_us, pool_us)
}

/// The median of up to [`RUNS`] timed runs within [`BUDGET`], after one untimed; `None` when a
/// run fails. It runs alone: no other measurement, and no model preparing or warming up.
pub(crate) fn median_us(session: &dyn Session, input: &[Tensor]) -> Option<f64> {
    let _alone = MEASURING.write().unwrap_or_else(|e| e.into_inner());
    session.run(input).ok()?;
    let start = Instant::now();
    let mut times = Vec::with_capacity(RUNS);
    while times.len() < RUNS && (times.is_empty() || start.elapsed() < BUDGET) {
        let t = Instant::now();
        session.run(input).ok()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Some(times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::backend::{BackendError, Signature};

    /// A session that takes a set time per run.
    struct Sleepy {
        per_run: Duration,
        runs: AtomicUsize,
        signature: Signature,
    }

    impl Sleepy {
        fn new(micros: u64) -> Sleepy {
            Sleepy {
                per_run: Duration::from_micros(micros),
                runs: AtomicUsize::new(0),
                signature: Signature::default(),
            }
        }
    }

    impl Session for Sleepy {
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn run(&self, _: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
            self.runs.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(self.per_run);
            Ok(Vec::new())
        }
    }

    #[test]
    fn the_fastest_on_the_input_serves_and_the_figures_are_kept() {
        let (slow, fast) = (Sleepy::new(3000), Sleepy::new(200));
        let (i, choice) = choose(&[("tract", &slow), ("ort", &fast)], Some(&[]));
        assert_eq!((i, choice.by), (1, "measured"));
        assert_eq!(choice.p50_us.iter().map(|p| p.0).collect::<Vec<_>>(), ["tract", "ort"]);
        assert!(choice.p50_us[0].1 > choice.p50_us[1].1, "{choice:?}");
        // One warm-up run and at most RUNS timed ones each.
        assert_eq!(fast.runs.load(Ordering::Relaxed), RUNS + 1);
        let (i, _) = choose(&[("tract", &fast), ("ort", &slow)], Some(&[]));
        assert_eq!(i, 0);
    }

    #[test]
    fn a_slow_backend_is_measured_within_the_budget() {
        let slow = Sleepy::new(200_000);
        let fast = Sleepy::new(10);
        let (i, _) = choose(&[("tract", &slow), ("ort", &fast)], Some(&[]));
        assert_eq!(i, 1);
        // One warm-up, then timed runs while the 300 ms budget lasts: two of 200 ms each (one,
        // if a loaded machine sleeps past the budget in the first), never the RUNS it may have.
        let runs = slow.runs.load(Ordering::Relaxed);
        assert!((2..=3).contains(&runs), "{runs} runs of a 200 ms backend");
    }

    #[test]
    fn without_an_input_the_rule_decides_and_alone_there_is_no_choice() {
        let (a, b) = (Sleepy::new(1), Sleepy::new(1));
        assert_eq!(choose(&[("tract", &a), ("ort", &b)], None), (1, BackendChoice { by: "rule", p50_us: vec![] }));
        assert_eq!(choose(&[("tract", &a)], Some(&[])).1.by, "only");
        assert_eq!(a.runs.load(Ordering::Relaxed) + b.runs.load(Ordering::Relaxed), 0, "nothing run");
    }
}
