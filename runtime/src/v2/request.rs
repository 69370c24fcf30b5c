//! Parsing a V2 inference request (JSON, or JSON plus the binary tensor extension) and binding it
//! to a model's signature. Untrusted bytes come in; every error names the field and what was
//! expected, and nothing is allocated on the strength of a size the client merely claims.

use serde_json::{Map, Value};

use super::BadRequest;
use super::elements::{self, DataError};
use super::raw::{RawData, RawRequest, read};
use super::scan;
use crate::backend::Signature;
use crate::tensor::{DataType, Tensor};

/// A parsed inference request, not yet checked against a model.
#[derive(Debug, PartialEq)]
pub struct InferRequest {
    pub id: Option<String>,
    pub parameters: Map<String, Value>,
    pub inputs: Vec<Tensor>,
    /// The outputs asked for; `None` means all.
    pub outputs: Option<Vec<OutputRequest>>,
    /// Request-level `binary_data_output`: every output as binary unless it says otherwise.
    pub binary_output: bool,
}

/// One entry of the request's `outputs`.
#[derive(Debug, PartialEq)]
pub struct OutputRequest {
    pub name: String,
    pub binary: Option<bool>,
}

/// Parses a request body. `header_len` is the `Inference-Header-Content-Length` header: when
/// present, the body is that many bytes of JSON followed by the inputs' binary data.
pub fn parse(body: &[u8], header_len: Option<usize>) -> Result<InferRequest, BadRequest> {
    let (json, binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(BadRequest(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )));
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    // The common body without serde's per-element work where it can be; serde for all the rest.
    let raw = match scan::request(json) {
        Some(raw) => raw,
        None => read(json)?,
    };
    build(raw, binary)
}

/// The request from its JSON and the binary data after it.
pub(super) fn build(raw: RawRequest, mut binary: &[u8]) -> Result<InferRequest, BadRequest> {
    let binary_output = flag(&raw.parameters, "binary_data_output", "parameters")?.unwrap_or(false);

    let mut inputs = Vec::with_capacity(raw.inputs.len());
    for input in raw.inputs {
        let field = format!("input `{}`", input.name);
        let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
            let names: Vec<&str> = DataType::ALL.iter().map(|d| d.as_str()).collect();
            BadRequest(format!("{field}: unknown datatype `{}` (one of {})", input.datatype, names.join(", ")))
        })?;
        if datatype == DataType::Bytes {
            return Err(BadRequest(format!("{field}: datatype BYTES is not supported by this server")));
        }
        let mut shape = Vec::with_capacity(input.shape.len());
        for &d in &input.shape {
            let d = usize::try_from(d)
                .map_err(|_| BadRequest(format!("{field}: shape {:?} has a negative dimension", input.shape)))?;
            shape.push(d);
        }
        let elements = Tensor::shape_elements(&shape)
            .ok_or_else(|| BadRequest(format!("{field}: shape {:?} is too large", input.shape)))?;
        let elem_size = datatype.size().unwrap_or(1);
        let data = match (input.data, binary_size(&input.parameters, &field)?) {
            (Some(_), Some(_)) => {
                return Err(BadRequest(format!("{field}: has both `data` and a `binary_data_size` parameter")));
            }
            (None, None) => return Err(BadRequest(format!("{field}: has no `data`"))),
            (Some(data), None) => match data {
                RawData::Decoded(decoded) => decoded,
                RawData::Text(text) => elements::decode(text, datatype, elements),
            }
            .map_err(|e| match e {
                DataError::Count { expected, found } => BadRequest(format!(
                    "{field}: shape {:?} holds {expected} elements but `data` has {found}",
                    input.shape
                )),
                other => BadRequest(format!("{field}: `data` {other}")),
            })?,
            (None, Some(size)) => {
                let want = elements.checked_mul(elem_size);
                if want != Some(size) {
                    return Err(BadRequest(format!(
                        "{field}: binary_data_size is {size} bytes but {datatype} {:?} takes {} bytes",
                        input.shape,
                        want.map_or("too many".to_string(), |w| w.to_string())
                    )));
                }
                if size > binary.len() {
                    return Err(BadRequest(format!(
                        "{field}: binary_data_size is {size} bytes but only {} bytes of binary data remain",
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                if datatype == DataType::Bool && mine.iter().any(|&b| b > 1) {
                    return Err(BadRequest(format!("{field}: BOOL binary data must be bytes 0 or 1")));
                }
                mine.to_vec()
            }
        };
        inputs.push(Tensor { name: input.name, datatype, shape, data });
    }
    if !binary.is_empty() {
        return Err(BadRequest(format!(
            "{} bytes of binary data follow the last binary input (check binary_data_size and Inference-Header-Content-Length)",
            binary.len()
        )));
    }

    let outputs = match raw.outputs {
        None => None,
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for o in list {
                let field = format!("output `{}`", o.name);
                if o.parameters.contains_key("classification") {
                    return Err(BadRequest(format!("{field}: the classification extension is not supported")));
                }
                out.push(OutputRequest { binary: flag(&o.parameters, "binary_data", &field)?, name: o.name });
            }
            Some(out)
        }
    };
    Ok(InferRequest { id: raw.id, parameters: raw.parameters, inputs, outputs, binary_output })
}

fn flag(params: &Map<String, Value>, key: &str, field: &str) -> Result<Option<bool>, BadRequest> {
    match params.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(BadRequest(format!("{field}: parameter `{key}` must be true or false, got {other}"))),
    }
}

