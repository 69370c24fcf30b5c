//! Declared input shapes: the concrete shapes a model is prepared for at load, and whether a
//! request may bring another.
//!
//! Real models carry symbolic dimensions (batch, image height and width, sequence length). ONNX
//! Runtime runs them as they are; tract often cannot analyse them symbolically but runs any
//! concrete shape. A model's `shapes` (as Triton's `dims` or OpenVINO Model Server's `shape`)
//! lists the shapes it will see, each a set of one concrete shape per input; they are prepared and
//! warmed at load. `undeclared_shapes = "refuse"` then answers 400 to any other shape, naming the
//! declared ones, for operators who want no preparation on the request path.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Deserialize;

use crate::backend::Signature;
use crate::tensor::Tensor;

/// Plans for shapes nobody declared that a model keeps prepared (tract), least recently used
/// evicted first; declared shapes are kept besides these.
pub const DEFAULT_PLAN_CACHE: usize = 8;

/// What to do with a request whose input shapes are not among the declared ones.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Undeclared {
    /// Serve it: a backend that needs a plan per shape prepares one on first use (cached).
    #[default]
    Prepare,
    /// Answer 400, naming the declared shapes.
    Refuse,
}

/// One declared set: a concrete shape per input, by input name. Inputs whose dimensions are all
/// fixed may be left out.
pub type ShapeSet = BTreeMap<String, Vec<usize>>;

/// A model's shape settings, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Shapes {
    pub declared: Vec<ShapeSet>,
    pub undeclared: Undeclared,
    /// Bound on plans prepared for undeclared shapes (tract).
    pub plan_cache: usize,
}

impl Default for Shapes {
    fn default() -> Shapes {
        Shapes { declared: Vec::new(), undeclared: Undeclared::Prepare, plan_cache: DEFAULT_PLAN_CACHE }
    }
}

impl Shapes {
    /// Checks the settings on their own (config time): the reason, when they are wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.undeclared == Undeclared::Refuse && self.declared.is_empty() {
            return Err("`undeclared_shapes = \"refuse\"` needs at least one entry in `shapes`".into());
        }
        if self.plan_cache == 0 {
            return Err("`plan_cache` must be at least 1".into());
        }
        for (i, set) in self.declared.iter().enumerate() {
            if set.is_empty() {
                return Err(format!("`shapes[{i}]` names no input"));
            }
            if let Some((name, _)) = set.iter().find(|(_, dims)| dims.contains(&0)) {
                return Err(format!("`shapes[{i}].{name}` has a zero dimension"));
            }
        }
        Ok(())
    }

    /// The declared sets as full input shapes in signature order, checked against the model:
    /// each names only its inputs, with their rank and fixed dimensions, and gives every input
    /// with a symbolic dimension.
    pub fn resolve(&self, signature: &Signature) -> Result<Vec<Vec<Vec<usize>>>, String> {
        self.declared
            .iter()
            .enumerate()
            .map(|(i, set)| {
                if let Some(name) = set.keys().find(|n| !signature.inputs.iter().any(|s| &s.name == *n)) {
                    return Err(format!("`shapes[{i}]` names `{name}`, which is not an input of the model"));
                }
                signature
                    .inputs
                    .iter()
                    .map(|spec| match set.get(&spec.name) {
                        Some(dims) if spec.accepts_shape(dims) => Ok(dims.clone()),
                        Some(dims) => Err(format!(
                            "`shapes[{i}].{}` = {dims:?} does not fit the input's shape {}",
                            spec.name,
                            spec.shape_text()
                        )),
                        None if spec.shape.iter().all(|&d| d >= 0) => {
                            Ok(spec.shape.iter().map(|&d| d as usize).collect())
                        }
                        None => Err(format!(
                            "`shapes[{i}]` leaves out `{}`, whose shape {} has symbolic dimensions",
                            spec.name,
                            spec.shape_text()
                        )),
                    })
                    .collect()
            })
            .collect()
    }

    /// Whether a request (inputs in signature order) may be served: always, unless undeclared
    /// shapes are refused; then the reason names the declared shapes.
    pub fn admit(&self, resolved: &[Vec<Vec<usize>>], inputs: &[Tensor], signature: &Signature) -> Result<(), String> {
        if self.undeclared == Undeclared::Prepare || resolved.iter().any(|set| same_shapes(set, inputs)) {
            return Ok(());
        }
        let mut text = String::from("input shapes ");
        let given: Vec<String> = inputs.iter().map(|t| format!("`{}` {:?}", t.name, t.shape)).collect();
        text.push_str(&given.join(", "));
        text.push_str(" are not among the shapes this model serves: ");
        for (i, set) in resolved.iter().enumerate() {
            if i > 0 {
                text.push_str("; ");
            }
            let dims: Vec<String> =
                signature.inputs.iter().zip(set).map(|(spec, dims)| format!("`{}` {dims:?}", spec.name)).collect();
            let _ = write!(text, "{}", dims.join(", "));
        }
        Err(text)
    }
}

