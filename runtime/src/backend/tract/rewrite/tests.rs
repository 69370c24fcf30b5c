use std::path::{Path, PathBuf};

use crate::backend::tract::rewrite::{Analysis, analyse, rewrite};
use crate::onnx::ModelGraph;

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
fn integer_matmuls_become_float_matmuls() {
    let model = std::fs::read(model("digits-edge-dynamic.onnx")).unwrap();
    let before = graph(model.clone());
    let count = |g: &ModelGraph, op: &str| g.nodes.iter().filter(|n| n.op_type == op).count();
    let products = count(&before, "MatMulInteger");
    assert!(products > 0);
    let analysis = analyse(&model).unwrap();
    let summary = analysis.summary(&model).unwrap();
    assert!(summary.starts_with(&format!("{products} MatMulInteger")), "{summary}");
    let rewritten = rewrite(&model, &analysis.rewrite).unwrap();
    let after = graph(rewritten.clone());
    assert_eq!(after.signature, before.signature);
    assert_eq!(count(&after, "MatMulInteger"), 0);
    assert_eq!(count(&after, "DynamicQuantizeLinear"), count(&before, "DynamicQuantizeLinear"), "kept");
    for old in before.nodes.iter().filter(|n| n.op_type == "MatMulInteger") {
        // The INT32 output is still there for any reader, made from the float product.
        let cast = after.nodes.iter().find(|n| n.outputs == old.outputs).unwrap();
        assert_eq!(cast.op_type, "Cast");
        let matmul = after.nodes.iter().find(|n| n.outputs == cast.inputs).unwrap();
        assert_eq!(matmul.op_type, "MatMul");
        // The quantizer's Cast back to float reads the float product instead.
        for reader in before.nodes.iter().filter(|n| n.inputs.first() == old.outputs.first() && n.op_type == "Cast") {
            let now = after.nodes.iter().find(|n| n.outputs == reader.outputs).unwrap();
            assert_eq!((now.op_type.as_str(), &now.inputs), ("Identity", &matmul.outputs));
        }
    }
    assert_eq!(analyse(&rewritten).unwrap(), Analysis::default(), "nothing left to rewrite");
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
