use std::path::{Path, PathBuf};

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};

use crate::backend::tract::quantize::CENTRED_OP;
use crate::backend::tract::rewrite::graph::{GRAPH_NODE, MODEL_GRAPH};
use crate::backend::tract::rewrite::wire::{fields, put_bytes};
use crate::backend::tract::rewrite::{Analysis, analyse, rewrite};
use crate::onnx::{ModelGraph, pb};

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(name)
}

fn graph(bytes: Vec<u8>) -> ModelGraph {
    ModelGraph::from_bytes(Path::new("x.onnx"), bytes).unwrap()
}

#[test]
fn the_quantized_softmax_is_found_and_rewritten_leaving_the_rest_as_it_was() {
    let model = std::fs::read(model("hazards/digits-edge-qsoftmax.onnx")).unwrap();
    let analysis = analyse(&model).unwrap();
    assert_eq!(analysis.rewrite.len(), 1, "{analysis:?}");
    assert!(analysis.unhandled.is_empty(), "{analysis:?}");
    let rewritten = rewrite(&model, &analysis.rewrite).unwrap();
    // No quantized Softmax left to rewrite, and every other node kept.
    assert_eq!(analyse(&rewritten).unwrap(), Analysis::default());
    let (after, before) = (graph(rewritten), graph(model));
    assert_eq!(after.signature, before.signature);
    assert_eq!(after.nodes.len(), before.nodes.len() + 3, "one DequantizeLinear became four nodes");
    let dq_out = &analysis.rewrite[0];
    let mul = after.nodes.iter().find(|n| n.outputs.first() == Some(dq_out)).unwrap();
    assert_eq!(mul.op_type, "Mul");
}

#[test]
fn integer_matmuls_become_float_matmuls_of_the_centred_quantizer_output() {
    let model = std::fs::read(model("digits-edge-dynamic.onnx")).unwrap();
    let before = graph(model.clone());
    let count = |g: &ModelGraph, op: &str| g.nodes.iter().filter(|n| n.op_type == op).count();
    let (products, quantizers) = (count(&before, "MatMulInteger"), count(&before, "DynamicQuantizeLinear"));
    assert!(products > 0 && quantizers > 0);
    let analysis = analyse(&model).unwrap();
    let summary = analysis.summary(&model).unwrap();
    assert!(summary.starts_with(&format!("{quantizers} DynamicQuantizeLinear, {products} MatMulInteger")), "{summary}");
    let rewritten = rewrite(&model, &analysis.rewrite).unwrap();
    let after = graph(rewritten.clone());
    assert_eq!(after.signature, before.signature);
    assert_eq!(count(&after, "MatMulInteger"), 0);
    assert_eq!(count(&after, "DynamicQuantizeLinear"), 0);
    assert_eq!(count(&after, CENTRED_OP), quantizers);
    for old in before.nodes.iter().filter(|n| n.op_type == "MatMulInteger") {
        // The INT32 output is still there for any reader, made from the float product.
        let cast = after.nodes.iter().find(|n| n.outputs == old.outputs).unwrap();
        assert_eq!(cast.op_type, "Cast");
        let matmul = after.nodes.iter().find(|n| n.outputs == cast.inputs).unwrap();
        assert_eq!(matmul.op_type, "MatMul");
        // Its first operand is the quantizer's centred output, which keeps the scale and zero
        // point under their names.
        let quantizer = before.nodes.iter().find(|n| n.outputs[0] == old.inputs[0]).unwrap();
        let centred = after.nodes.iter().find(|n| n.outputs[0] == matmul.inputs[0]).unwrap();
        assert_eq!((centred.op_type.as_str(), centred.domain.as_str()), (CENTRED_OP, "ai.outpost"));
        assert_eq!((&centred.inputs, &centred.outputs[1..]), (&quantizer.inputs, &quantizer.outputs[1..]));
        // The quantizer's Cast back to float reads the float product instead.
        for reader in before.nodes.iter().filter(|n| n.inputs.first() == old.outputs.first() && n.op_type == "Cast") {
            let now = after.nodes.iter().find(|n| n.outputs == reader.outputs).unwrap();
            assert_eq!((now.op_type.as_str(), &now.inputs), ("Identity", &matmul.outputs));
        }
    }
    assert_eq!(analyse(&rewritten).unwrap(), Analysis::default(), "nothing left to rewrite");
}

