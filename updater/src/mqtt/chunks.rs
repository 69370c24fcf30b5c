//! The chunk exchange: a device asks for `length` bytes at `offset` of an object (a blob or a
//! delta, named by its SHA-256); a blob server answers with the bytes, or an error.
//!
//! A request is a small JSON object. A reply is binary: a 2-byte big-endian header length, the
//! JSON header (id, object, offset, error), then the data, so chunks travel without base64.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Largest request a blob server reads.
pub const MAX_REQUEST_BYTES: usize = 1024;
/// Largest reply header.
pub const MAX_HEADER_BYTES: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRequest {
    pub id: u64,
    pub object: String,
    pub offset: u64,
    pub length: u32,
}

impl ChunkRequest {
    pub fn parse(bytes: &[u8]) -> Result<ChunkRequest, String> {
        if bytes.len() > MAX_REQUEST_BYTES {
            return Err(format!("request of {} bytes", bytes.len()));
        }
        let r: ChunkRequest = serde_json::from_slice(bytes).map_err(|e| format!("request: {e}"))?;
        if !crate::is_sha256_hex(&r.object) {
            return Err("request: object is not a SHA-256".into());
        }
        Ok(r)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a request serialises")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplyHeader {
    id: u64,
    object: String,
    offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A reply: the data asked for, or why the server cannot give it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkReply {
    pub id: u64,
    pub object: String,
    pub offset: u64,
    pub result: Result<Bytes, String>,
}

impl ChunkReply {
    pub fn encode(&self) -> Vec<u8> {
        let header = ReplyHeader {
            id: self.id,
            object: self.object.clone(),
            offset: self.offset,
            error: self.result.as_ref().err().map(|e| e.chars().take(200).collect()),
        };
        let h = serde_json::to_vec(&header).expect("a header serialises");
        let data: &[u8] = self.result.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(2 + h.len() + data.len());
        out.extend_from_slice(&(h.len() as u16).to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out
    }

    pub fn decode(bytes: Bytes) -> Result<ChunkReply, String> {
        if bytes.len() < 2 {
            return Err("reply shorter than its header length".into());
        }
        let n = u16::from_be_bytes([bytes[0], bytes[1]]) as usize;
        if n > MAX_HEADER_BYTES || bytes.len() < 2 + n {
            return Err(format!("reply header of {n} bytes"));
        }
        let h: ReplyHeader = serde_json::from_slice(&bytes[2..2 + n]).map_err(|e| format!("reply header: {e}"))?;
        let result = match h.error {
            Some(e) => Err(e),
            None => Ok(bytes.slice(2 + n..)),
        };
        Ok(ChunkReply { id: h.id, object: h.object, offset: h.offset, result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn replies_round_trip() {
        let ok =
            ChunkReply { id: 7, object: "a".repeat(64), offset: 65536, result: Ok(Bytes::from_static(b"\0\x01data")) };
        assert_eq!(ChunkReply::decode(ok.encode().into()).unwrap(), ok);
        let err = ChunkReply { id: 8, object: "b".repeat(64), offset: 0, result: Err("no such object".into()) };
        assert_eq!(ChunkReply::decode(err.encode().into()).unwrap(), err);
        let req = ChunkRequest { id: 1, object: "c".repeat(64), offset: 0, length: 1024 };
        assert_eq!(ChunkRequest::parse(&req.to_bytes()).unwrap(), req);
        assert!(ChunkRequest::parse(br#"{"id":1,"object":"../x","offset":0,"length":1}"#).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ChunkReply::decode(Bytes::from(bytes.clone()));
            let _ = ChunkRequest::parse(&bytes);
        }
    }
}
