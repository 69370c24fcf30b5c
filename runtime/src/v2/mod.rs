//! The KServe V2 (Open Inference Protocol) wire format, with Triton's binary tensor extension:
//! parsing and binding a request ([`request`]), and a client's side ([`client`]). No HTTP server
//! here: the handlers are in [`crate::http`].

pub mod client;
mod elements;
mod raw;
pub mod request;
mod scan;
#[cfg(test)]
mod scan_tests;

/// The binary tensor extension's header: length of the JSON part of the body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// A request that does not follow the protocol or does not fit the model: the message says how
/// (an HTTP server answers it with 400).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);
