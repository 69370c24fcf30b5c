//! The client side of V2 inference: building requests (JSON, or binary tensors) and reading
//! responses. The escalation path, `outpostctl` and the tests all speak through it.

use serde_json::{Value, json};

use super::HEADER_LENGTH;
use crate::tensor::{DataType, Tensor};

/// A request body and the headers it needs.
pub struct Body {
    pub bytes: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

/// A JSON request with every input's `data` inline.
pub fn json_request(inputs: &[Tensor]) -> Body {
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape, "data": t.to_json() }))
        .collect();
    let bytes = json!({ "inputs": inputs }).to_string().into_bytes();
    Body { bytes, headers: vec![("content-type", "application/json".into())] }
}

/// A binary-extension request: inputs as raw bytes after the JSON header, outputs asked as binary.
pub fn binary_request(inputs: &[Tensor]) -> Body {
    let specs: Vec<Value> = inputs
        .iter()
        .map(|t| {
            json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape,
                    "parameters": { "binary_data_size": t.data.len() } })
        })
        .collect();
    let header = json!({ "inputs": specs, "parameters": { "binary_data_output": true } }).to_string();
    let mut bytes = header.clone().into_bytes();
    for t in inputs {
        bytes.extend_from_slice(&t.data);
    }
    Body {
        bytes,
        headers: vec![("content-type", "application/octet-stream".into()), (HEADER_LENGTH, header.len().to_string())],
    }
}

/// The JSON part of a response and its outputs, JSON or binary. `header_len` is the value of
/// the `Inference-Header-Content-Length` header, if any.
pub fn parse_response(header_len: Option<&str>, body: &[u8]) -> Result<(Value, Vec<Tensor>), String> {
    let header_len = match header_len {
        Some(v) => v.trim().parse::<usize>().map_err(|_| "bad Inference-Header-Content-Length")?,
        None => body.len(),
    };
    if header_len > body.len() {
        return Err("Inference-Header-Content-Length is beyond the body".into());
    }
    let doc: Value =
        serde_json::from_slice(&body[..header_len]).map_err(|e| format!("malformed response JSON: {e}"))?;
    let mut binary = &body[header_len..];
    let mut out = Vec::new();
    for o in doc["outputs"].as_array().ok_or("no outputs")? {
        let datatype = o["datatype"].as_str().and_then(DataType::parse).ok_or("bad datatype")?;
        let shape: Vec<usize> =
            o["shape"].as_array().ok_or("no shape")?.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect();
        let data = match o["parameters"]["binary_data_size"].as_u64() {
            Some(n) => {
                let n = n as usize;
                if n > binary.len() {
                    return Err("binary output beyond the body".into());
                }
                let (mine, rest) = binary.split_at(n);
                binary = rest;
                mine.to_vec()
            }
            None => Tensor::encode_json(datatype, o["data"].as_array().ok_or("no data")?).map_err(|e| e.to_string())?,
        };
        if Tensor::shape_elements(&shape).and_then(|n| n.checked_mul(datatype.size()?)) != Some(data.len()) {
            return Err(format!("output {}: shape {shape:?} does not match its data", o["name"]));
        }
        out.push(Tensor { name: o["name"].as_str().unwrap_or_default().into(), datatype, shape, data });
    }
    Ok((doc, out))
}
