//! Quantized operators rewritten, before tract reads the model, into forms tract runs right and
//! fast. Each rewrite computes what the original node specifies; the comments say how exactly.
//!
//! - **Integer products** (`MatMulInteger`, `ConvInteger`: what ONNX Runtime's `quantize_dynamic`
//!   writes for every MatMul and Conv, after a `DynamicQuantizeLinear`). tract 0.23 runs them
//!   through a generic path that costs 20–60× its float kernels on real models (docs/backends.md
//!   has the figures). Each is written as the FP32 product of the zero-point-centred operands:
//!   `MatMul(Cast(a) − Cast(a_zero), Cast(b) − Cast(b_zero))` (likewise `Conv`, with the node's
//!   own attributes), cast to INT32 for any reader that wants the integer, while a `Cast` of it
//!   back to FP32 (what the quantizer writes next) reads the float product directly. The
//!   operands are 8-bit integers, so every product and every partial sum below 2²⁴ is exact in
//!   FP32; beyond that a sum is rounded by at most one part in 2²⁴ where INT32 accumulation is
//!   exact. The weights' half is constant, so tract folds it once at load: the plan keeps FP32
//!   weights, four times the INT8 bytes. The activations are still quantized (by
//!   `super::quantize`, a faster `DynamicQuantizeLinear`), so the answer is the quantized
//!   model's (ONNX Runtime's, to float rounding), not the float model's.
//! - **The quantizer in front of them.** Where only such products read a `DynamicQuantizeLinear`'s
//!   quantized output (as their first operand, with its zero point), the node is replaced by
//!   Outpost's `OutpostDynamicQuantizeCentred` (`super::quantize`), whose first output is the
//!   centred operand itself, `y − zero` in FP32, and the products read it: one pass over the
//!   activation where there were three (quantize to UINT8, cast, subtract), and the same values
//!   (integers in [−255, 255], exact in FP32). Its scale and zero point are outputs as before.
//! - **A quantized Softmax** (DequantizeLinear → Softmax → QuantizeLinear, what ONNX Runtime's
//!   static quantizer writes with its default operator list). tract folds that chain into a
//!   256-entry element-wise table, which is wrong for a row-wise Softmax: the probabilities come
//!   out wrong, silently. The DequantizeLinear feeding such a Softmax is written as the
//!   arithmetic it stands for, `(Cast(x) − Cast(zero_point)) × scale`; tract then runs a float
//!   Softmax and quantizes its output, the answer ONNX Runtime gives. A quantized Softmax this
//!   cannot handle (a per-channel scale) is refused (see `quantized_softmax` in the backend).
//!
//! A node whose operands the rewrite cannot prove to have the shapes it assumes (a zero point
//! that is neither a scalar nor a per-column or per-channel constant) is left to tract as it is.
//!
//! The rewrite works on the protobuf encoding itself: every field of the model but the replaced
//! nodes is copied byte for byte, so weights are never decoded.

mod graph;
mod nodes;
mod wire;

use std::collections::HashSet;

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};

use self::graph::{GRAPH_INITIALIZER, GRAPH_NODE, Graph, MODEL_GRAPH, is_cast_to_float};
use self::nodes::Writer;
use self::wire::{fields, put_bytes, put_message};
use crate::onnx::pb;

/// What the rewrite found in a model's main graph.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Analysis {
    /// First outputs of the nodes to rewrite.
    pub rewrite: Vec<String>,
    /// Softmax nodes whose output is quantized but whose input cannot be rewritten, with why.
    pub unhandled: Vec<String>,
}

impl Analysis {
    /// How many nodes of each operator are rewritten, for the log.
    pub fn summary(&self, model: &[u8]) -> Result<String, String> {
        let graph = Graph::read(model)?;
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for node in graph.nodes.iter().filter(|n| n.output.first().is_some_and(|o| self.rewrite.contains(o))) {
            match counts.iter_mut().find(|(op, _)| *op == node.op_type) {
                Some((_, n)) => *n += 1,
                None => counts.push((&node.op_type, 1)),
            }
        }
        Ok(counts.iter().map(|(op, n)| format!("{n} {op}")).collect::<Vec<_>>().join(", "))
    }
}

/// Finds the nodes of the main graph to rewrite, and the quantized Softmaxes that cannot be.
pub(crate) fn analyse(model: &[u8]) -> Result<Analysis, String> {
    let graph = Graph::read(model)?;
    let mut analysis = Analysis::default();
    let products: HashSet<&str> =
        graph.nodes.iter().filter(|n| graph.integer_product(n).is_some()).map(|n| n.output[0].as_str()).collect();
    let quantizers = graph.centred_quantizers(&products);
    for node in &graph.nodes {
        let first = node.output.first().map_or("", String::as_str);
        let rewrite = products.contains(first)
            || quantizers.iter().any(|q| q == first)
            || (is_cast_to_float(node) && node.input.first().is_some_and(|i| products.contains(i.as_str())));
        if rewrite {
            analysis.rewrite.push(node.output[0].clone());
        }
    }
    for softmax in graph.nodes.iter().filter(|n| n.op_type == "Softmax") {
        let Some(out) = softmax.output.first() else { continue };
        if !graph.nodes.iter().any(|n| n.op_type == "QuantizeLinear" && n.input.first() == Some(out)) {
            continue;
        }
        match softmax.input.first().and_then(|i| graph.producer(i)) {
            Some(dq) if dq.op_type == "DequantizeLinear" && dq.input[1..].iter().all(|i| graph.scalars.contains(i)) => {
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

/// The model with each node whose first output is one of `outputs` rewritten (as [`analyse`]
/// chose); other fields are copied as they are.
pub(crate) fn rewrite(model: &[u8], outputs: &[String]) -> Result<Vec<u8>, String> {
    if outputs.is_empty() {
        return Ok(model.to_vec());
    }
    let known = Graph::read(model)?;
    let chosen: HashSet<&str> = outputs.iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(model.len() + 4096);
    for field in fields(model)? {
        if field.tag != MODEL_GRAPH {
            out.extend_from_slice(field.raw);
            continue;
        }
        let mut graph = Vec::with_capacity(field.payload.len() + 4096);
        let mut writer = Writer::new(&known, &chosen);
        for g in fields(field.payload)? {
            let node =
                (g.tag == GRAPH_NODE).then(|| pb::Node::decode(g.payload)).transpose().map_err(|e| e.to_string())?;
            match node.filter(|n| n.output.first().is_some_and(|o| chosen.contains(o.as_str()))) {
                Some(node) => {
                    for n in writer.replace(&node, g.payload)? {
                        put_bytes(&mut graph, GRAPH_NODE, &n);
                    }
                }
                None => graph.extend_from_slice(g.raw),
            }
        }
        for c in writer.constants() {
            put_message(&mut graph, GRAPH_INITIALIZER, c);
        }
        encode_key(MODEL_GRAPH, WireType::LengthDelimited, &mut out);
        encode_varint(graph.len() as u64, &mut out);
        out.extend_from_slice(&graph);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
