//! Tensors as they cross the runtime: a V2 datatype, a shape, and the elements as little-endian
//! bytes. The same form serves the JSON and binary encodings of the HTTP API and every backend.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A tensor element type, spelled as the KServe V2 protocol spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    /// Variable-length strings. Parsed so the error can say what was expected; no sample
    /// model takes them.
    Bytes,
}

impl DataType {
    /// Every datatype, for error messages and tests.
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The V2 name, e.g. `FP32`.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a V2 name.
    pub fn parse(s: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Size of one element in bytes; `None` for variable-length `BYTES`.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// Whether elements are floating point (and so may be NaN or infinite).
    pub fn is_float(self) -> bool {
        matches!(self, DataType::Fp16 | DataType::Fp32 | DataType::Fp64)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named tensor with its elements as little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Why a tensor's elements could not be converted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ElementError {
    #[error("element {index}: expected {expected}, got {got}")]
    Type { index: usize, expected: &'static str, got: String },
    #[error("element {index}: {value} is out of range for {datatype}")]
    Range { index: usize, value: String, datatype: DataType },
    #[error("datatype BYTES is not supported by this runtime")]
    Bytes,
}

impl Tensor {
    /// Number of elements the shape holds, `None` on overflow.
    pub fn shape_elements(shape: &[usize]) -> Option<usize> {
        shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// A FP32 tensor from values.
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor {
            name: name.into(),
            datatype: DataType::Fp32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The first `rows` rows (along the first dimension), `None` when it has fewer or no
    /// dimension.
    pub fn first_rows(&self, rows: usize) -> Option<Tensor> {
        let all = *self.shape.first()?;
        if rows > all {
            return None;
        }
        let row_bytes = self.data.len().checked_div(all).unwrap_or(0);
        let mut shape = self.shape.clone();
        shape[0] = rows;
        Some(Tensor {
            name: self.name.clone(),
            datatype: self.datatype,
            shape,
            data: self.data[..row_bytes * rows].to_vec(),
        })
    }

    /// Number of elements in `data`.
    pub fn len(&self) -> usize {
        self.datatype.size().map_or(0, |s| self.data.len() / s)
    }

    /// Whether the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as f64, for comparisons and JSON (every numeric type converts).
    pub fn to_f64(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.len());
        self.for_each_f64_in(0..self.len(), |v| out.push(v));
        out
    }

    /// Calls `f` with each element in the range of element indices as f64, in place (`BYTES`: none).
    pub fn for_each_f64_in(&self, elements: std::ops::Range<usize>, mut f: impl FnMut(f64)) {
        let Some(size) = self.datatype.size() else { return };
        let end = (elements.end * size).min(self.data.len());
        let d = self.data.get(elements.start * size..end).unwrap_or_default();
        macro_rules! each {
            ($t:ty, $n:expr) => {
                d.chunks_exact($n).for_each(|c| f(<$t>::from_le_bytes(c.try_into().unwrap()) as f64))
            };
        }
        match self.datatype {
            DataType::Bool | DataType::Uint8 => d.iter().for_each(|&b| f(b as f64)),
            DataType::Int8 => d.iter().for_each(|&b| f(b as i8 as f64)),
            DataType::Uint16 => each!(u16, 2),
            DataType::Int16 => each!(i16, 2),
            DataType::Uint32 => each!(u32, 4),
            DataType::Int32 => each!(i32, 4),
            DataType::Uint64 => each!(u64, 8),
            DataType::Int64 => each!(i64, 8),
            DataType::Fp16 => d.chunks_exact(2).for_each(|c| f(half::f16::from_le_bytes([c[0], c[1]]).to_f64())),
            DataType::Fp32 => each!(f32, 4),
            DataType::Fp64 => each!(f64, 8),
            DataType::Bytes => {}
        }
    }

    /// Index of the first NaN or infinite element, if any. Every float input of every request is
    /// checked, so this reads the bytes in place (no f64 copy of an image-sized input).
    pub fn first_non_finite(&self) -> Option<usize> {
        match self.datatype {
            DataType::Fp16 => first_failing::<2>(&self.data, |b| half::f16::from_le_bytes(b).is_finite()),
            DataType::Fp32 => first_failing::<4>(&self.data, |b| f32::from_le_bytes(b).is_finite()),
            DataType::Fp64 => first_failing::<8>(&self.data, |b| f64::from_le_bytes(b).is_finite()),
            _ => None,
        }
    }

    /// The elements as the V2 JSON `data` field, for serde: written straight from the bytes, with
    /// no JSON value per element (a response's large float output is written in an eighth of the
    /// time). FP32 elements are written in their shortest decimal form, so 0.1f32 prints as 0.1,
    /// not 0.10000000149; NaN and infinities, which JSON cannot carry, as null.
    pub fn json_data(&self) -> JsonData<'_> {
        JsonData(self)
    }

    /// The tensor as a V2 JSON tensor object (`name`, `datatype`, `shape`, `data`), for serde;
    /// its `data` written by [`Tensor::json_data`].
    pub fn json_object(&self) -> TensorJson<'_> {
        TensorJson { data: self.json_data(), datatype: self.datatype, name: &self.name, shape: &self.shape }
    }

    /// The elements as JSON values, in row-major order, for a document built as a JSON value
    /// (outpostctl's JSON requests, `outpost inspect`). They print as [`Tensor::json_data`] writes
    /// them; a float is taken through its shortest decimal form, as a JSON value built from an
    /// f32 would print it in full (0.10000000149).
    pub fn to_json(&self) -> Vec<serde_json::Value> {
        use serde_json::Value;
        let d = &self.data;
        match self.datatype {
            DataType::Bool => d.iter().map(|&b| Value::Bool(b != 0)).collect(),
            DataType::Uint64 => {
                d.chunks_exact(8).map(|c| Value::from(u64::from_le_bytes(c.try_into().unwrap()))).collect()
            }
            DataType::Int64 => {
                d.chunks_exact(8).map(|c| Value::from(i64::from_le_bytes(c.try_into().unwrap()))).collect()
            }
            DataType::Fp32 => {
                d.chunks_exact(4).map(|c| float_json(f32::from_le_bytes(c.try_into().unwrap()).to_string())).collect()
            }
            dt if dt.is_float() => self.to_f64().into_iter().map(|v| float_json(v.to_string())).collect(),
            _ => self.to_f64().into_iter().map(|v| Value::from(v as i64)).collect(),
        }
    }

    /// Encodes JSON values (already flattened) as elements of `datatype`.
    pub fn encode_json(datatype: DataType, values: &[serde_json::Value]) -> Result<Vec<u8>, ElementError> {
        let size = datatype.size().ok_or(ElementError::Bytes)?;
        let mut out = Vec::with_capacity(values.len() * size);
        for (index, v) in values.iter().enumerate() {
            encode_one(datatype, index, v, &mut out)?;
        }
        Ok(out)
    }
}

/// A float as JSON; non-finite values (which JSON cannot carry) become null.
fn float_json(repr: String) -> serde_json::Value {
    match repr.parse::<f64>() {
        Ok(v) if v.is_finite() => {
            serde_json::Number::from_f64(v).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
        }
        _ => serde_json::Value::Null,
    }
}

/// Appends one JSON element (the `index`-th of its tensor) to `out` as `dt`, little-endian.
pub(crate) fn encode_one(
    dt: DataType,
    index: usize,
    v: &serde_json::Value,
    out: &mut Vec<u8>,
) -> Result<(), ElementError> {
    let type_err = |expected: &'static str| ElementError::Type { index, expected, got: describe(v) };
    let range_err = || ElementError::Range { index, value: v.to_string(), datatype: dt };
    if dt == DataType::Bool {
        let b = v.as_bool().ok_or_else(|| type_err("true or false"))?;
        out.push(b as u8);
        return Ok(());
    }
    if dt.is_float() {
        let f = v.as_f64().ok_or_else(|| type_err("a number"))?;
        match dt {
            DataType::Fp16 => {
                let h = half::f16::from_f64(f);
                if h.is_infinite() {
                    return Err(range_err());
                }
                out.extend(h.to_le_bytes());
            }
            DataType::Fp32 => {
                let s = f as f32;
                if s.is_infinite() {
                    return Err(range_err());
                }
                out.extend(s.to_le_bytes());
            }
            _ => out.extend(f.to_le_bytes()),
        }
        return Ok(());
    }
    // Integers: accept only JSON integers, checked against the type's range.
    let n: i128 = if let Some(i) = v.as_i64() {
        i as i128
    } else if let Some(u) = v.as_u64() {
        u as i128
    } else {
        return Err(type_err("an integer"));
    };
    macro_rules! put {
        ($t:ty) => {{
            let x = <$t>::try_from(n).map_err(|_| range_err())?;
            out.extend(x.to_le_bytes());
        }};
    }
    match dt {
        DataType::Uint8 => put!(u8),
        DataType::Int8 => put!(i8),
        DataType::Uint16 => put!(u16),
        DataType::Int16 => put!(i16),
        DataType::Uint32 => put!(u32),
        DataType::Int32 => put!(i32),
        DataType::Uint64 => put!(u64),
        DataType::Int64 => put!(i64),
        _ => unreachable!("floats, bools and bytes handled above"),
    }
    Ok(())
}

fn describe(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null".into(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(_) => "a string".into(),
        serde_json::Value::Array(_) => "an array".into(),
        serde_json::Value::Object(_) => "an object".into(),
    }
}

/// Largest absolute difference between two tensors; infinite when shapes differ or a value is NaN.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.shape != b.shape {
        return f64::INFINITY;
    }
    a.to_f64()
        .iter()
        .zip(b.to_f64())
        .map(|(x, y)| if x.is_nan() || y.is_nan() { f64::INFINITY } else { (x - y).abs() })
        .fold(0.0, f64::max)
}

