//! The quantized Softmax, rewritten before tract reads the model.
//!
//! ONNX Runtime's static quantizer, with its default operator list, writes a model's final
//! Softmax as DequantizeLinear → Softmax → QuantizeLinear. tract 0.23 folds such a chain into a
//! 256-entry lookup table applied element by element, which is right for element-wise operators
//! and wrong for Softmax (a row-wise operator): the probabilities come out wrong, silently. The
//! fold starts at a DequantizeLinear whose only reader leads to a QuantizeLinear, so here the
//! DequantizeLinear that feeds such a Softmax is written as the arithmetic it stands for,
//! `(Cast(x) - Cast(zero_point)) * scale`: tract then runs a float Softmax and quantizes its
//! output, the answer ONNX Runtime gives.
//!
//! The rewrite works on the protobuf encoding itself: every field of the model but the replaced
//! node is copied byte for byte, so weights are never decoded. It applies to per-tensor
//! quantization (scalar scale and zero point, as the quantizer writes activations); a quantized
//! Softmax it cannot rewrite is refused (see `quantized_softmax` in the backend).

use prost::Message;
use prost::bytes::Buf;
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

use crate::onnx::pb;

/// ModelProto.graph, GraphProto.node and GraphProto.initializer.
const MODEL_GRAPH: u32 = 7;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
/// TensorProto.DataType FLOAT.
const FLOAT: i64 = 1;

/// What the rewrite found in a model's main graph.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Analysis {
    /// Output names of the DequantizeLinear nodes to rewrite.
    pub rewrite: Vec<String>,
    /// Softmax nodes whose output is quantized but whose input cannot be rewritten, with why.
    pub unhandled: Vec<String>,
}

/// Finds the quantized Softmaxes of the main graph and which of them can be rewritten.
pub(crate) fn analyse(model: &[u8]) -> Result<Analysis, String> {
    let graph = graph_field(model)?.ok_or("the model has no graph")?;
    let mut nodes = Vec::new();
    let mut scalars = Vec::new();
    for field in fields(graph)? {
        match field.tag {
            GRAPH_NODE => nodes.push(pb::Node::decode(field.payload).map_err(|e| e.to_string())?),
            GRAPH_INITIALIZER => {
                let t = pb::Initializer::decode(field.payload).map_err(|e| e.to_string())?;
                if t.dims.iter().product::<i64>() == 1 {
                    scalars.push(t.name);
                }
            }
            _ => {}
        }
    }
    let mut analysis = Analysis::default();
    for softmax in nodes.iter().filter(|n| n.op_type == "Softmax") {
        let Some(out) = softmax.output.first() else { continue };
        if !nodes.iter().any(|n| n.op_type == "QuantizeLinear" && n.input.first() == Some(out)) {
            continue;
        }
        let producer = softmax.input.first().and_then(|i| nodes.iter().find(|n| n.output.first() == Some(i)));
        match producer {
            Some(dq) if dq.op_type == "DequantizeLinear" && dq.input[1..].iter().all(|i| scalars.contains(i)) => {
                analysis.rewrite.push(dq.output[0].clone());
            }
            Some(dq) if dq.op_type == "DequantizeLinear" => analysis.unhandled.push(format!(
                "Softmax `{}` reads DequantizeLinear `{}`, whose scale or zero point is not a scalar initializer",
                softmax.name, dq.name
            )),
            // A float producer: nothing for tract to fold into a table.
            _ => {}
        }
    }
    Ok(analysis)
}

/// The model with each DequantizeLinear producing one of `outputs` written as arithmetic; other
/// fields are copied as they are.
pub(crate) fn rewrite(model: &[u8], outputs: &[String]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(model.len() + 256);
    for field in fields(model)? {
        if field.tag != MODEL_GRAPH {
            out.extend_from_slice(field.raw);
            continue;
        }
        let mut graph = Vec::with_capacity(field.payload.len() + 256);
        for g in fields(field.payload)? {
            let node =
                (g.tag == GRAPH_NODE).then(|| pb::Node::decode(g.payload)).transpose().map_err(|e| e.to_string())?;
            match node {
                Some(dq)
                    if dq.op_type == "DequantizeLinear" && dq.output.first().is_some_and(|o| outputs.contains(o)) =>
                {
                    for n in as_arithmetic(&dq) {
                        put_message(&mut graph, GRAPH_NODE, &n);
                    }
                }
                _ => graph.extend_from_slice(g.raw),
            }
        }
        encode_key(MODEL_GRAPH, WireType::LengthDelimited, &mut out);
        encode_varint(graph.len() as u64, &mut out);
        out.extend_from_slice(&graph);
    }
    Ok(out)
}

