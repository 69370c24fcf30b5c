//! How a candidate's answer compares with the active model's, row by row.

use crate::drift::rows::{for_each_row, row_top};
use crate::tensor::Tensor;

/// One request's comparison.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Comparison {
    pub rows: u64,
    /// Rows whose top class both answers share.
    pub agreed: u64,
    /// Sum over the rows of the mean absolute difference of their scores.
    pub abs_diff_sum: f64,
}

/// Compares the class output (the active answer's first float `[batch, classes]` output) with
/// the candidate's output of the same name; an error says why they cannot be compared.
pub fn compare(active: &[Tensor], candidate: &[Tensor]) -> Result<Comparison, String> {
    let ours = active
        .iter()
        .find(|t| t.datatype.is_float() && t.shape.len() == 2 && t.shape[1] > 1)
        .ok_or("the active answer has no float [batch, classes] output")?;
    let theirs = candidate
        .iter()
        .find(|t| t.name == ours.name)
        .ok_or_else(|| format!("the candidate's answer has no output `{}`", ours.name))?;
    if theirs.shape != ours.shape || !theirs.datatype.is_float() {
        return Err(format!(
            "output `{}`: the candidate answered {} {:?}, the active model {} {:?}",
            ours.name,
            theirs.datatype.as_str(),
            theirs.shape,
            ours.datatype.as_str(),
            ours.shape
        ));
    }
    let (a, b) = (ours.to_f64(), theirs.to_f64());
    let mut c = Comparison { rows: 0, agreed: 0, abs_diff_sum: 0.0 };
    for_each_row(ours, |row| {
        c.rows += 1;
        if row_top(ours, row.clone(), false).1 == row_top(theirs, row.clone(), false).1 {
            c.agreed += 1;
        }
        let n = row.len().max(1) as f64;
        c.abs_diff_sum += row.map(|i| (a[i] - b[i]).abs()).sum::<f64>() / n;
    });
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(name: &str, rows: &[[f32; 3]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_f32(name, vec![rows.len(), 3], &flat)
    }

    #[test]
    fn counts_agreeing_rows_and_the_mean_absolute_difference() {
        let active = [scores("p", &[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])];
        let candidate = [scores("p", &[[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])];
        let c = compare(&active, &candidate).unwrap();
        assert_eq!((c.rows, c.agreed), (3, 2));
        // Row means: (0.1 + 0.1 + 0) / 3, (0.4 + 0.4 + 0) / 3, 0.
        assert!((c.abs_diff_sum - (0.2 / 3.0 + 0.8 / 3.0)).abs() < 1e-6, "{c:?}");
    }

    #[test]
    fn answers_that_do_not_line_up_are_not_compared() {
        let active = [scores("p", &[[0.7, 0.2, 0.1]])];
        assert!(compare(&active, &[scores("q", &[[0.7, 0.2, 0.1]])]).unwrap_err().contains("no output `p`"));
        let two = scores("p", &[[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]]);
        assert!(compare(&active, &[two]).unwrap_err().contains("the candidate answered FP32 [2, 3]"));
        let labels = Tensor::from_f32("l", vec![1], &[1.0]);
        assert!(compare(&[labels], &active).unwrap_err().contains("no float [batch, classes]"));
    }
}