/// A tensor as a V2 JSON tensor object ([`Tensor::json_object`]); fields in the order a JSON
/// object's keys sort in.
#[derive(Serialize)]
pub struct TensorJson<'a> {
    data: JsonData<'a>,
    datatype: DataType,
    name: &'a str,
    shape: &'a [usize],
}

/// A tensor's elements as the V2 JSON `data` array ([`Tensor::json_data`]).
pub struct JsonData<'a>(&'a Tensor);

impl Serialize for JsonData<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let t = self.0;
        let mut seq = serializer.serialize_seq(Some(t.len()))?;
        macro_rules! each {
            ($t:ty, $n:expr, $as:ty) => {
                for c in t.data.chunks_exact($n) {
                    seq.serialize_element(&(<$t>::from_le_bytes(c.try_into().expect("element bytes")) as $as))?;
                }
            };
        }
        match t.datatype {
            DataType::Bool => t.data.iter().try_for_each(|&b| seq.serialize_element(&(b != 0)))?,
            DataType::Uint8 => each!(u8, 1, u64),
            DataType::Int8 => each!(i8, 1, i64),
            DataType::Uint16 => each!(u16, 2, u64),
            DataType::Int16 => each!(i16, 2, i64),
            DataType::Uint32 => each!(u32, 4, u64),
            DataType::Int32 => each!(i32, 4, i64),
            DataType::Uint64 => each!(u64, 8, u64),
            DataType::Int64 => each!(i64, 8, i64),
            DataType::Fp16 => {
                for c in t.data.chunks_exact(2) {
                    seq.serialize_element(&half::f16::from_le_bytes([c[0], c[1]]).to_f64())?;
                }
            }
            // serde_json writes an f32 in its shortest form and a non-finite float as null.
            DataType::Fp32 => each!(f32, 4, f32),
            DataType::Fp64 => each!(f64, 8, f64),
            DataType::Bytes => {}
        }
        seq.end()
    }
}

