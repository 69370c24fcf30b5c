//! The V2 inference request: JSON, or JSON followed by binary tensors (the first byte picks a
//! header length), parsed and bound to the digits model's signature as the server does.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use outpost_runtime::onnx::{ModelGraph, Signature};
use outpost_runtime::v2::request;

fn signature() -> &'static Signature {
    static SIGNATURE: OnceLock<Signature> = OnceLock::new();
    SIGNATURE.get_or_init(|| {
        let model = include_bytes!("../../../models/digits-edge.onnx").to_vec();
        ModelGraph::from_bytes("digits-edge.onnx".as_ref(), model).expect("the sample model").signature
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    // Even: plain JSON. Odd: a JSON header of (pick / 2) bytes, then binary data.
    let header_len = (pick % 2 == 1).then_some(usize::from(pick / 2));
    if let Ok(req) = request::parse(body, header_len) {
        let _ = request::bind(req.inputs, "digits-edge", signature(), false);
    }
});
