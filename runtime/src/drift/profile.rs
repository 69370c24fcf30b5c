//! A model's reference profile: how its answers and inputs were distributed on a reference set
//! the publisher chose (for the sample models, the held-out digits), as histograms the device
//! compares live windows with. Built by `outpostctl profile`, read from `<model>.profile.json`
//! beside the model file (or `model.profile.json` in a version directory).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::rows::{for_each_row, row_mean, row_top};
use crate::onnx::Signature;
use crate::tensor::{DataType, Tensor};

/// The format number this build writes and reads.
pub const FORMAT: u32 = 1;
/// Bin edges of the top-class confidence: ten equal bins over 0..1.
pub const CONFIDENCE_EDGES: [f64; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
/// Bins of an input's per-row mean: the reference set's deciles.
const INPUT_BINS: usize = 10;
/// Most classes a profile tracks (an output wider than this is not a class distribution).
pub const MAX_CLASSES: usize = 1024;

/// The reference distribution of one signal: `fractions[i]` of the reference rows fell in bin
/// `i`, where bin `i` holds values in `[edges[i-1], edges[i])` (the first from −∞, the last to +∞).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub fractions: Vec<f64>,
}

impl Histogram {
    /// The bin a value falls in.
    pub fn bin(&self, value: f64) -> usize {
        self.edges.partition_point(|&e| e <= value)
    }

    /// The histogram of `values` over `edges`.
    fn of(edges: Vec<f64>, values: &[f64]) -> Histogram {
        let mut counts = vec![0u64; edges.len() + 1];
        let h = Histogram { edges, fractions: Vec::new() };
        for &v in values {
            counts[h.bin(v)] += 1;
        }
        let n = values.len().max(1) as f64;
        Histogram { fractions: counts.iter().map(|&c| c as f64 / n).collect(), ..h }
    }

    fn check(&self, what: &str) -> Result<(), String> {
        if self.fractions.len() != self.edges.len() + 1 {
            return Err(format!(
                "{what}: {} fractions for {} edges (one more than the edges)",
                self.fractions.len(),
                self.edges.len()
            ));
        }
        if !self.edges.iter().all(|e| e.is_finite()) || !self.edges.windows(2).all(|w| w[0] < w[1]) {
            return Err(format!("{what}: the edges must be finite and increasing"));
        }
        let sum: f64 = self.fractions.iter().sum();
        if self.fractions.iter().any(|f| !(0.0..=1.0).contains(f)) || (sum - 1.0).abs() > 1e-6 {
            return Err(format!("{what}: the fractions must lie in 0..1 and sum to 1 (they sum to {sum})"));
        }
        Ok(())
    }
}

/// The reference histogram of one input's per-row mean.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputProfile {
    pub name: String,
    #[serde(flatten)]
    pub histogram: Histogram,
}

/// A model's reference profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub format: u32,
    /// Reference rows it was built from.
    pub rows: u64,
    /// The output holding class scores, `[batch, classes]`.
    pub output: String,
    /// Whether the scores are logits (softmax is applied before the confidence is taken).
    pub softmax: bool,
    /// Top-class probability.
    pub confidence: Histogram,
    /// Predicted class: bin `i` is class `i`.
    pub class: Histogram,
    /// Per-row mean of each numeric input.
    pub inputs: Vec<InputProfile>,
}

/// Why a profile could not be used.
#[derive(Debug, thiserror::Error)]
#[error("reference profile {path}: {reason}")]
pub struct ProfileError {
    pub path: PathBuf,
    pub reason: String,
}

impl Profile {
    /// The profile file beside a model file (`digits.onnx` → `digits.profile.json`), if present.
    pub fn beside(model: &Path) -> Option<PathBuf> {
        let stem = model.file_stem()?.to_str()?;
        let p = model.with_file_name(format!("{stem}.profile.json"));
        p.is_file().then_some(p)
    }

    /// Reads a profile and checks it against the model's signature.
    pub fn read(path: &Path, signature: &Signature) -> Result<Profile, ProfileError> {
        let err = |reason: String| ProfileError { path: path.to_owned(), reason };
        let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let profile: Profile = serde_json::from_slice(&text).map_err(|e| err(e.to_string()))?;
        profile.check(signature).map_err(err)?;
        Ok(profile)
    }

