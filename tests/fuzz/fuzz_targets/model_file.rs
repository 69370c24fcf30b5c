//! A model file: the ONNX protobuf decode and the signature read from it (before any backend).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_runtime::onnx::ModelGraph;

fuzz_target!(|data: &[u8]| {
    let _ = ModelGraph::from_bytes("fuzz.onnx".as_ref(), data.to_vec());
});