/// `model` with `node` added to its main graph.
fn with_node(model: &[u8], node: pb::Node) -> Vec<u8> {
    let mut out = Vec::new();
    for field in fields(model).unwrap() {
        if field.tag != MODEL_GRAPH {
            out.extend_from_slice(field.raw);
            continue;
        }
        let mut graph = field.payload.to_vec();
        put_bytes(&mut graph, GRAPH_NODE, &node.encode_to_vec());
        encode_key(MODEL_GRAPH, WireType::LengthDelimited, &mut out);
        encode_varint(graph.len() as u64, &mut out);
        out.extend_from_slice(&graph);
    }
    out
}

#[test]
fn a_quantizer_read_by_anything_else_is_kept_and_its_product_casts_and_centres() {
    let model = std::fs::read(model("digits-edge-dynamic.onnx")).unwrap();
    let before = graph(model.clone());
    let first = before.nodes.iter().find(|n| n.op_type == "DynamicQuantizeLinear").unwrap();
    let spy = pb::Node {
        input: vec![first.outputs[0].clone()],
        output: vec!["spy".into()],
        op_type: "Identity".into(),
        ..Default::default()
    };
    let model = with_node(&model, spy);
    let analysis = analyse(&model).unwrap();
    assert!(!analysis.rewrite.contains(&first.outputs[0]), "{analysis:?}");
    let after = graph(rewrite(&model, &analysis.rewrite).unwrap());
    let kept: Vec<_> = after.nodes.iter().filter(|n| n.op_type == "DynamicQuantizeLinear").collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].outputs, first.outputs);
    // Its product reads the UINT8 output through a cast and a subtraction, as before.
    let cast = after.nodes.iter().find(|n| n.op_type == "Cast" && n.inputs == first.outputs[..1]).unwrap();
    assert!(after.nodes.iter().any(|n| n.op_type == "Sub" && n.inputs[0] == cast.outputs[0]));
}

#[test]
fn a_quantizer_is_not_rewritten_without_its_readers() {
    let model = std::fs::read(model("digits-edge-dynamic.onnx")).unwrap();
    let product = graph(model.clone()).nodes.into_iter().find(|n| n.op_type == "MatMulInteger").unwrap();
    let mut partial = analyse(&model).unwrap().rewrite;
    partial.retain(|o| o != &product.outputs[0]);
    let err = rewrite(&model, &partial).unwrap_err();
    assert!(err.contains("has readers that are not rewritten products"), "{err}");
}

#[test]
fn integer_convolutions_keep_their_attributes() {
    let model = std::fs::read(model("digits-cnn-dynamic.onnx")).unwrap();
    let analysis = analyse(&model).unwrap();
    let summary = analysis.summary(&model).unwrap();
    assert!(summary.contains("ConvInteger"), "{summary}");
    let rewritten = rewrite(&model, &analysis.rewrite).unwrap();
    let decoded = <crate::onnx::pb::Model as prost::Message>::decode(rewritten.as_slice()).unwrap();
    let original = <crate::onnx::pb::Model as prost::Message>::decode(model.as_slice()).unwrap();
    let attributes = |m: &crate::onnx::pb::Model, op: &str| -> Vec<Vec<String>> {
        let g = m.graph.as_ref().unwrap();
        g.node
            .iter()
            .filter(|n| n.op_type == op)
            .map(|n| n.attribute.iter().map(|a| a.name.clone()).collect())
            .collect()
    };
    let convs = attributes(&decoded, "Conv");
    assert!(!convs.is_empty());
    assert_eq!(convs, attributes(&original, "ConvInteger"), "every attribute copied");
}

#[test]
fn a_model_without_the_patterns_is_left_alone_and_garbage_is_an_error() {
    let edge = std::fs::read(model("digits-edge.onnx")).unwrap();
    assert_eq!(analyse(&edge).unwrap(), Analysis::default());
    assert_eq!(rewrite(&edge, &[]).unwrap(), edge, "copied byte for byte");
    assert!(analyse(&[0xff; 8]).is_err());
}
