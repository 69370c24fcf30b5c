//! A request's JSON `data`, streamed straight into the tensor's bytes: nested arrays flattened
//! in row-major order, each element encoded as it is read. Nothing is kept per element but its
//! encoded bytes, so a JSON body costs at most its own size plus the tensor it holds (where a
//! parsed JSON tree costs tens of bytes per number).

use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::tensor::{DataType, ElementError, encode_one};

/// Why a `data` array could not become a tensor of the shape given.
#[derive(Debug)]
pub enum DataError {
    /// Not an array at the top.
    NotAnArray,
    /// The shape holds `expected` elements, the array `found`.
    Count { expected: usize, found: usize },
    /// An element of the wrong type or out of the datatype's range.
    Element(ElementError),
    /// Not JSON the parser accepts (nesting too deep).
    Json(String),
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::NotAnArray => f.write_str("must be an array"),
            DataError::Count { expected, found } => write!(f, "holds {found} elements but the shape holds {expected}"),
            DataError::Element(e) => e.fmt(f),
            DataError::Json(e) => f.write_str(e),
        }
    }
}

/// Encodes `data` (an array, nested or flat) as `expected` elements of `datatype`. The element
/// count is checked before the elements' types, as a client reads its mistakes: a wrong count
/// is reported even when an element is also wrong. Encoding stops at `expected` elements (the
/// rest are only counted), so the output never grows past what the shape holds.
pub fn decode(data: &RawValue, datatype: DataType, expected: usize) -> Result<Vec<u8>, DataError> {
    let mut de = serde_json::Deserializer::from_str(data.get());
    Data { datatype, expected, capacity: data.get().len() / 2 + 1 }
        .deserialize(&mut de)
        .map_err(|e| DataError::Json(e.to_string()))?
}

/// [`decode`] as a seed, for a parser that reaches `data` already knowing its datatype and
/// shape: the elements are encoded as the request is read, in the same pass. The parser's own
/// error is a malformed document; the inner result is what [`decode`] says of the array.
pub struct Data {
    pub datatype: DataType,
    pub expected: usize,
    /// The most elements the text can hold, an upper bound to reserve for (each element takes at
    /// least two bytes of JSON): the shape alone is only the client's claim.
    pub capacity: usize,
}

impl<'de> DeserializeSeed<'de> for Data {
    type Value = Result<Vec<u8>, DataError>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let size = self.datatype.size().unwrap_or(1);
        let reserve = self.expected.min(self.capacity).saturating_mul(size);
        let mut sink = Sink {
            datatype: self.datatype,
            expected: self.expected,
            out: Vec::with_capacity(reserve),
            count: 0,
            error: None,
            not_an_array: false,
        };
        Level { sink: &mut sink, top: true }.deserialize(deserializer)?;
        Ok(if sink.not_an_array {
            Err(DataError::NotAnArray)
        } else if sink.count != self.expected {
            Err(DataError::Count { expected: self.expected, found: sink.count })
        } else if let Some(e) = sink.error {
            Err(DataError::Element(e))
        } else {
            Ok(sink.out)
        })
    }
}

struct Sink {
    datatype: DataType,
    expected: usize,
    out: Vec<u8>,
    count: usize,
    /// The first bad element; later ones are only counted.
    error: Option<ElementError>,
    /// `data` itself was not an array.
    not_an_array: bool,
}

impl Sink {
    fn push(&mut self, v: Value) {
        if self.count < self.expected
            && self.error.is_none()
            && let Err(e) = encode_one(self.datatype, self.count, &v, &mut self.out)
        {
            self.error = Some(e);
        }
        self.count += 1;
    }

    /// A number for a FP32 or FP64 tensor, encoded as [`encode_one`] does but without building a
    /// JSON value first: the common case, per element. False where it is not that case (another
    /// datatype, past the shape, after a bad element, or out of FP32's range), for [`Sink::push`].
    fn float(&mut self, f: f64) -> bool {
        if self.count >= self.expected || self.error.is_some() || !encode_float(self.datatype, f, &mut self.out) {
            return false;
        }
        self.count += 1;
        true
    }
}

/// A number's bytes in a FP32 or FP64 tensor, as [`encode_one`] writes them; false (nothing
/// written) for another datatype or a value out of FP32's range, which [`encode_one`] reports.
pub(super) fn encode_float(datatype: DataType, f: f64, out: &mut Vec<u8>) -> bool {
    match datatype {
        DataType::Fp32 if !(f as f32).is_infinite() => out.extend((f as f32).to_le_bytes()),
        DataType::Fp64 => out.extend(f.to_le_bytes()),
        _ => return false,
    }
    true
}

/// One array level (or one element of it); `top` for `data` itself, which must be an array.
struct Level<'s> {
    sink: &'s mut Sink,
    top: bool,
}

