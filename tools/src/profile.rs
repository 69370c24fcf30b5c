//! `outpostctl profile`: a model's reference profile, from a reference set run through the model
//! in-process, written beside the model as `NAME.profile.json` where the runtime finds it (and a
//! release carries it with the model). What it holds and how the device uses it: docs/quality.md.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use outpost_runtime::backend::{self, SessionOptions};
use outpost_runtime::drift::Profile;
use outpost_runtime::tensor::Tensor;
use serde_json::{Value, json};

use crate::eval::read_rows;

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// The model file.
    pub model: PathBuf,
    /// Reference rows: `label,v0,v1,..` after a header line (the label is not used); each row is
    /// the model's one input, batch 1.
    #[arg(long, default_value = "models/digits-test.csv")]
    pub data: PathBuf,
    /// Use only the first N rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Where to write it (default: `NAME.profile.json` beside the model).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The backend that runs the model.
    #[arg(long, default_value = backend::FIRST_BACKEND)]
    pub backend: String,
}

/// The default place of a model's profile: beside it, where the runtime looks.
pub fn beside(model: &Path) -> PathBuf {
    let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    model.with_file_name(format!("{stem}.profile.json"))
}

pub fn profile(args: ProfileArgs) -> anyhow::Result<()> {
    let profile = build(&args.model, &args.data, args.limit, &args.backend)?;
    let out = args.out.unwrap_or_else(|| beside(&args.model));
    let text = serde_json::to_string_pretty(&profile)?;
    std::fs::write(&out, text + "\n").with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{}: {} reference rows, class output `{}`{}; inputs: {}",
        out.display(),
        profile.rows,
        profile.output,
        if profile.softmax { " (logits: softmax applied)" } else { "" },
        profile.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// Runs every reference row through the model and builds its profile.
pub fn build(model: &Path, data: &Path, limit: Option<usize>, backend_name: &str) -> anyhow::Result<Profile> {
    let rows = read_rows(data, limit)?;
    let backend = backend::by_name(backend_name)?;
    let session = backend::load(backend.as_ref(), model, &SessionOptions { instances: 1, ..Default::default() })?;
    let signature = session.signature().clone();
    let [input] = &signature.inputs[..] else {
        bail!(
            "{}: a reference set of CSV rows serves a model with one input; this one has {}",
            model.display(),
            signature.inputs.len()
        );
    };
    let mut runs = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let shape = row_shape(&input.shape, row.values.len()).with_context(|| {
            format!("row {}: {} values do not fit input `{}` {:?}", i + 1, row.values.len(), input.name, input.shape)
        })?;
        let values: Vec<Value> = if input.datatype.is_float() {
            row.values.iter().map(|&v| json!(v)).collect()
        } else {
            row.values.iter().map(|&v| json!(v as i64)).collect()
        };
        let data = Tensor::encode_json(input.datatype, &values).with_context(|| format!("row {}", i + 1))?;
        let inputs = vec![Tensor { name: input.name.clone(), datatype: input.datatype, shape, data }];
        let outputs = session.run(&inputs).with_context(|| format!("row {}", i + 1))?;
        runs.push((inputs, outputs));
    }
    Profile::build(&signature, &runs).map_err(|e| anyhow::anyhow!("{}: {e}", model.display()))
}

/// The batch-1 shape of `len` values for an input declared as `declared`: its own shape where
/// every dimension past the batch is fixed, else `[1, len]`.
fn row_shape(declared: &[i64], len: usize) -> Option<Vec<usize>> {
    let fixed: Option<Vec<usize>> = declared.iter().skip(1).map(|&d| usize::try_from(d).ok()).collect();
    let shape = match fixed {
        Some(rest) if !declared.is_empty() => std::iter::once(1).chain(rest).collect(),
        _ => vec![1, len],
    };
    (shape.iter().product::<usize>() == len && shape.len() == declared.len().max(2)).then_some(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_takes_the_declared_shape_with_batch_one() {
        assert_eq!(row_shape(&[-1, 64], 64), Some(vec![1, 64]));
        assert_eq!(row_shape(&[-1, 1, 8, 8], 64), Some(vec![1, 1, 8, 8]));
        assert_eq!(row_shape(&[-1, -1], 2048), Some(vec![1, 2048]));
        assert_eq!(row_shape(&[-1, 63], 64), None);
        assert_eq!(row_shape(&[-1, 1, 8, 8], 63), None);
    }
}
