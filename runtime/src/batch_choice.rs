//! Whether a version with `[models.batching]` batches: measured at load, since a batch does not
//! always cost less per row than its rows one at a time.
//!
//! Batching pays where a backend runs `n` rows in less than `n` times one row's time (a fully
//! connected layer reads its weights once for the batch). On tract it often does not: a batch of
//! 2 to 16 rows of a convolutional network took 1.1-2.2× its rows one at a time on a plan for its
//! size, and 1.7-5.7× on the plan for a symbolic batch, which is what runs a batch of a size no
//! plan was made for (tract plans a symbolic batch with less optimisation; docs/benchmarks.md,
//! "Batching measured at load"). There a batch only adds its wait and its copies.
//!
//! So with `mode = "auto"` (the default) the version's session runs the warm-up input's first
//! row, and [`PROBE_ROWS`] copies of it stacked (at most `max_batch_size`), each timed as the
//! backend choice times a call ([`crate::choice::median_us`]); the version batches where the
//! batch takes at most [`BATCH_MAX_SHARE`] of its rows one at a time, and serves every request on
//! its own otherwise. `mode = "always"` batches without measuring. Without a warm-up input nothing
//! is timed, and the version batches as configured. Metadata `parameters.batching` shows the
//! outcome and its figures.

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

/// Whether a version batches, and why, as its metadata shows it (`parameters.batching`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BatchingInfo {
    /// Whether its workers stack queued requests into one call.
    pub batches: bool,
    /// `configured` (`mode = "always"`, or a `max_batch_size` of 1), `measured`, or `unmeasured`
    /// (no warm-up input, or its one row failed to run).
    pub by: &'static str,
    /// The rows of the timed batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
    /// The median call on the batch, in microseconds (`None` where it failed to run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_us: Option<f64>,
    /// The median call on one row of it, in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_row_us: Option<f64>,
}

impl BatchingInfo {
    fn unmeasured(by: &'static str) -> BatchingInfo {
        BatchingInfo { batches: true, by, rows: None, batch_us: None, one_row_us: None }
    }
}

/// Decides whether a version configured with `batching` batches on `session` (see the module
/// docs); `None` where no batching is configured.
pub fn decide(batching: Option<&Batching>, session: &dyn Session, probe: Option<&[Tensor]>) -> Option<BatchingInfo> {
    let b = batching?;
    let rows = PROBE_ROWS.min(b.max_batch_size);
    if b.mode == BatchingMode::Always || rows < 2 {
        return Some(BatchingInfo::unmeasured("configured"));
    }
    let Some(row) = probe.and_then(|p| p.iter().map(|t| t.first_rows(1)).collect::<Option<Vec<_>>>()) else {
        return Some(BatchingInfo::unmeasured("unmeasured"));
    };
    let Some(one_row_us) = crate::choice::median_us(session, &row) else {
        return Some(BatchingInfo::unmeasured("unmeasured"));
    };
    let batch: Vec<Tensor> = row.iter().map(|t| stack(std::iter::repeat_n(t, rows), rows)).collect();
    // A batch that fails to run would fail every batched request: serving unbatched is the answer.
    let batch_us = crate::choice::median_us(session, &batch);
    let batches = batch_us.is_some_and(|us| us <= one_row_us * rows as f64 * BATCH_MAX_SHARE);
    Some(BatchingInfo { batches, by: "measured", rows: Some(rows), batch_us, one_row_us: Some(one_row_us) })
}

/// The batching a version's workers apply: the configured one where [`decide`] says it batches.
pub fn served(batching: Option<&Batching>, info: Option<&BatchingInfo>) -> Option<Batching> {
    batching.filter(|_| info.is_some_and(|i| i.batches)).cloned()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::backend::{BackendError, Signature, TensorSpec};
    use crate::config::{ModelConfig, ModelSpec};
    use crate::tensor::DataType;

    /// A session whose call takes `base + per_row × rows` microseconds, `penalty` more for a
    /// call of several rows (as tract's plan for a symbolic batch), and fails past `max_rows`.
    struct Costed {
        base_us: u64,
        per_row_us: u64,
        penalty_us: u64,
        max_rows: usize,
        calls: Mutex<Vec<usize>>,
        signature: Signature,
    }

    fn costed(base_us: u64, per_row_us: u64, penalty_us: u64, max_rows: usize) -> Costed {
        let input = TensorSpec { name: "x".into(), datatype: DataType::Fp32, shape: vec![-1, 2] };
        Costed {
            base_us,
            per_row_us,
            penalty_us,
            max_rows,
            calls: Mutex::default(),
            signature: Signature { inputs: vec![input], outputs: vec![] },
        }
    }

    impl Session for Costed {
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
            let rows = inputs[0].shape[0];
            self.calls.lock().unwrap().push(rows);
            if rows > self.max_rows {
                return Err(BackendError::Run(format!("{rows} rows")));
            }
            let penalty = if rows > 1 { self.penalty_us } else { 0 };
            std::thread::sleep(Duration::from_micros(self.base_us + self.per_row_us * rows as u64 + penalty));
            Ok(vec![])
        }
    }

    fn batching(extra: &str) -> Option<Batching> {
        let text = format!("name = \"m\"\npath = \"m.onnx\"\n[batching]\nmax_batch_size = 8\n{extra}");
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
        let amortised = costed(2_000, 100, 0, 8);
        let info = decide(b.as_ref(), &amortised, Some(&probe())).unwrap();
        assert!(info.batches && info.by == "measured" && info.rows == Some(PROBE_ROWS), "{info:?}");
        assert!(info.batch_us.unwrap() < 8.0 * info.one_row_us.unwrap(), "{info:?}");
        assert_eq!(served(b.as_ref(), Some(&info)), b);
        let calls = amortised.calls.lock().unwrap().clone();
        assert!(calls.contains(&1) && calls.contains(&8) && calls.iter().all(|&r| r == 1 || r == 8), "{calls:?}");

        // Rows cost more in a batch: 8 rows take 9 ms against 8 × 1 ms.
        let per_row = costed(0, 1_000, 1_000, 8);
        let info = decide(b.as_ref(), &per_row, Some(&probe())).unwrap();
        assert!(!info.batches && info.by == "measured", "{info:?}");
        assert!(info.batch_us.unwrap() >= 9_000.0, "{info:?}");
        assert_eq!(served(b.as_ref(), Some(&info)), None);
    }

    #[test]
    fn a_batch_that_fails_serves_unbatched() {
        let b = batching("");
        let info = decide(b.as_ref(), &costed(2_000, 0, 0, 1), Some(&probe())).unwrap();
        assert_eq!((info.batches, info.by, info.batch_us), (false, "measured", None), "{info:?}");
        assert!(info.one_row_us.is_some());
    }

    #[test]
    fn always_batches_without_measuring_and_nothing_to_time_keeps_the_configuration() {
        let session = costed(0, 1_000, 1_000, 8);
        let always = batching("mode = \"always\"");
        let info = decide(always.as_ref(), &session, Some(&probe())).unwrap();
        assert_eq!(info, BatchingInfo::unmeasured("configured"));
        assert!(info.batches);
        let one = batching("").map(|b| Batching { max_batch_size: 1, ..b });
        assert_eq!(decide(one.as_ref(), &session, Some(&probe())).unwrap().by, "configured");
        assert!(session.calls.lock().unwrap().is_empty(), "nothing timed");

        let info = decide(batching("").as_ref(), &session, None).unwrap();
        assert_eq!((info.batches, info.by), (true, "unmeasured"));
        assert_eq!(decide(None, &session, Some(&probe())), None);
    }
}
