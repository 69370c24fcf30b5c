//! A prepared session's warm-up, before it serves: the golden check, the declared shapes, and
//! the input the backend choice, the thread choice and tract's plans for concrete shapes are
//! measured on.
//!
//! The input, in order of preference:
//! - the golden inputs where they ship (and the golden check on them);
//! - every declared shape;
//! - for a model whose every dimension is fixed, one input at those shapes;
//! - for a model whose only symbolic dimension is each input's first (a batch), one row.
//!
//! The last two are synthetic ([`synthetic`]). An input for other symbolic dimensions (a 1x1
//! image, a sequence of one) is not one every model accepts, so none is made: such a model is
//! warmed by its golden file or declared shapes, or by its first request. One row of a batched
//! model is a shape the model declares it takes; if it fails anyway, the model still loads and
//! the failure is logged.

use std::sync::Arc;

use crate::backend::{Session, Specialised};
use crate::config::ModelSpec;
use crate::golden::Golden;
use crate::onnx::TensorSpec;
use crate::repository::VersionFiles;
use crate::tensor::{DataType, Tensor};

/// A session after its warm-up, and the input it ran.
pub(crate) struct Warm {
    pub session: Arc<dyn Session>,
    pub golden_diff: Option<f64>,
    pub probe: Option<Vec<Tensor>>,
}

/// Without a golden file, a plan for concrete shapes is checked against the plan for every
/// shape on the synthetic row: its outputs must agree within this share of the largest output
/// magnitude (at least 1). Float plans that differ only in summation order agree to about 1e-6;
/// one 8-bit quantization step is 4e-3 of its range and is not kept.
const UNCHECKED_TOLERANCE: f64 = 1e-3;

pub(crate) fn warm_up(
    spec: &ModelSpec,
    files: &VersionFiles,
    shapes: &[Vec<Vec<usize>>],
    session: Arc<dyn Session>,
) -> Result<Warm, crate::error::Error> {
    let mut probe = None;
    let golden_diff = match &files.golden {
        Some(path) => {
            let golden = Golden::read(path)?;
            probe = golden.inputs.iter().map(|t| t.to_tensor().ok()).collect();
            let diff = golden.check(path, session.as_ref())?;
            let specialised = session.specialise(probe.as_deref().unwrap_or_default(), golden.allowed_diff());
            log_specialised(spec, files, &specialised);
            // What now serves the golden shapes passes the same check.
            Some(if specialised.iter().any(|s| s.kept) { golden.check(path, session.as_ref())? } else { diff })
        }
        None => None,
    };
    for set in shapes {
        let input = synthetic(&session.signature().inputs, set);
        session.run(&input)?;
        probe.get_or_insert(input);
    }
    if probe.is_none() {
        probe = untried(spec, files, session.as_ref())?;
    }
    Ok(Warm { session, golden_diff, probe })
}

/// The synthetic warm-up of a model with neither golden file nor declared shapes (module docs).
fn untried(
    spec: &ModelSpec,
    files: &VersionFiles,
    session: &dyn Session,
) -> Result<Option<Vec<Tensor>>, crate::error::Error> {
    let inputs = &session.signature().inputs;
    let fixed: Option<Vec<Vec<usize>>> =
        inputs.iter().map(|s| s.shape.iter().map(|&d| usize::try_from(d).ok()).collect()).collect();
    if let Some(set) = fixed {
        let input = synthetic(inputs, &set);
        session.run(&input)?;
        return Ok(Some(input));
    }
    let one_row: Option<Vec<Vec<usize>>> = inputs
        .iter()
        .map(|s| match s.shape.split_first() {
            Some((&batch, rest)) if batch < 0 => {
                std::iter::once(Some(1)).chain(rest.iter().map(|&d| usize::try_from(d).ok())).collect()
            }
            _ => None,
        })
        .collect();
    let Some(set) = one_row else {
        tracing::info!(
            model = %spec.name,
            "no golden file or declared shapes, and the inputs have symbolic dimensions: no warm-up run \
             (the first request at each shape pays for it)"
        );
        return Ok(None);
    };
    let input = synthetic(inputs, &set);
    let outputs = match session.run(&input) {
        Ok(outputs) => outputs,
        Err(e) => {
            tracing::warn!(
                model = %spec.name, version = %files.version, shapes = ?set, error = %e,
                "one synthetic row failed: no warm-up run, no measurement at load"
            );
            return Ok(None);
        }
    };
    let scale = outputs.iter().flat_map(|t| t.to_f64()).map(f64::abs).filter(|v| v.is_finite()).fold(1.0, f64::max);
    log_specialised(spec, files, &session.specialise(&input, UNCHECKED_TOLERANCE * scale));
    Ok(Some(input))
}

