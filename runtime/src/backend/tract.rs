//! The tract backend: pure Rust, CPU everywhere, the one the static binary carries.

use std::sync::Arc;

use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, TDim, TValue,
    Tensor as TractTensor, TypedRunnableModel, tvec,
};

use super::{Backend, BackendError, Session, SessionOptions, Signature};
use crate::onnx::ModelGraph;
use crate::tensor::{DataType, Tensor};

/// The tract backend.
pub struct Tract;

impl Backend for Tract {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn check(&self, graph: &ModelGraph) -> Result<(), BackendError> {
        let registry = &tract_onnx::onnx().op_register.0;
        if let Some(node) = graph.nodes.iter().find(|n| !registry.contains_key(&n.op_type)) {
            return Err(BackendError::UnsupportedOp {
                path: graph.path.clone(),
                backend: "tract",
                op: node.op_type.clone(),
                node: node.name.clone(),
            });
        }
        if let Some(reason) = quantized_softmax(graph) {
            return Err(BackendError::Refused { path: graph.path.clone(), reason });
        }
        for spec in graph.signature.inputs.iter().chain(&graph.signature.outputs) {
            if spec.datatype == DataType::Bytes {
                return Err(BackendError::Refused {
                    path: graph.path.clone(),
                    reason: format!(
                        "tensor `{}` is a string tensor, which the tract backend does not serve",
                        spec.name
                    ),
                });
            }
        }
        Ok(())
    }

    fn prepare(&self, graph: &ModelGraph, _options: &SessionOptions) -> Result<Box<dyn Session>, BackendError> {
        let err = |e: tract_onnx::prelude::TractError| BackendError::Prepare {
            path: graph.path.clone(),
            backend: "tract",
            message: format!("{e:#}"),
        };
        // Value infos and output shapes in exported models are often stale or use symbols tract
        // cannot unify; the input facts below are the only shapes tract needs.
        let onnx = tract_onnx::onnx().with_ignore_output_shapes(true).with_ignore_value_info(true);
        let mut model = onnx.model_for_read(&mut graph.bytes.as_slice()).map_err(err)?;
        for (i, spec) in graph.signature.inputs.iter().enumerate() {
            let dims: Vec<TDim> = spec
                .shape
                .iter()
                .enumerate()
                .map(
                    |(axis, &d)| {
                        if d < 0 { model.sym(&format!("{}_{axis}", spec.name)).into() } else { TDim::from(d) }
                    },
                )
                .collect();
            model.set_input_fact(i, InferenceFact::dt_shape(datum_type(spec.datatype), dims)).map_err(err)?;
        }
        let plan = model.into_optimized().and_then(|m| m.into_runnable()).map_err(err)?;
        Ok(Box::new(TractSession { plan, signature: graph.signature.clone() }))
    }
}

/// tract 0.23 computes wrong probabilities, silently, for a Softmax whose output is quantized
/// (DequantizeLinear → Softmax → QuantizeLinear, as ONNX Runtime's static quantizer writes it when
/// Softmax is among the ops to quantize). Refuse that form rather than serve wrong answers.
fn quantized_softmax(graph: &ModelGraph) -> Option<String> {
    graph.nodes.iter().filter(|n| n.op_type == "Softmax").find_map(|softmax| {
        let out = softmax.outputs.first()?;
        let q = graph.consumers(out).find(|c| c.op_type == "QuantizeLinear")?;
        Some(format!(
            "Softmax `{}` feeds QuantizeLinear `{}` (a quantized Softmax): the tract backend computes wrong \
             probabilities for this form, so the model is refused; quantize it again with the Softmax left in \
             float (leave Softmax out of the quantizer's op types)",
            softmax.name, q.name
        ))
    })
}

struct TractSession {
    plan: Arc<TypedRunnableModel>,
    signature: Signature,
}

impl Session for TractSession {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
        let run_err = |e: tract_onnx::prelude::TractError| BackendError::Run(format!("{e:#}"));
        let mut values = tvec![];
        for input in inputs {
            let mut t = TractTensor::zero_dt(datum_type(input.datatype), &input.shape).map_err(run_err)?;
            t.as_bytes_mut().copy_from_slice(&input.data);
            values.push(t.into_tvalue());
        }
        let outputs = self.plan.run(values).map_err(run_err)?;
        outputs.into_iter().zip(&self.signature.outputs).map(|(v, spec)| to_tensor(&spec.name, v)).collect()
    }
}

fn to_tensor(name: &str, v: TValue) -> Result<Tensor, BackendError> {
    let datatype = from_datum_type(v.datum_type()).ok_or_else(|| {
        BackendError::Run(format!("output `{name}` has type {:?}, which V2 cannot carry", v.datum_type()))
    })?;
    Ok(Tensor { name: name.to_owned(), datatype, shape: v.shape().to_vec(), data: v.as_bytes().to_vec() })
}

fn datum_type(dt: DataType) -> DatumType {
    match dt {
        DataType::Bool => DatumType::Bool,
        DataType::Uint8 => DatumType::U8,
        DataType::Uint16 => DatumType::U16,
        DataType::Uint32 => DatumType::U32,
        DataType::Uint64 => DatumType::U64,
        DataType::Int8 => DatumType::I8,
        DataType::Int16 => DatumType::I16,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Fp16 => DatumType::F16,
        DataType::Fp32 => DatumType::F32,
        DataType::Fp64 => DatumType::F64,
        DataType::Bytes => DatumType::String,
    }
}

fn from_datum_type(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::Uint8,
        DatumType::U16 => DataType::Uint16,
        DatumType::U32 => DataType::Uint32,
        DatumType::U64 => DataType::Uint64,
        DatumType::I8 => DataType::Int8,
        DatumType::I16 => DataType::Int16,
        DatumType::I32 => DataType::Int32,
        DatumType::I64 => DataType::Int64,
        DatumType::F16 => DataType::Fp16,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::golden::{Golden, GoldenError};

    fn hazard() -> ModelGraph {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/hazards/digits-edge-qsoftmax.onnx");
        ModelGraph::read(&path).unwrap()
    }

    #[test]
    fn the_quantized_softmax_hazard_is_real() {
        // Guards the reason `check` refuses this form: run past the check, tract's answer
        // disagrees with ONNX Runtime's golden outputs.
        let graph = hazard();
        let session = Tract.prepare(&graph, &SessionOptions::default()).unwrap();
        let golden_path = graph.path.with_file_name("digits-edge-qsoftmax.golden.json");
        let err = Golden::read(&golden_path).unwrap().check(&golden_path, session.as_ref()).unwrap_err();
        assert!(matches!(err, GoldenError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn check_refuses_the_quantized_softmax_by_its_pattern() {
        let err = Tract.check(&hazard()).unwrap_err();
        assert!(err.to_string().contains("Softmax `softmax` feeds QuantizeLinear"), "{err}");
    }

    #[test]
    fn unsupported_operators_are_named_at_load() {
        let mut graph = hazard();
        graph.nodes[3].op_type = "FancyAttention".into();
        graph.nodes[3].name = "attn0".into();
        let err = Tract.check(&graph).unwrap_err();
        assert!(
            err.to_string().ends_with("the tract backend does not support operator `FancyAttention` (node `attn0`)"),
            "{err}"
        );
    }
}
