//! The protobuf wire format, as far as the rewrite needs it: a message split into its fields
//! (each kept as the bytes it was), and new fields written beside them.

use prost::Message;
use prost::bytes::Buf;
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

/// One field of a protobuf message: its tag, its bytes as they stand (key included), and for a
/// length-delimited field, its payload.
#[derive(Clone, Copy)]
pub(crate) struct Field<'a> {
    pub tag: u32,
    pub raw: &'a [u8],
    pub payload: &'a [u8],
}

pub(crate) fn fields(mut buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let start = buf;
        let (tag, wire) = decode_key(&mut buf).map_err(|e| e.to_string())?;
        let payload: &[u8] = match wire {
            WireType::Varint => {
                decode_varint(&mut buf).map_err(|e| e.to_string())?;
                &[]
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let n = if wire == WireType::SixtyFourBit { 8 } else { 4 };
                if buf.len() < n {
                    return Err("truncated field".into());
                }
                buf.advance(n);
                &[]
            }
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut buf).map_err(|e| e.to_string())?)
                    .map_err(|_| "field too long".to_string())?;
                if buf.len() < len {
                    return Err("truncated field".into());
                }
                let payload = &buf[..len];
                buf.advance(len);
                payload
            }
            WireType::StartGroup | WireType::EndGroup => return Err("protobuf groups are not ONNX".into()),
        };
        let used = start.len() - buf.len();
        out.push(Field { tag, raw: &start[..used], payload });
    }
    Ok(out)
}

/// Writes `message` as field `tag` of the message being built in `out`.
pub(crate) fn put_message(out: &mut Vec<u8>, tag: u32, message: &impl Message) {
    put_bytes(out, tag, &message.encode_to_vec());
}

/// Writes `payload` (an encoded message) as field `tag`.
pub(crate) fn put_bytes(out: &mut Vec<u8>, tag: u32, payload: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// A `TensorProto` the rewrite adds: a small INT64 constant (a shape).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Constant {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
}

impl Constant {
    /// A 1-D INT64 tensor.
    pub fn int64s(name: String, values: Vec<i64>) -> Constant {
        Constant { dims: vec![values.len() as i64], data_type: 7, int64_data: values, name }
    }
}