fn log_specialised(spec: &ModelSpec, files: &VersionFiles, specialised: &[Specialised]) {
    for s in specialised {
        tracing::info!(
            model = %spec.name, version = %files.version, shapes = ?s.shapes, general_us = s.general_us,
            concrete_us = s.concrete_us, kept = s.kept,
            "a plan for concrete shapes, measured against the plan for every shape"
        );
    }
}

/// An input at the given shapes (signature order) for warm-up and measurement: floating-point
/// inputs hold a fixed pseudo-random sequence in [0, 1) (an all-zero input would make a
/// dynamically quantized model's scale zero, a path no real input takes), every other type
/// zeros (a valid index, token or flag for any model).
fn synthetic(inputs: &[TensorSpec], shapes: &[Vec<usize>]) -> Vec<Tensor> {
    inputs
        .iter()
        .zip(shapes)
        .map(|(spec, shape)| {
            let elements = Tensor::shape_elements(shape).unwrap_or(0);
            let mut data = vec![0; elements * spec.datatype.size().unwrap_or(0)];
            let mut state = 0x2545_f491_4f6c_dd1du64;
            let mut next = move || {
                // xorshift64: the top 24 bits as a fraction.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f64 / (1u64 << 24) as f64
            };
            match spec.datatype {
                DataType::Fp32 => {
                    data.chunks_exact_mut(4).for_each(|c| c.copy_from_slice(&(next() as f32).to_le_bytes()))
                }
                DataType::Fp64 => data.chunks_exact_mut(8).for_each(|c| c.copy_from_slice(&next().to_le_bytes())),
                _ => {}
            }
            Tensor { name: spec.name.clone(), datatype: spec.datatype, shape: shape.clone(), data }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{self, SessionOptions};
    use std::path::{Path, PathBuf};

    fn models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }

    #[test]
    fn synthetic_floats_are_fixed_and_in_the_unit_range_and_integers_zero() {
        let spec = |name: &str, datatype| TensorSpec { name: name.into(), datatype, shape: vec![-1, 64] };
        let inputs = [spec("pixels", DataType::Fp32), spec("ids", DataType::Int64), spec("wide", DataType::Fp64)];
        let shapes = [vec![2, 64], vec![2, 64], vec![2, 64]];
        let a = synthetic(&inputs, &shapes);
        assert_eq!(a, synthetic(&inputs, &shapes), "the same input every time");
        assert_eq!(
            a.iter().map(|t| (t.name.as_str(), t.datatype)).collect::<Vec<_>>(),
            [("pixels", DataType::Fp32), ("ids", DataType::Int64), ("wide", DataType::Fp64)]
        );
        for floats in [&a[0], &a[2]] {
            let values = floats.to_f64();
            assert_eq!(values.len(), 128);
            assert!(values.iter().all(|v| (0.0..1.0).contains(v)), "{values:?}");
            let distinct: std::collections::BTreeSet<u64> = values.iter().map(|v| v.to_bits()).collect();
            assert!(distinct.len() > 100, "not a constant: {} distinct values", distinct.len());
        }
        assert_eq!(a[1].data, vec![0; 128 * 8]);
    }

    /// A batched model with no golden file (a copy of digits-cnn without its golden file) is
    /// warmed on one synthetic row, and tract measures a plan for batch 1 on it.
    #[test]
    fn a_batched_model_without_golden_file_is_warmed_and_measured_on_one_row() {
        let dir = std::env::temp_dir().join(format!("outpost-warm-up-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("cnn.onnx");
        std::fs::copy(models().join("digits-cnn.onnx"), &model).unwrap();
        let session: Arc<dyn Session> =
            backend::load(&*backend::by_name("tract").unwrap(), &model, &SessionOptions::default()).unwrap().into();
        let mut config = crate::config::Config::default();
        config.models.push(crate::config::ModelConfig::for_path(&model, Some("cnn")));
        let spec: ModelSpec = config.validate().unwrap().models.remove(0);
        let files = VersionFiles { version: "1".into(), model: model.clone(), golden: None, profile: None };
        let warm = warm_up(&spec, &files, &[], session).unwrap();
        let probe = warm.probe.expect("one synthetic row");
        assert_eq!(probe[0].shape, vec![1, 1, 8, 8]);
        let stats = warm.session.plans().unwrap();
        assert_eq!(stats.specialised.len(), 1, "{stats:?}");
        assert_eq!(stats.specialised[0].shapes, vec![vec![1, 1, 8, 8]]);
        assert_eq!(warm.golden_diff, None);
        // Whichever plan serves one row, it answers as the plan for every shape does.
        let general = backend::load(&*backend::by_name("tract").unwrap(), &model, &SessionOptions::default()).unwrap();
        let expected = general.run(&probe).unwrap();
        let answer = warm.session.run(&probe).unwrap();
        assert!(crate::tensor::max_abs_diff(&answer[0], &expected[0]) <= UNCHECKED_TOLERANCE);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
