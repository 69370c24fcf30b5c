//! How sure a model is of its answer, from its class scores: the measures of Sedna's hard
//! example mining filters, each as a confidence in 0..1 (low: escalate).

use crate::config::Policy;
use crate::tensor::Tensor;

/// The least confident row's confidence. `scores` is `[rows.., classes]`; `None` when it holds
/// no row or no class.
pub fn confidence(scores: &Tensor, policy: Policy, softmax: bool) -> Option<f64> {
    let classes = *scores.shape.last()?;
    if classes == 0 {
        return None;
    }
    let values = scores.to_f64();
    values.chunks_exact(classes).map(|row| row_confidence(row, policy, softmax)).reduce(f64::min)
}

/// The confidence of one row of scores.
pub fn row_confidence(row: &[f64], policy: Policy, softmax: bool) -> f64 {
    let probs: Vec<f64> = if softmax { soft(row) } else { row.iter().map(|p| p.clamp(0.0, 1.0)).collect() };
    let (mut top1, mut top2) = (0.0f64, 0.0f64);
    for &p in &probs {
        if p > top1 {
            top2 = top1;
            top1 = p;
        } else if p > top2 {
            top2 = p;
        }
    }
    let c = match policy {
        Policy::MaxProbability => top1,
        Policy::Margin => top1 - top2,
        Policy::Entropy => {
            if probs.len() < 2 {
                1.0
            } else {
                let total: f64 = probs.iter().sum();
                let h: f64 = probs.iter().filter(|&&p| p > 0.0).map(|&p| p / total).map(|p| -p * p.ln()).sum::<f64>();
                1.0 - h / (probs.len() as f64).ln()
            }
        }
    };
    if c.is_nan() { 0.0 } else { c.clamp(0.0, 1.0) }
}

fn soft(row: &[f64]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_agree_on_sure_and_unsure_rows() {
        let sure = [0.97, 0.01, 0.01, 0.01];
        let unsure = [0.4, 0.35, 0.15, 0.1];
        for p in Policy::ALL {
            assert!(row_confidence(&sure, p, false) > row_confidence(&unsure, p, false), "{p:?}");
        }
        assert!((row_confidence(&unsure, Policy::Margin, false) - 0.05).abs() < 1e-12);
        assert_eq!(row_confidence(&[0.25; 4], Policy::Entropy, false), 0.0);
        assert_eq!(row_confidence(&[1.0, 0.0, 0.0], Policy::Entropy, false), 1.0);
    }

    #[test]
    fn softmax_turns_logits_into_probabilities() {
        let c = row_confidence(&[2.0, 0.0], Policy::MaxProbability, true);
        assert!((c - 1.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-12);
    }

    #[test]
    fn the_least_confident_row_decides() {
        let t = Tensor::from_f32("p", vec![2, 2], &[0.9, 0.1, 0.6, 0.4]);
        assert!((confidence(&t, Policy::MaxProbability, false).unwrap() - 0.6).abs() < 1e-6);
        assert_eq!(confidence(&Tensor::from_f32("p", vec![0, 2], &[]), Policy::Margin, false), None);
    }
}