impl Level<'_> {
    fn element(self, v: Value) {
        if self.top {
            self.sink.not_an_array = true;
        } else {
            self.sink.push(v);
        }
    }

    /// A number: straight to a float tensor's bytes where it can be, else as [`Level::element`].
    fn number(self, f: f64, v: impl FnOnce() -> Value) {
        if self.top || !self.sink.float(f) {
            self.element(v());
        }
    }
}

impl<'de> DeserializeSeed<'de> for Level<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Level<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Level { sink: &mut *self.sink, top: false })?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.element(Value::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.number(v as f64, || Value::from(v));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.number(v as f64, || Value::from(v));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.number(v, || serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number));
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        self.element(Value::String(String::new()));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.element(Value::Null);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.element(Value::Object(serde_json::Map::new()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.into()).unwrap()
    }

    #[test]
    fn nested_and_flat_arrays_give_the_same_bytes() {
        let flat = decode(&raw("[1, 2.5, -3, 4]"), DataType::Fp32, 4).unwrap();
        let nested = decode(&raw("[[1, 2.5], [-3, 4]]"), DataType::Fp32, 4).unwrap();
        assert_eq!(flat, nested);
        let want: Vec<u8> = [1.0f32, 2.5, -3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(flat, want);
        assert_eq!(decode(&raw("[true, false]"), DataType::Bool, 2).unwrap(), vec![1, 0]);
        assert_eq!(decode(&raw("[-1, 300]"), DataType::Int16, 2).unwrap(), [-1i16, 300].map(i16::to_le_bytes).concat());
    }

    #[test]
    fn errors_name_the_count_first_then_the_element() {
        let e = |text: &str, dt, n| decode(&raw(text), dt, n).unwrap_err().to_string();
        assert_eq!(e("5", DataType::Fp32, 1), "must be an array");
        assert_eq!(e("[1, 2, 3]", DataType::Fp32, 2), "holds 3 elements but the shape holds 2");
        assert_eq!(e("[1, \"x\", null]", DataType::Fp32, 2), "holds 3 elements but the shape holds 2");
        assert_eq!(e("[1, \"x\"]", DataType::Fp32, 2), "element 1: expected a number, got a string");
        assert_eq!(e("[1, {\"a\": 1}]", DataType::Fp32, 2), "element 1: expected a number, got an object");
        assert_eq!(e("[1, null]", DataType::Fp32, 2), "element 1: expected a number, got null");
        assert_eq!(e("[1, 1.5]", DataType::Int32, 2), "element 1: expected an integer, got 1.5");
        assert_eq!(e("[1, 300]", DataType::Int8, 2), "element 1: 300 is out of range for INT8");
    }

    #[test]
    fn floats_encode_as_json_values_do() {
        // FP32 and FP64 elements skip the JSON value (Sink::float); the bytes and errors are
        // those of encode_one, which the other datatypes still go through.
        let text = "[0, -1, 18446744073709551615, -9223372036854775808, 0.1, -2.5e-40, 3.4028234e38, 1e-300, 0.14552277326583862]";
        let values: Vec<Value> = serde_json::from_str(text).unwrap();
        for dt in [DataType::Fp32, DataType::Fp64, DataType::Fp16] {
            assert_eq!(
                decode(&raw(text), dt, values.len()).ok(),
                crate::tensor::Tensor::encode_json(dt, &values).ok(),
                "{dt}"
            );
        }
        let e = |text: &str, dt| decode(&raw(text), dt, 2).unwrap_err().to_string();
        assert_eq!(e("[1, 1e39]", DataType::Fp32), "element 1: 1e+39 is out of range for FP32");
        assert_eq!(e("[1e39, null]", DataType::Fp32), "element 0: 1e+39 is out of range for FP32");
        assert_eq!(decode(&raw("[1, 1e39]"), DataType::Fp64, 2).unwrap(), [1f64, 1e39].map(f64::to_le_bytes).concat());
    }

    #[test]
    fn output_stops_growing_at_the_shape() {
        // A million elements where the shape holds two: counted, not kept.
        let text = format!("[{}]", vec!["1"; 1_000_000].join(","));
        let err = decode(&raw(&text), DataType::Fp64, 2).unwrap_err();
        assert_eq!(err.to_string(), "holds 1000000 elements but the shape holds 2");
        let mut sink =
            Sink { datatype: DataType::Fp64, expected: 2, out: Vec::new(), count: 0, error: None, not_an_array: false };
        Level { sink: &mut sink, top: true }.deserialize(&mut serde_json::Deserializer::from_str(&text)).unwrap();
        assert_eq!((sink.count, sink.out.len()), (1_000_000, 16));
    }
}