    fn check(&self, signature: &Signature) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format {} (this build reads format {FORMAT})", self.format));
        }
        let Some(out) = signature.outputs.iter().find(|o| o.name == self.output) else {
            return Err(format!("the model has no output `{}`", self.output));
        };
        if !out.datatype.is_float() || out.shape.len() != 2 {
            return Err(format!("output `{}` is not a float [batch, classes] tensor", self.output));
        }
        self.confidence.check("confidence")?;
        if self.confidence.edges != CONFIDENCE_EDGES {
            return Err("confidence: the edges must be the ten equal bins over 0..1".into());
        }
        self.class.check("class")?;
        if self.class.fractions.len() > MAX_CLASSES {
            return Err(format!("class: more than {MAX_CLASSES} classes"));
        }
        let classes = usize::try_from(out.shape[1]).ok();
        if classes.is_some_and(|c| c != self.class.fractions.len()) {
            return Err(format!(
                "class: {} classes, the model's output has {}",
                self.class.fractions.len(),
                out.shape[1]
            ));
        }
        for input in &self.inputs {
            let Some(spec) = signature.inputs.iter().find(|s| s.name == input.name) else {
                return Err(format!("the model has no input `{}`", input.name));
            };
            if spec.datatype == DataType::Bytes {
                return Err(format!("input `{}` is a string tensor", input.name));
            }
            input.histogram.check(&format!("input `{}`", input.name))?;
        }
        Ok(())
    }

    /// Builds a profile from reference runs: each run's inputs (signature order, `[batch, ...]`)
    /// and the model's outputs for them. The class output is the first float `[batch, classes]`
    /// output; each input's per-row mean is profiled.
    pub fn build(signature: &Signature, runs: &[(Vec<Tensor>, Vec<Tensor>)]) -> Result<Profile, String> {
        let output = signature
            .outputs
            .iter()
            .position(|o| o.datatype.is_float() && o.shape.len() == 2 && o.shape[1] != 1)
            .ok_or("the model has no float [batch, classes] output")?;
        let name = signature.outputs[output].name.clone();
        let scores: Vec<&Tensor> = runs.iter().map(|(_, outs)| &outs[output]).collect();
        let classes = scores.first().and_then(|t| t.shape.get(1).copied()).unwrap_or(0);
        if !(2..=MAX_CLASSES).contains(&classes) || scores.iter().any(|t| t.shape.len() != 2 || t.shape[1] != classes) {
            return Err(format!("output `{name}` must be [batch, classes] with 2..{MAX_CLASSES} classes"));
        }
        // Probabilities already (non-negative rows summing to 1) or logits.
        let mut softmax = false;
        for t in &scores {
            for_each_row(t, |row| {
                let (mut sum, mut negative) = (0.0f64, false);
                t.for_each_f64_in(row, |p| {
                    sum += p;
                    negative |= p < 0.0;
                });
                softmax |= negative || (sum - 1.0).abs() >= 1e-3;
            });
        }
        let (mut conf, mut class) = (Vec::new(), Vec::new());
        for t in &scores {
            for_each_row(t, |row| {
                let (c, i) = row_top(t, row, softmax);
                conf.push(c);
                class.push(i as f64);
            });
        }
        let class_edges = (1..classes).map(|i| i as f64 - 0.5).collect();
        let mut inputs = Vec::new();
        for (i, spec) in signature.inputs.iter().enumerate() {
            if spec.datatype == DataType::Bytes {
                continue;
            }
            let mut means = Vec::new();
            for (ins, _) in runs {
                for_each_row(&ins[i], |row| means.push(row_mean(&ins[i], row)));
            }
            inputs.push(InputProfile { name: spec.name.clone(), histogram: Histogram::of(deciles(&means), &means) });
        }
        Ok(Profile {
            format: FORMAT,
            rows: conf.len() as u64,
            output: name,
            softmax,
            confidence: Histogram::of(CONFIDENCE_EDGES.to_vec(), &conf),
            class: Histogram::of(class_edges, &class),
            inputs,
        })
    }
}

