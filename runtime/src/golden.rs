//! Golden inputs and outputs that ship beside a model (`NAME.golden.json` next to `NAME.onnx`).
//!
//! At load time the runtime runs the golden inputs and compares the outputs with the expected
//! ones; a model that disagrees is refused, so a backend that computes a model wrongly never
//! serves it. The file's layout is a V2 request's `inputs` plus the expected `outputs`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backend::Session;
pub use crate::tensor::max_abs_diff;
use crate::tensor::{DataType, Tensor};

/// Tolerance when the golden file states none: max absolute difference.
pub const DEFAULT_TOLERANCE: f64 = 1e-4;

/// A parsed golden file.
#[derive(Clone, Debug, Deserialize)]
pub struct Golden {
    #[serde(default)]
    pub tolerance: Option<f64>,
    /// Why the tolerance is looser than [`DEFAULT_TOLERANCE`], where it is (the cause, named by
    /// whoever made the file).
    #[serde(default)]
    pub tolerance_reason: Option<String>,
    pub inputs: Vec<GoldenTensor>,
    pub outputs: Vec<GoldenTensor>,
}

/// One tensor of a golden file.
#[derive(Clone, Debug, Deserialize)]
pub struct GoldenTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: Vec<serde_json::Value>,
}

impl GoldenTensor {
    /// The tensor in the runtime's form.
    pub fn to_tensor(&self) -> Result<Tensor, String> {
        let data = Tensor::encode_json(self.datatype, &self.data).map_err(|e| format!("`{}`: {e}", self.name))?;
        let t = Tensor { name: self.name.clone(), datatype: self.datatype, shape: self.shape.clone(), data };
        if Tensor::shape_elements(&t.shape) != Some(t.len()) {
            return Err(format!("`{}`: shape {:?} does not match its {} values", self.name, self.shape, t.len()));
        }
        Ok(t)
    }
}

/// Why a model failed its golden check.
#[derive(Debug, thiserror::Error)]
pub enum GoldenError {
    #[error("golden file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(
        "outputs disagree with the golden outputs in {path}: `{output}` differs by up to {diff:.3e} \
         (tolerance {tolerance:.0e}); this backend computes the model differently from the runtime that \
         made the golden outputs, so it is not served"
    )]
    Mismatch { path: PathBuf, output: String, diff: f64, tolerance: f64 },
}

impl Golden {
    /// The golden file that belongs beside `model` (`x.onnx` → `x.golden.json`), if present.
    pub fn beside(model: &Path) -> Option<PathBuf> {
        let stem = model.file_stem()?.to_str()?;
        let p = model.with_file_name(format!("{stem}.golden.json"));
        p.is_file().then_some(p)
    }

    /// Reads a golden file.
    pub fn read(path: &Path) -> Result<Golden, GoldenError> {
        let file_err = |reason: String| GoldenError::File { path: path.to_owned(), reason };
        let text = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
        serde_json::from_slice(&text).map_err(|e| file_err(e.to_string()))
    }

    /// The largest difference from the golden outputs a backend may give.
    pub fn allowed_diff(&self) -> f64 {
        self.tolerance.unwrap_or(DEFAULT_TOLERANCE)
    }

    /// Runs the golden inputs through `session` and compares. Returns the largest difference seen.
    pub fn check(&self, path: &Path, session: &dyn Session) -> Result<f64, GoldenError> {
        let file_err = |reason: String| GoldenError::File { path: path.to_owned(), reason };
        let tolerance = self.allowed_diff();
        let mut inputs = Vec::new();
        for spec in &session.signature().inputs {
            let g = self
                .inputs
                .iter()
                .find(|g| g.name == spec.name)
                .ok_or_else(|| file_err(format!("it has no input `{}`", spec.name)))?;
            inputs.push(g.to_tensor().map_err(file_err)?);
        }
        let outputs = session.run(&inputs).map_err(|e| file_err(format!("running its inputs failed: {e}")))?;
        let mut worst = 0.0f64;
        for expected in &self.outputs {
            let want = expected.to_tensor().map_err(file_err)?;
            let got = outputs
                .iter()
                .find(|o| o.name == expected.name)
                .ok_or_else(|| file_err(format!("the model has no output `{}`", expected.name)))?;
            let diff = max_abs_diff(&want, got);
            worst = worst.max(diff);
            if diff > tolerance {
                return Err(GoldenError::Mismatch {
                    path: path.to_owned(),
                    output: expected.name.clone(),
                    diff,
                    tolerance,
                });
            }
        }
        Ok(worst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_measured_and_shapes_must_match() {
        let a = Tensor::from_f32("p", vec![2], &[0.5, 0.25]);
        let b = Tensor::from_f32("p", vec![2], &[0.5, 0.75]);
        assert_eq!(max_abs_diff(&a, &b), 0.5);
        assert_eq!(max_abs_diff(&a, &a), 0.0);
        let c = Tensor::from_f32("p", vec![1, 2], &[0.5, 0.25]);
        assert!(max_abs_diff(&a, &c).is_infinite());
        let n = Tensor::from_f32("p", vec![2], &[f32::NAN, 0.25]);
        assert!(max_abs_diff(&a, &n).is_infinite());
    }

    #[test]
    fn golden_files_sit_beside_their_models() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        assert!(Golden::beside(&dir.join("digits-edge.onnx")).is_some());
        assert!(Golden::beside(&dir.join("no-such-model.onnx")).is_none());
        let g = Golden::read(&dir.join("digits-edge.golden.json")).unwrap();
        assert_eq!(g.inputs[0].to_tensor().unwrap().shape, vec![16, 64]);
    }
}
