//! A V2 request's JSON as read, before its inputs become tensors: what [`super::scan`] and serde
//! ([`read`]) both produce for [`super::request`] to finish.

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::BadRequest;
use super::elements::{self, DataError};
use crate::tensor::DataType;

/// The request's members; its inputs not yet tensors.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRequest<'a> {
    pub(super) id: Option<String>,
    #[serde(default)]
    pub(super) parameters: Map<String, Value>,
    #[serde(borrow)]
    pub(super) inputs: Vec<RawInput<'a>>,
    pub(super) outputs: Option<Vec<RawOutput>>,
}

pub(super) struct RawInput<'a> {
    pub(super) name: String,
    pub(super) shape: Vec<i64>,
    pub(super) datatype: String,
    pub(super) parameters: Map<String, Value>,
    pub(super) data: Option<RawData<'a>>,
}

/// An input's JSON `data`: decoded as it was read, where `datatype` and `shape` came before it
/// (as clients write them), or else left as text until they are known.
pub(super) enum RawData<'a> {
    Decoded(Result<Vec<u8>, DataError>),
    Text(&'a RawValue),
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum InputField {
    Name,
    Shape,
    Datatype,
    Parameters,
    Data,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawInput<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const FIELDS: &[&str] = &["name", "shape", "datatype", "parameters", "data"];
        deserializer.deserialize_struct("RawInput", FIELDS, InputVisitor(std::marker::PhantomData))
    }
}

struct InputVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for InputVisitor<'a> {
    type Value = RawInput<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an input tensor")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawInput<'a>, A::Error> {
        let (mut name, mut shape, mut datatype, mut parameters, mut data) = (None, None, None, None, None);
        fn once<T, E: serde::de::Error>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), E> {
            match slot.replace(value) {
                Some(_) => Err(E::duplicate_field(field)),
                None => Ok(()),
            }
        }
        while let Some(field) = map.next_key::<InputField>()? {
            match field {
                InputField::Name => once(&mut name, "name", map.next_value::<String>()?)?,
                InputField::Shape => once(&mut shape, "shape", map.next_value::<Vec<i64>>()?)?,
                InputField::Datatype => once(&mut datatype, "datatype", map.next_value::<String>()?)?,
                InputField::Parameters => once(&mut parameters, "parameters", map.next_value::<Map<String, Value>>()?)?,
                InputField::Data => {
                    if data.is_some() {
                        return Err(serde::de::Error::duplicate_field("data"));
                    }
                    let known = datatype.as_deref().and_then(DataType::parse).filter(|&d| d != DataType::Bytes);
                    let elements = shape.as_deref().and_then(elements_of);
                    data = Some(match (known, elements) {
                        // Not reserved for: the text's length is not known here.
                        (Some(datatype), Some(expected)) => {
                            RawData::Decoded(map.next_value_seed(elements::Data { datatype, expected, capacity: 0 })?)
                        }
                        _ => RawData::Text(map.next_value::<&RawValue>()?),
                    });
                }
            }
        }
        Ok(RawInput {
            name: name.ok_or_else(|| serde::de::Error::missing_field("name"))?,
            shape: shape.ok_or_else(|| serde::de::Error::missing_field("shape"))?,
            datatype: datatype.ok_or_else(|| serde::de::Error::missing_field("datatype"))?,
            parameters: parameters.unwrap_or_default(),
            data,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutput {
    pub(super) name: String,
    #[serde(default)]
    pub(super) parameters: Map<String, Value>,
}

/// The request's JSON read by serde: every body [`super::scan::request`] does not take.
pub(super) fn read(json: &[u8]) -> Result<RawRequest<'_>, BadRequest> {
    serde_json::from_slice(json).map_err(|e| BadRequest(format!("malformed request JSON: {e}")))
}

/// The elements a shape as the client wrote it holds, if every dimension is non-negative and the
/// product fits ([`crate::tensor::Tensor::shape_elements`] of the same shape checked).
pub(super) fn elements_of(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
}