fn same_shapes(set: &[Vec<usize>], inputs: &[Tensor]) -> bool {
    set.len() == inputs.len() && set.iter().zip(inputs).all(|(dims, t)| *dims == t.shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::TensorSpec;
    use crate::tensor::DataType;

    fn sig() -> Signature {
        let spec = |name: &str, shape: Vec<i64>| TensorSpec { name: name.into(), datatype: DataType::Fp32, shape };
        Signature {
            inputs: vec![spec("x", vec![1, 3, 48, -1]), spec("scale", vec![1])],
            outputs: vec![spec("y", vec![1, -1, 100])],
        }
    }

    fn shapes(declared: &[&[usize]], undeclared: Undeclared) -> Shapes {
        Shapes {
            declared: declared.iter().map(|d| ShapeSet::from([("x".to_string(), d.to_vec())])).collect(),
            undeclared,
            plan_cache: 4,
        }
    }

    fn input(name: &str, shape: &[usize]) -> Tensor {
        Tensor { name: name.into(), datatype: DataType::Fp32, shape: shape.to_vec(), data: Vec::new() }
    }

    #[test]
    fn declared_sets_resolve_in_signature_order_with_fixed_inputs_filled_in() {
        let s = shapes(&[&[1, 3, 48, 320], &[1, 3, 48, 640]], Undeclared::Refuse);
        assert_eq!(s.validate(), Ok(()));
        let resolved = s.resolve(&sig()).unwrap();
        assert_eq!(resolved, vec![vec![vec![1, 3, 48, 320], vec![1]], vec![vec![1, 3, 48, 640], vec![1]]]);
    }

    #[test]
    fn sets_that_do_not_fit_the_model_are_refused_naming_the_input() {
        let wrong_rank = shapes(&[&[1, 3, 48]], Undeclared::Prepare);
        assert!(wrong_rank.resolve(&sig()).unwrap_err().contains("`shapes[0].x` = [1, 3, 48] does not fit"));
        let mut unknown = shapes(&[&[1, 3, 48, 320]], Undeclared::Prepare);
        unknown.declared[0].insert("z".into(), vec![1]);
        assert!(unknown.resolve(&sig()).unwrap_err().contains("names `z`, which is not an input"));
        let empty = Shapes { declared: vec![ShapeSet::from([("scale".to_string(), vec![1])])], ..Shapes::default() };
        assert!(empty.resolve(&sig()).unwrap_err().contains("leaves out `x`"));
    }

    #[test]
    fn refusing_undeclared_shapes_needs_declared_ones() {
        let s = shapes(&[], Undeclared::Refuse);
        assert!(s.validate().unwrap_err().contains("needs at least one entry"));
        assert!(shapes(&[&[1, 3, 48, 0]], Undeclared::Prepare).validate().unwrap_err().contains("zero dimension"));
    }

    #[test]
    fn an_undeclared_shape_is_refused_naming_the_declared_ones() {
        let s = shapes(&[&[1, 3, 48, 320], &[1, 3, 48, 640]], Undeclared::Refuse);
        let resolved = s.resolve(&sig()).unwrap();
        assert_eq!(s.admit(&resolved, &[input("x", &[1, 3, 48, 640]), input("scale", &[1])], &sig()), Ok(()));
        let err = s.admit(&resolved, &[input("x", &[1, 3, 48, 100]), input("scale", &[1])], &sig()).unwrap_err();
        assert_eq!(
            err,
            "input shapes `x` [1, 3, 48, 100], `scale` [1] are not among the shapes this model serves: \
             `x` [1, 3, 48, 320], `scale` [1]; `x` [1, 3, 48, 640], `scale` [1]"
        );
        let open = shapes(&[&[1, 3, 48, 320]], Undeclared::Prepare);
        assert_eq!(open.admit(&resolved, &[input("x", &[1, 3, 48, 100]), input("scale", &[1])], &sig()), Ok(()));
    }
}