fn binary_size(params: &Map<String, Value>, field: &str) -> Result<Option<usize>, BadRequest> {
    match params.get("binary_data_size") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| BadRequest(format!("{field}: binary_data_size must be a non-negative integer, got {v}"))),
    }
}

/// Checks the inputs against the model and puts them in signature order.
pub fn bind(
    inputs: Vec<Tensor>,
    model: &str,
    signature: &Signature,
    allow_non_finite: bool,
) -> Result<Vec<Tensor>, BadRequest> {
    let takes = || signature.inputs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
    let mut slots: Vec<Option<Tensor>> = vec![None; signature.inputs.len()];
    for t in inputs {
        let Some(i) = signature.inputs.iter().position(|s| s.name == t.name) else {
            return Err(BadRequest(format!("unknown input `{}` (model `{model}` takes: {})", t.name, takes())));
        };
        let spec = &signature.inputs[i];
        if slots[i].is_some() {
            return Err(BadRequest(format!("input `{}` is given twice", t.name)));
        }
        if t.datatype != spec.datatype {
            return Err(BadRequest(format!(
                "input `{}`: expected datatype {}, got {}",
                t.name, spec.datatype, t.datatype
            )));
        }
        if !spec.accepts_shape(&t.shape) {
            return Err(BadRequest(format!(
                "input `{}`: shape {:?} does not match the model's {} (-1: any size)",
                t.name,
                t.shape,
                spec.shape_text()
            )));
        }
        if !allow_non_finite && let Some(index) = t.first_non_finite() {
            return Err(BadRequest(format!(
                "input `{}`: element {index} is NaN or infinite, which model `{model}` does not accept",
                t.name
            )));
        }
        slots[i] = Some(t);
    }
    slots
        .into_iter()
        .zip(&signature.inputs)
        .map(|(t, spec)| {
            t.ok_or_else(|| BadRequest(format!("missing input `{}` (model `{model}` takes: {})", spec.name, takes())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::TensorSpec;
    use proptest::prelude::*;

    fn sig() -> Signature {
        Signature {
            inputs: vec![TensorSpec { name: "input".into(), datatype: DataType::Fp32, shape: vec![-1, 2] }],
            outputs: vec![TensorSpec { name: "probabilities".into(), datatype: DataType::Fp32, shape: vec![-1, 10] }],
        }
    }

    fn err(body: &str) -> String {
        parse(body.as_bytes(), None).unwrap_err().0
    }

    #[test]
    fn json_inputs_flat_or_nested() {
        let flat =
            parse(br#"{"inputs":[{"name":"input","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}]}"#, None).unwrap();
        let nested =
            parse(br#"{"inputs":[{"name":"input","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4]]}]}"#, None)
                .unwrap();
        assert_eq!(flat, nested);
        assert_eq!(flat.inputs[0].to_f64(), vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn binary_inputs_are_split_by_size() {
        let header = br#"{"inputs":[{"name":"input","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = header.to_vec();
        body.extend(1.5f32.to_le_bytes());
        body.extend(2.5f32.to_le_bytes());
        let r = parse(&body, Some(header.len())).unwrap();
        assert_eq!(r.inputs[0].to_f64(), vec![1.5, 2.5]);
        assert!(r.binary_output);

        let e = parse(&body[..body.len() - 1], Some(header.len())).unwrap_err().0;
        assert!(e.contains("only 7 bytes of binary data remain"), "{e}");
        let mut extra = body.clone();
        extra.push(0);
        assert!(parse(&extra, Some(header.len())).unwrap_err().0.contains("1 bytes of binary data follow"));
        assert!(parse(&body, Some(body.len() + 1)).unwrap_err().0.contains("Inference-Header-Content-Length"));
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err("{").starts_with("malformed request JSON"));
        assert!(err(r#"{"inputs":[],"extra":1}"#).contains("unknown field `extra`"));
        assert!(
            err(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP33","data":[1]}]}"#)
                .contains("input `x`: unknown datatype `FP33`")
        );
        assert!(
            err(r#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}]}"#)
                .contains("negative dimension")
        );
        assert!(
            err(r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1]}]}"#)
                .contains("holds 3 elements but `data` has 1")
        );
        assert!(
            err(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[1000]}]}"#)
                .contains("out of range for INT8")
        );
        assert!(err(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#).contains("has no `data`"));
        assert!(
            err(r#"{"inputs":[{"name":"x","shape":[4294967296,4294967296],"datatype":"FP32","data":[]}]}"#)
                .contains("too large")
        );
        assert!(
            err(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":"4"}}]}"#)
                .contains("binary_data_size must be")
        );
        assert!(err(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],"parameters":{"binary_data_size":4}}]}"#).contains("both"));
        assert!(
            err(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":1}]}"#).contains("must be an array")
        );
    }

    #[test]
    fn data_before_or_after_its_datatype_and_shape_reads_the_same() {
        // After: decoded in the same pass as the request. Before: kept as text, decoded once the
        // datatype and shape are known. Both give the same tensor and the same errors.
        let after =
            |data: &str| format!(r#"{{"inputs":[{{"name":"x","shape":[2,2],"datatype":"INT8","data":{data}}}]}}"#);
        let before =
            |data: &str| format!(r#"{{"inputs":[{{"data":{data},"name":"x","datatype":"INT8","shape":[2,2]}}]}}"#);
        let between =
            |data: &str| format!(r#"{{"inputs":[{{"name":"x","datatype":"INT8","data":{data},"shape":[2,2]}}]}}"#);
        let good = "[[1,-2],[3,4]]";
        let want = parse(after(good).as_bytes(), None).unwrap();
        assert_eq!(want.inputs[0].to_f64(), vec![1.0, -2.0, 3.0, 4.0]);
        for body in [before(good), between(good)] {
            assert_eq!(parse(body.as_bytes(), None).unwrap(), want);
        }
        let decoded = |body: &str| {
            let raw: RawRequest = serde_json::from_str(body).unwrap();
            matches!(raw.inputs[0].data, Some(RawData::Decoded(_)))
        };
        assert_eq!([decoded(&after(good)), decoded(&before(good)), decoded(&between(good))], [true, false, false]);
        for (data, message) in [
            ("[1,2,3]", "holds 4 elements but `data` has 3"),
            ("[1,2,3,300]", "element 3: 300 is out of range for INT8"),
            ("[1,2,3,\"4\"]", "element 3: expected an integer, got a string"),
            ("{\"a\":[1,2,3,4]}", "`data` must be an array"),
            ("7", "`data` must be an array"),
        ] {
            for body in [after(data), before(data), between(data)] {
                let e = err(&body);
                assert!(e.starts_with("input `x`: ") && e.contains(message), "{body}: {e}");
            }
        }
        assert!(err(&after("[1,2,3,4]").replace("}]}", r#","data":[1,2,3,4]}]}"#)).contains("duplicate field `data`"));
        assert!(err(&after("[1,2,3,4]").replace("}]}", r#","name":"y"}]}"#)).contains("duplicate field `name`"));
        assert!(err(r#"{"inputs":[{"name":"x","datatype":"INT8","data":[1]}]}"#).contains("missing field `shape`"));
        assert!(
            err(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[1],"dtype":1}]}"#)
                .contains("unknown field `dtype`")
        );
        // A datatype or shape the request refuses: the data is kept as text and the refusal named.
        assert!(err(&after("[1,2,3,4]").replace("INT8", "FP33")).contains("unknown datatype `FP33`"));
        assert!(err(&after("[1,2,3,4]").replace("[2,2]", "[-2,-2]")).contains("negative dimension"));
    }

    #[test]
    fn binding_checks_the_signature() {
        let t = |name: &str, dt, shape: Vec<usize>, vals: &[f32]| {
            let mut t = Tensor::from_f32(name, shape, vals);
            t.datatype = dt;
            t
        };
        let ok = bind(vec![t("input", DataType::Fp32, vec![1, 2], &[1.0, 2.0])], "m", &sig(), false).unwrap();
        assert_eq!(ok.len(), 1);
        let e = |inputs| bind(inputs, "m", &sig(), false).unwrap_err().0;
        assert!(e(vec![]).contains("missing input `input`"));
        assert!(e(vec![t("other", DataType::Fp32, vec![1, 2], &[1.0, 2.0])]).contains("unknown input `other`"));
        assert!(
            e(vec![t("input", DataType::Int32, vec![1, 2], &[1.0, 2.0])]).contains("expected datatype FP32, got INT32")
        );
        assert!(
            e(vec![t("input", DataType::Fp32, vec![2, 1], &[1.0, 2.0])]).contains("does not match the model's [-1, 2]")
        );
        assert!(e(vec![t("input", DataType::Fp32, vec![1, 2], &[f32::INFINITY, 2.0])]).contains("NaN or infinite"));
        let twice = vec![
            t("input", DataType::Fp32, vec![1, 2], &[1.0, 2.0]),
            t("input", DataType::Fp32, vec![1, 2], &[1.0, 2.0]),
        ];
        assert!(e(twice).contains("given twice"));
        assert!(bind(vec![t("input", DataType::Fp32, vec![1, 2], &[f32::NAN, 2.0])], "m", &sig(), true).is_ok());
    }

    proptest! {
        // The parser must answer every input with Ok or a BadRequest (a 400) that says what is
        // wrong, never panic, and never accept binary data whose sizes do not add up.
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512), split in proptest::option::of(0usize..600)) {
            if let Err(e) = parse(&body, split) {
                prop_assert!(!e.0.is_empty());
            }
        }

        #[test]
        fn well_formed_json_round_trips(values in proptest::collection::vec(-1e6f32..1e6, 1..64)) {
            let body = serde_json::json!({"inputs":[{"name":"x","shape":[values.len()],"datatype":"FP32","data":values}]});
            let r = parse(body.to_string().as_bytes(), None).unwrap();
            let back: Vec<f32> = r.inputs[0].to_f64().into_iter().map(|v| v as f32).collect();
            prop_assert_eq!(back, values);
        }

        #[test]
        fn binary_sizes_must_add_up(n in 0usize..16, declared in 0usize..80, extra in 0usize..8) {
            let header = format!(r#"{{"inputs":[{{"name":"x","shape":[{n}],"datatype":"FP32","parameters":{{"binary_data_size":{declared}}}}}]}}"#);
            let mut body = header.clone().into_bytes();
            body.extend(std::iter::repeat_n(0u8, declared + extra));
            let r = parse(&body, Some(header.len()));
            prop_assert_eq!(r.is_ok(), declared == n * 4 && extra == 0);
        }
    }
}
