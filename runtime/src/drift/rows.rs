//! Rows of a `[batch, ...]` tensor and what drift takes from each, read in place.

use std::ops::Range;

use crate::tensor::Tensor;

/// Calls `f` with each row's element range of a `[batch, ...]` tensor.
pub(crate) fn for_each_row(t: &Tensor, mut f: impl FnMut(Range<usize>)) {
    let rows = t.shape.first().copied().unwrap_or(1).max(1);
    let per_row = t.len() / rows;
    if per_row == 0 {
        return;
    }
    for r in 0..rows {
        f(r * per_row..(r + 1) * per_row);
    }
}

/// The mean of a row's elements.
pub(crate) fn row_mean(t: &Tensor, row: Range<usize>) -> f64 {
    let n = row.len();
    let mut sum = 0.0;
    t.for_each_f64_in(row, |v| sum += v);
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// The row's top class and its probability (softmax of logits where the profile says so).
pub(crate) fn row_top(t: &Tensor, row: Range<usize>, softmax: bool) -> (f64, usize) {
    let (mut best, mut at, mut i) = (f64::NEG_INFINITY, 0, 0);
    t.for_each_f64_in(row.clone(), |v| {
        if v > best {
            (best, at) = (v, i);
        }
        i += 1;
    });
    if !softmax {
        return (best, at);
    }
    let mut sum = 0.0;
    t.for_each_f64_in(row, |v| sum += (v - best).exp());
    (1.0 / sum, at)
}