/// `y = DequantizeLinear(x, scale, zero_point)` as `Mul(Sub(Cast(x), Cast(zero_point)), scale)`.
fn as_arithmetic(dq: &pb::Node) -> Vec<pb::Node> {
    let y = &dq.output[0];
    let node = |suffix: &str, op: &str, input: Vec<String>, output: String, attribute: Vec<pb::Attribute>| pb::Node {
        input,
        output: vec![output],
        // Named after the output, which is unique where node names may be empty or repeated.
        name: format!("{y}/outpost_{suffix}"),
        op_type: op.into(),
        attribute,
        domain: String::new(),
    };
    let to_float =
        || vec![pb::Attribute { name: "to".into(), i: FLOAT, r#type: pb::ATTRIBUTE_INT, ..Default::default() }];
    let x = format!("{y}/outpost_float");
    let mut nodes = vec![node("cast", "Cast", vec![dq.input[0].clone()], x.clone(), to_float())];
    let centered = match dq.input.get(2).filter(|zp| !zp.is_empty()) {
        Some(zp) => {
            let zp_float = format!("{y}/outpost_zero_point");
            let centered = format!("{y}/outpost_centered");
            nodes.push(node("cast_zero_point", "Cast", vec![zp.clone()], zp_float.clone(), to_float()));
            nodes.push(node("center", "Sub", vec![x, zp_float], centered.clone(), Vec::new()));
            centered
        }
        None => x,
    };
    nodes.push(node("scale", "Mul", vec![centered, dq.input[1].clone()], y.clone(), Vec::new()));
    nodes
}

fn put_message(out: &mut Vec<u8>, tag: u32, message: &impl Message) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(message.encoded_len() as u64, out);
    message.encode_raw(out);
}

/// One field of a protobuf message: its tag, its bytes as they stand (key included), and for a
/// length-delimited field, its payload.
struct Field<'a> {
    tag: u32,
    raw: &'a [u8],
    payload: &'a [u8],
}

fn fields(mut buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let start = buf;
        let (tag, wire) = decode_key(&mut buf).map_err(|e| e.to_string())?;
        let payload: &[u8] = match wire {
            WireType::Varint => {
                decode_varint(&mut buf).map_err(|e| e.to_string())?;
                &[]
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let n = if wire == WireType::SixtyFourBit { 8 } else { 4 };
                if buf.len() < n {
                    return Err("truncated field".into());
                }
                buf.advance(n);
                &[]
            }
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut buf).map_err(|e| e.to_string())?)
                    .map_err(|_| "field too long".to_string())?;
                if buf.len() < len {
                    return Err("truncated field".into());
                }
                let payload = &buf[..len];
                buf.advance(len);
                payload
            }
            WireType::StartGroup | WireType::EndGroup => return Err("protobuf groups are not ONNX".into()),
        };
        let used = start.len() - buf.len();
        out.push(Field { tag, raw: &start[..used], payload });
    }
    Ok(out)
}

fn graph_field(model: &[u8]) -> Result<Option<&[u8]>, String> {
    Ok(fields(model)?.into_iter().find(|f| f.tag == MODEL_GRAPH).map(|f| f.payload))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::backend::tract::rewrite::{Analysis, analyse, rewrite};

    fn hazard() -> Vec<u8> {
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/hazards/digits-edge-qsoftmax.onnx"))
            .unwrap()
    }

    #[test]
    fn the_quantized_softmax_is_found_and_rewritten_leaving_the_rest_as_it_was() {
        let model = hazard();
        let analysis = analyse(&model).unwrap();
        assert_eq!(analysis.rewrite.len(), 1, "{analysis:?}");
        assert!(analysis.unhandled.is_empty(), "{analysis:?}");
        let rewritten = rewrite(&model, &analysis.rewrite).unwrap();
        // No quantized Softmax left to rewrite, and every other node kept.
        assert_eq!(analyse(&rewritten).unwrap(), Analysis::default());
        let graph = crate::onnx::ModelGraph::from_bytes(Path::new("x.onnx"), rewritten).unwrap();
        let before = crate::onnx::ModelGraph::from_bytes(Path::new("x.onnx"), model).unwrap();
        assert_eq!(graph.signature, before.signature);
        assert_eq!(graph.nodes.len(), before.nodes.len() + 3, "one DequantizeLinear became four nodes");
        let dq_out = &analysis.rewrite[0];
        let mul = graph.nodes.iter().find(|n| n.outputs.first() == Some(dq_out)).unwrap();
        assert_eq!(mul.op_type, "Mul");
    }

    #[test]
    fn a_model_without_the_pattern_is_left_alone_and_garbage_is_an_error() {
        let edge = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits-edge.onnx")).unwrap();
        assert_eq!(analyse(&edge).unwrap(), Analysis::default());
        assert_eq!(rewrite(&edge, &[]).unwrap(), edge, "copied byte for byte");
        assert!(analyse(&[0xff; 8]).is_err());
    }
}
