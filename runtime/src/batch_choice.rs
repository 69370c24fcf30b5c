//! Whether a version with `[models.batching]` batches: measured at load, since a batch does not
//! always cost less per row than its rows one at a time.
//!
//! Batching pays where a backend runs `n` rows in less than `n` times one row's time (a fully
//! connected layer reads its weights once for the batch). On tract the convolutional networks
//! measured did not: a batch of 2 to 8 rows took 1.1-2.2× its rows one at a time on a plan for
//! its size, and 2.2-5.7× on the plan for a symbolic batch, which is what runs a batch of a size
//! no plan was made for (tract plans a symbolic batch with less optimisation; docs/benchmarks.md,
//! "Batching measured at load"). There a batch only adds its wait and its copies.
//!
//! So with `mode = "auto"` (the default) the version's session runs the warm-up input's first
//! row, and [`PROBE_ROWS`] copies of it stacked (at most `max_batch_size`), each timed as the
//! backend choice times a call ([`crate::choice::median_us`]); the version batches where the
//! batch takes at most [`BATCH_MAX_SHARE`] of its rows one at a time, and serves every request on
//! its own otherwise. Other cases are settled without timing:
//! - a backend whose batches do not run slower per row ([`Session::batch_may_lose`]: every
//!   backend but tract; ONNX Runtime and its accelerators) batches as configured;
//! - a session that plans each input shape (tract where it could not plan a symbolic batch)
//!   serves unbatched: each batch size would prepare a plan of its own on the request path
//!   (10-74 ms on the real models) and push the others out of the plan cache;
//! - without a warm-up input, the version batches as configured.
//!
//! `mode = "always"` batches without any of this. Metadata `parameters.batching` and the
//! `outpost_model_batching` gauge show the outcome.

use std::panic::{AssertUnwindSafe, catch_unwind};

use serde::Serialize;

use crate::backend::Session;
use crate::batcher::stack;
use crate::config::{Batching, BatchingMode};
use crate::tensor::Tensor;

/// The rows of the batch timed against one row (at most `max_batch_size`): a batch that forms
/// under the load batching is for, where a batch's fixed costs are spread (the digits MLPs ran
/// 2 rows at 0.8 and 0.74 of one row's time each, 8 rows at 0.42 and 0.35), and few enough that
/// a slow model's load is not held up long (the orientation classifier's 8 rows: 0.4 s a call).
pub const PROBE_ROWS: usize = 8;

/// A version batches where its batch takes at most this share of its rows one at a time: a batch
/// that saves less is not worth the wait for its rows.
pub const BATCH_MAX_SHARE: f64 = 0.9;

/// Whether a version with batching configured batches, and why, as its metadata shows it
/// (`parameters.batching`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BatchChoice {
    /// Whether its workers stack queued requests into one call.
    pub batches: bool,
    /// `configured` (`mode = "always"`, or a `max_batch_size` of 1), `backend` (its batches are
    /// not timed), `measured`, `plans per shape`, or `unmeasured` (no warm-up input, or its one
    /// row failed to run).
    pub by: &'static str,
    /// The rows of the timed batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
    /// The median call on the batch, in microseconds (`None` where it failed to run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_p50_us: Option<f64>,
    /// The median call on one row of it, in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_row_p50_us: Option<f64>,
}

impl BatchChoice {
    fn untimed(batches: bool, by: &'static str) -> BatchChoice {
        BatchChoice { batches, by, rows: None, batch_p50_us: None, one_row_p50_us: None }
    }

    /// Why a version with batching configured serves unbatched, for the log; `None` where it
    /// batches.
    pub fn why_unbatched(&self) -> Option<&'static str> {
        // Unbatched untimed is the plans-per-shape case only ([`decide`]).
        match (self.batches, self.rows, self.batch_p50_us) {
            (true, ..) => None,
            (false, None, _) => Some(
                "this backend plans each input shape for this model, so each batch size would prepare a plan on the \
                 request path",
            ),
            (false, _, None) => Some("a batch of the warm-up input's row failed to run"),
            (false, ..) => Some("a batch of the warm-up input's row saved less than a tenth of its rows' time"),
        }
    }
}