/// Distinct inner decile edges of `values` (fewer where values repeat).
fn deciles(values: &[f64]) -> Vec<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let mut edges: Vec<f64> = Vec::new();
    if sorted.is_empty() {
        return edges;
    }
    for k in 1..INPUT_BINS {
        let e = sorted[k * (sorted.len() - 1) / INPUT_BINS];
        // A bin holds [e_prev, e): an edge equal to the smallest value would leave bin 0 empty.
        if e > sorted[0] && edges.last().is_none_or(|&l| e > l) {
            edges.push(e);
        }
    }
    edges
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::TensorSpec;

    fn signature() -> Signature {
        let spec = |name: &str, shape: Vec<i64>| TensorSpec { name: name.into(), datatype: DataType::Fp32, shape };
        Signature { inputs: vec![spec("x", vec![-1, 4])], outputs: vec![spec("p", vec![-1, 3])] }
    }

    fn rows() -> Vec<(Vec<Tensor>, Vec<Tensor>)> {
        (0..100)
            .map(|i| {
                let x = Tensor::from_f32("x", vec![1, 4], &[i as f32; 4]);
                let p = if i % 4 == 0 { [0.2, 0.3, 0.5] } else { [0.95, 0.03, 0.02] };
                (vec![x], vec![Tensor::from_f32("p", vec![1, 3], &p)])
            })
            .collect()
    }

    #[test]
    fn a_profile_holds_the_reference_distributions() {
        let p = Profile::build(&signature(), &rows()).unwrap();
        assert_eq!((p.output.as_str(), p.softmax, p.rows), ("p", false, 100));
        assert_eq!(p.class.edges, [0.5, 1.5]);
        assert!((p.class.fractions[0] - 0.75).abs() < 1e-9 && (p.class.fractions[2] - 0.25).abs() < 1e-9, "{p:?}");
        assert!((p.confidence.fractions[9] - 0.75).abs() < 1e-9 && (p.confidence.fractions[5] - 0.25).abs() < 1e-9);
        let x = &p.inputs[0].histogram;
        assert_eq!(x.edges.len(), 9);
        assert!(x.fractions.iter().all(|&f| (f - 0.1).abs() < 0.011), "{x:?}");
        p.check(&signature()).unwrap();
    }

    #[test]
    fn logits_are_recognised_and_softmaxed() {
        let (c, i) = row_top(&Tensor::from_f32("p", vec![1, 3], &[2.0, 0.0, 0.0]), 0..3, true);
        assert_eq!(i, 0);
        assert!((c - 2f64.exp() / (2f64.exp() + 2.0)).abs() < 1e-12);
        let mut r = rows();
        for (_, outs) in &mut r {
            outs[0] = Tensor::from_f32("p", vec![1, 3], &[3.0, -1.0, 0.5]);
        }
        assert!(Profile::build(&signature(), &r).unwrap().softmax);
    }

    #[test]
    fn a_profile_that_does_not_fit_its_model_is_refused_with_the_reason() {
        let good = Profile::build(&signature(), &rows()).unwrap();
        let refused = |edit: fn(&mut Profile)| {
            let mut p = good.clone();
            edit(&mut p);
            p.check(&signature()).unwrap_err()
        };
        assert!(refused(|p| p.format = 2).contains("format 2"));
        assert!(refused(|p| p.output = "q".into()).contains("no output `q`"));
        assert!(refused(|p| p.inputs[0].name = "y".into()).contains("no input `y`"));
        assert!(refused(|p| p.class.fractions.push(0.0)).contains("fractions for"));
        assert!(refused(|p| p.confidence.fractions[0] += 0.5).contains("sum to 1"));
        assert!(refused(|p| p.inputs[0].histogram.edges.reverse()).contains("increasing"));
        assert!(refused(|p| p.confidence.edges[0] = 0.05).contains("ten equal bins"));
        let four = |p: &mut Profile| {
            p.class = Histogram { edges: vec![0.5, 1.5, 2.5], fractions: vec![0.25; 4] };
        };
        assert!(refused(four).contains("4 classes, the model's output has 3"));
    }

    #[test]
    fn bins_are_half_open_and_repeated_values_give_fewer_edges() {
        let h = Histogram { edges: vec![1.0, 2.0], fractions: vec![0.2, 0.3, 0.5] };
        assert_eq!([h.bin(0.5), h.bin(1.0), h.bin(1.9), h.bin(2.0), h.bin(7.0)], [0, 1, 1, 2, 2]);
        let edges = deciles(&[0.0; 50].iter().chain(&[1.0; 50]).copied().collect::<Vec<_>>());
        assert_eq!(edges, [1.0]);
        assert_eq!(Histogram::of(edges, &[0.0, 0.0, 1.0, 1.0]).fractions, [0.5, 0.5]);
    }
}
