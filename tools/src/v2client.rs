//! V2 requests and responses for `outpostctl` and the tests: the runtime's client side, read
//! from a [`Reply`].

use outpost_runtime::tensor::Tensor;
use outpost_runtime::v2::HEADER_LENGTH;
pub use outpost_runtime::v2::client::{Body, binary_request, json_request};

use crate::http::Reply;

/// The outputs of a successful response, JSON or binary.
pub fn outputs(reply: &Reply) -> Result<Vec<Tensor>, String> {
    let header_len = reply.headers.get(HEADER_LENGTH).map(|v| v.to_str().unwrap_or("?"));
    outpost_runtime::v2::client::parse_response(header_len, &reply.body).map(|(_, outputs)| outputs)
}