/// Decides whether a version configured with `batching` batches on `session` (see the module
/// docs); `None` where no batching is configured.
pub fn decide(batching: Option<&Batching>, session: &dyn Session, probe: Option<&[Tensor]>) -> Option<BatchChoice> {
    let b = batching?;
    let rows = PROBE_ROWS.min(b.max_batch_size);
    if b.mode == BatchingMode::Always || rows < 2 {
        return Some(BatchChoice::untimed(true, "configured"));
    }
    if !session.batch_may_lose() {
        return Some(BatchChoice::untimed(true, "backend"));
    }
    if session.plans().is_some_and(|p| !p.symbolic) {
        return Some(BatchChoice::untimed(false, "plans per shape"));
    }
    let Some(row) = probe.and_then(|p| p.iter().map(|t| t.first_rows(1)).collect::<Option<Vec<_>>>()) else {
        return Some(BatchChoice::untimed(true, "unmeasured"));
    };
    // A panic counts as a failed run: the load carries on, and the warm-up already ran the row.
    let timed =
        |input: &[Tensor]| catch_unwind(AssertUnwindSafe(|| crate::choice::median_us(session, input))).ok().flatten();
    let Some(one_row_us) = timed(&row) else {
        return Some(BatchChoice::untimed(true, "unmeasured"));
    };
    let batch: Vec<Tensor> = row.iter().map(|t| stack(std::iter::repeat_n(t, rows), rows)).collect();
    // A batch that fails to run would fail every batched request: serving unbatched is the answer.
    let batch_us = timed(&batch);
    let batches = batch_us.is_some_and(|us| us <= one_row_us * rows as f64 * BATCH_MAX_SHARE);
    Some(BatchChoice {
        batches,
        by: "measured",
        rows: Some(rows),
        batch_p50_us: batch_us,
        one_row_p50_us: Some(one_row_us),
    })
}