/// Index of the first `N`-byte element of `data` that fails `ok`. Each block is tested whole, with
/// no early exit (a loop the compiler vectorises), and searched only when it holds a failure.
fn first_failing<const N: usize>(data: &[u8], ok: impl Fn([u8; N]) -> bool) -> Option<usize> {
    const BLOCK: usize = 256;
    let ok = |c: &[u8]| ok(c.try_into().expect("chunks of N bytes"));
    data.chunks(N * BLOCK).enumerate().find_map(|(i, block)| {
        let mut elements = block.chunks_exact(N);
        if elements.clone().fold(true, |all, c| all & ok(c)) {
            return None;
        }
        elements.position(|c| !ok(c)).map(|j| i * BLOCK + j)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn first_rows_takes_whole_rows() {
        let t = Tensor::from_f32("x", vec![3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(t.first_rows(2).unwrap(), Tensor::from_f32("x", vec![2, 2], &[1.0, 2.0, 3.0, 4.0]));
        assert_eq!(t.first_rows(3).unwrap(), t);
        assert_eq!(t.first_rows(4), None);
        assert_eq!(Tensor::from_f32("s", vec![], &[1.0]).first_rows(1), None);
    }

    #[test]
    fn json_round_trips_every_numeric_type() {
        let values = [json!(0), json!(1), json!(7)];
        for dt in DataType::ALL {
            if dt == DataType::Bytes || dt == DataType::Bool {
                continue;
            }
            let data = Tensor::encode_json(dt, &values).unwrap();
            let t = Tensor { name: "x".into(), datatype: dt, shape: vec![3], data };
            assert_eq!(t.to_f64(), vec![0.0, 1.0, 7.0], "{dt}");
            assert_eq!(t.len(), 3);
        }
    }

    #[test]
    fn out_of_range_integers_are_refused_with_the_index() {
        let err = Tensor::encode_json(DataType::Int8, &[json!(1), json!(300)]).unwrap_err();
        assert_eq!(err.to_string(), "element 1: 300 is out of range for INT8");
        let err = Tensor::encode_json(DataType::Uint8, &[json!(-1)]).unwrap_err();
        assert!(matches!(err, ElementError::Range { index: 0, .. }));
    }

    #[test]
    fn floats_reject_strings_and_overflow() {
        let err = Tensor::encode_json(DataType::Fp32, &[json!("1.0")]).unwrap_err();
        assert_eq!(err.to_string(), "element 0: expected a number, got a string");
        assert!(Tensor::encode_json(DataType::Fp32, &[json!(1e300)]).is_err());
        assert!(Tensor::encode_json(DataType::Fp16, &[json!(1e6)]).is_err());
    }

    #[test]
    fn fp32_prints_shortest_form() {
        let t = Tensor::from_f32("p", vec![2], &[0.1, 1.0]);
        assert_eq!(serde_json::to_string(&t.to_json()).unwrap(), "[0.1,1.0]");
    }

    /// The texts are what the elements printed as before `json_data`, when every response was built
    /// from `to_json`; the two must go on writing the same.
    #[test]
    fn json_data_writes_each_type_as_json_numbers() {
        let f32s = [0.1, 1.0, -0.0, f32::NAN, f32::INFINITY, 1e-45, 1e20, f32::MAX, 16_777_216.0, -2.5e-7];
        let cases: Vec<(Tensor, &str)> = vec![
            (
                Tensor::from_f32("p", vec![10], &f32s),
                "[0.1,1.0,-0.0,null,null,1e-45,1e+20,3.4028235e+38,16777216.0,-2.5e-7]",
            ),
            (
                bytes_of(DataType::Fp64, [0.1f64, f64::NEG_INFINITY, 1e300].iter().flat_map(|v| v.to_le_bytes())),
                "[0.1,null,1e+300]",
            ),
            (
                bytes_of(
                    DataType::Fp16,
                    [0.1f32, 65504.0, f32::NAN].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()),
                ),
                "[0.0999755859375,65504.0,null]",
            ),
            (bytes_of(DataType::Bool, [0u8, 1, 2]), "[false,true,true]"),
            (bytes_of(DataType::Uint8, [0u8, 255]), "[0,255]"),
            (bytes_of(DataType::Int8, [0x80u8, 0x7f]), "[-128,127]"),
            (bytes_of(DataType::Int16, i16::MIN.to_le_bytes()), "[-32768]"),
            (bytes_of(DataType::Uint16, u16::MAX.to_le_bytes()), "[65535]"),
            (bytes_of(DataType::Int32, i32::MIN.to_le_bytes()), "[-2147483648]"),
            (bytes_of(DataType::Uint32, u32::MAX.to_le_bytes()), "[4294967295]"),
            (bytes_of(DataType::Int64, i64::MIN.to_le_bytes()), "[-9223372036854775808]"),
            (bytes_of(DataType::Uint64, u64::MAX.to_le_bytes()), "[18446744073709551615]"),
            (bytes_of(DataType::Bytes, *b"abc"), "[]"),
        ];
        for (t, want) in cases {
            assert_eq!(serde_json::to_string(&t.json_data()).unwrap(), want, "{:?}", t.datatype);
            assert_eq!(serde_json::to_string(&t.to_json()).unwrap(), want, "{:?}", t.datatype);
        }
    }

    fn bytes_of(datatype: DataType, data: impl IntoIterator<Item = u8>) -> Tensor {
        let data: Vec<u8> = data.into_iter().collect();
        Tensor { name: "p".into(), datatype, shape: vec![data.len() / datatype.size().unwrap_or(data.len())], data }
    }

    #[test]
    fn non_finite_is_found() {
        let t = Tensor::from_f32("p", vec![3], &[0.0, f32::NAN, 1.0]);
        assert_eq!(t.first_non_finite(), Some(1));
        assert_eq!(Tensor::from_f32("p", vec![1], &[2.0]).first_non_finite(), None);
    }

    #[test]
    fn non_finite_is_found_at_every_place_in_every_float_type() {
        // Either side of the scan's 256-element blocks, the last element of a partial block, and
        // the first of two.
        let len = 256 * 3 + 17;
        for at in [0, 1, 255, 256, 257, 511, 512, 767, 768, len - 1] {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let mut values = vec![1.5e4; len];
                values[at] = bad;
                values[len - 1] = if at == len - 1 { bad } else { f64::NAN };
                let tensors = [
                    Tensor::from_f32("p", vec![len], &values.iter().map(|&v| v as f32).collect::<Vec<_>>()),
                    Tensor {
                        datatype: DataType::Fp64,
                        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        ..Tensor::from_f32("p", vec![len], &[])
                    },
                    Tensor {
                        datatype: DataType::Fp16,
                        data: values.iter().flat_map(|&v| half::f16::from_f64(v).to_le_bytes()).collect(),
                        ..Tensor::from_f32("p", vec![len], &[])
                    },
                ];
                for t in &tensors {
                    assert_eq!(t.first_non_finite(), Some(at), "{:?} {bad} at {at}", t.datatype);
                    let by_value = t.to_f64().iter().position(|v| !v.is_finite());
                    assert_eq!(t.first_non_finite(), by_value, "{:?}", t.datatype);
                }
            }
        }
        // Finite everywhere, the largest finite values included; integers are never non-finite.
        let finite = Tensor::from_f32("p", vec![1000], &[f32::MAX; 1000]);
        assert_eq!(finite.first_non_finite(), None);
        let bytes = Tensor { datatype: DataType::Uint8, data: vec![0xff; 1000], ..finite.clone() };
        assert_eq!(bytes.first_non_finite(), None);
        assert_eq!(Tensor::from_f32("p", vec![0], &[]).first_non_finite(), None);
    }

    #[test]
    fn bools_must_be_booleans() {
        assert_eq!(Tensor::encode_json(DataType::Bool, &[json!(true), json!(false)]).unwrap(), vec![1, 0]);
        assert!(Tensor::encode_json(DataType::Bool, &[json!(1)]).is_err());
    }
}