/// The batching a version's workers apply: the configured one where [`decide`] says it batches.
pub fn served(batching: Option<&Batching>, choice: Option<&BatchChoice>) -> Option<Batching> {
    batching.filter(|_| choice.is_some_and(|c| c.batches)).cloned()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::backend::{BackendError, PlanStats, Signature, TensorSpec};
    use crate::config::{ModelConfig, ModelSpec};
    use crate::tensor::DataType;

    /// A session whose call takes `base + per_row × rows` microseconds, `penalty` more for a
    /// call of several rows (as tract's plan for a symbolic batch), and fails past `max_rows`.
    #[derive(Default)]
    struct Costed {
        base_us: u64,
        per_row_us: u64,
        penalty_us: u64,
        max_rows: usize,
        /// Panics instead of failing past `max_rows`.
        panics: bool,
        plans: Option<PlanStats>,
        /// A backend whose batches are not timed.
        batches_well: bool,
        calls: Mutex<Vec<usize>>,
        signature: Signature,
    }

    fn costed(base_us: u64, per_row_us: u64, penalty_us: u64) -> Costed {
        let input = TensorSpec { name: "x".into(), datatype: DataType::Fp32, shape: vec![-1, 2] };
        let signature = Signature { inputs: vec![input], outputs: vec![] };
        Costed { base_us, per_row_us, penalty_us, max_rows: usize::MAX, signature, ..Costed::default() }
    }

    impl Session for Costed {
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
            let rows = inputs[0].shape[0];
            self.calls.lock().unwrap().push(rows);
            if rows > self.max_rows {
                assert!(!self.panics, "{rows} rows");
                return Err(BackendError::Run(format!("{rows} rows")));
            }
            let penalty = if rows > 1 { self.penalty_us } else { 0 };
            std::thread::sleep(Duration::from_micros(self.base_us + self.per_row_us * rows as u64 + penalty));
            Ok(vec![])
        }
        fn plans(&self) -> Option<PlanStats> {
            self.plans.clone()
        }
        fn batch_may_lose(&self) -> bool {
            !self.batches_well
        }
    }

    fn batching(extra: &str) -> Option<Batching> {
        let text = format!("name = \"m\"\npath = \"m.onnx\"\n[batching]\nmax_batch_size = 16\n{extra}");
        let config: ModelConfig = toml::from_str(&text).unwrap();
        let spec: ModelSpec = config.validate(&|k| k.to_string()).unwrap();
        spec.batching
    }

    /// A warm-up input of three rows: the decision times its first row.
    fn probe() -> Vec<Tensor> {
        vec![Tensor::from_f32("x", vec![3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])]
    }

    #[test]
    fn a_batch_that_costs_less_than_its_rows_batches_and_one_that_does_not_serves_unbatched() {
        let b = batching("");
        // A fixed cost per call dominates: 8 rows take 2.8 ms against 8 × 2.1 ms.
        let amortised = costed(2_000, 100, 0);
        let choice = decide(b.as_ref(), &amortised, Some(&probe())).unwrap();
        assert!(choice.batches && choice.by == "measured" && choice.rows == Some(PROBE_ROWS), "{choice:?}");
        assert!(choice.batch_p50_us.unwrap() < 8.0 * choice.one_row_p50_us.unwrap(), "{choice:?}");
        assert_eq!((served(b.as_ref(), Some(&choice)), choice.why_unbatched()), (b.clone(), None));
        let calls = amortised.calls.lock().unwrap().clone();
        assert!(calls.contains(&1) && calls.contains(&8) && calls.iter().all(|&r| r == 1 || r == 8), "{calls:?}");

        // Rows cost more in a batch: 8 rows take 16 ms against 8 × 1 ms.
        let per_row = costed(0, 1_000, 8_000);
        let choice = decide(b.as_ref(), &per_row, Some(&probe())).unwrap();
        assert!(!choice.batches && choice.by == "measured", "{choice:?}");
        assert!(choice.batch_p50_us.unwrap() >= 16_000.0, "{choice:?}");
        assert_eq!(served(b.as_ref(), Some(&choice)), None);
        assert!(choice.why_unbatched().unwrap().contains("saved less than a tenth"));

        // At most max_batch_size rows.
        let four = b.clone().map(|b| Batching { max_batch_size: 4, ..b });
        assert_eq!(decide(four.as_ref(), &costed(2_000, 100, 0), Some(&probe())).unwrap().rows, Some(4));
    }

    #[test]
    fn a_batch_that_fails_or_panics_serves_unbatched() {
        let b = batching("");
        for panics in [false, true] {
            let session = Costed { max_rows: 1, panics, ..costed(2_000, 0, 0) };
            let choice = decide(b.as_ref(), &session, Some(&probe())).unwrap();
            assert_eq!((choice.batches, choice.by, choice.batch_p50_us), (false, "measured", None), "{choice:?}");
            assert!(choice.one_row_p50_us.is_some());
            assert!(choice.why_unbatched().unwrap().contains("failed to run"));
        }
    }

    #[test]
    fn some_sessions_are_settled_without_timing() {
        let b = batching("");
        let untimed = |session: &Costed, batches: bool, by: &str| {
            let choice = decide(b.as_ref(), session, Some(&probe())).unwrap();
            assert_eq!((choice.batches, choice.by, choice.rows), (batches, by, None), "{choice:?}");
            assert!(session.calls.lock().unwrap().is_empty(), "{by}: nothing timed");
        };
        let per_shape =
            Costed { plans: Some(PlanStats { symbolic: false, ..PlanStats::default() }), ..costed(0, 1, 0) };
        untimed(&per_shape, false, "plans per shape");
        untimed(&Costed { batches_well: true, ..costed(0, 1_000, 8_000) }, true, "backend");
        // A symbolic plan: timed.
        let symbolic = Costed { plans: Some(PlanStats { symbolic: true, ..PlanStats::default() }), ..costed(0, 1, 0) };
        assert_eq!(decide(b.as_ref(), &symbolic, Some(&probe())).unwrap().by, "measured");
    }

    #[test]
    fn always_batches_without_measuring_and_nothing_to_time_keeps_the_configuration() {
        let session = costed(0, 1_000, 8_000);
        let always = batching("mode = \"always\"");
        let choice = decide(always.as_ref(), &session, Some(&probe())).unwrap();
        assert_eq!(choice, BatchChoice::untimed(true, "configured"));
        let one = batching("").map(|b| Batching { max_batch_size: 1, ..b });
        assert_eq!(decide(one.as_ref(), &session, Some(&probe())).unwrap().by, "configured");
        assert!(session.calls.lock().unwrap().is_empty(), "nothing timed");

        let choice = decide(batching("").as_ref(), &session, None).unwrap();
        assert_eq!((choice.batches, choice.by), (true, "unmeasured"));
        assert_eq!(decide(None, &session, Some(&probe())), None);
    }
}
