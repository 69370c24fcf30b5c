//! Calls to the central model over KServe V2: the same inputs, as binary tensors, on pooled
//! keep-alive connections, with a timeout, a cap on calls in flight and a circuit breaker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::http::{Request, StatusCode, header};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use super::breaker::Breaker;
use crate::config::Escalation;
use crate::tensor::Tensor;
use crate::v2::{HEADER_LENGTH, client};

/// Largest central response read.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Why a central call gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum CentralError {
    #[error("circuit breaker open after repeated central failures")]
    BreakerOpen,
    #[error("{0} central calls already in flight")]
    Busy(usize),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the central: {0}")]
    Connect(String),
    #[error("the central answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("the central's answer is unusable: {0}")]
    BadResponse(String),
}

impl CentralError {
    /// A short name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            CentralError::BreakerOpen => "breaker_open",
            CentralError::Busy(_) => "busy",
            CentralError::Timeout(_) => "timeout",
            CentralError::Connect(_) => "connect",
            CentralError::Status { .. } => "status",
            CentralError::BadResponse(_) => "bad_response",
        }
    }

    /// Whether the failure says something about the central's health (and counts for the breaker).
    fn counts_for_breaker(&self) -> bool {
        !matches!(self, CentralError::BreakerOpen | CentralError::Busy(_))
    }
}

/// A central model endpoint.
pub struct Central {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    scheme: &'static str,
    config: Escalation,
    in_flight: Arc<Semaphore>,
    pub breaker: Breaker,
}

/// A central answer.
pub struct CentralAnswer {
    pub outputs: Vec<Tensor>,
    pub bytes_sent: usize,
    pub latency: Duration,
}

impl Central {
    /// A client for the configured central; fails when the CA file cannot be read.
    pub fn new(config: &Escalation) -> std::io::Result<Central> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        http.enforce_http(false);
        let tls = outpost_updater::tls::client_config(config.central_tls_ca.as_deref())?;
        let connector =
            HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        Ok(Central {
            client,
            scheme: if config.central_tls_ca.is_some() { "https" } else { "http" },
            in_flight: Arc::new(Semaphore::new(config.max_concurrency)),
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown),
            config: config.clone(),
        })
    }

    fn uri(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.config.central_authority)
    }

    /// Runs `inputs` on the central model.
    pub async fn infer(&self, inputs: &[Tensor]) -> Result<CentralAnswer, CentralError> {
        if !self.breaker.allow() {
            return Err(CentralError::BreakerOpen);
        }
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            return Err(CentralError::Busy(self.config.max_concurrency));
        };
        let path = match &self.config.central_version {
            Some(v) => format!("/v2/models/{}/versions/{v}/infer", self.config.central_model),
            None => format!("/v2/models/{}/infer", self.config.central_model),
        };
        let body = client::binary_request(inputs);
        let bytes_sent = body.bytes.len();
        let started = Instant::now();
        let result = tokio::time::timeout(self.config.timeout, self.post(&path, body)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(CentralError::Timeout(self.config.timeout)),
        };
        match &result {
            Ok(_) => self.breaker.success(),
            Err(e) if e.counts_for_breaker() => self.breaker.failure(),
            Err(_) => {}
        }
        result.map(|outputs| CentralAnswer { outputs, bytes_sent, latency: started.elapsed() })
    }

    async fn post(&self, path: &str, body: client::Body) -> Result<Vec<Tensor>, CentralError> {
        let (status, header_len, bytes) = self.send(path, body.headers, body.bytes).await?;
        if status != StatusCode::OK {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned());
            return Err(CentralError::Status { status: status.as_u16(), message });
        }
        client::parse_response(header_len.as_deref(), &bytes)
            .map(|(_, outputs)| outputs)
            .map_err(CentralError::BadResponse)
    }

    /// Uploads one hard example to the central's `/v2/hard-examples`.
    pub async fn upload_hard_example(&self, example: Vec<u8>) -> Result<(), CentralError> {
        let headers = vec![("content-type", "application/json".to_string())];
        let sent =
            tokio::time::timeout(self.config.timeout * 4, self.send("/v2/hard-examples", headers, example)).await;
        let (status, _, bytes) = sent.map_err(|_| CentralError::Timeout(self.config.timeout * 4))??;
        if status.is_success() {
            Ok(())
        } else {
            Err(CentralError::Status { status: status.as_u16(), message: String::from_utf8_lossy(&bytes).into_owned() })
        }
    }

    async fn send(
        &self,
        path: &str,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Option<String>, Bytes), CentralError> {
        let mut req = Request::post(self.uri(path));
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Some(token) = &self.config.central_token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(|e| CentralError::Connect(e.to_string()))?;
        let resp = self.client.request(req).await.map_err(|e| {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg = format!("{msg}: {s}");
                source = s.source();
            }
            CentralError::Connect(msg)
        })?;
        let status = resp.status();
        let header_len = resp.headers().get(HEADER_LENGTH).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let limited = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES);
        let bytes = limited.collect().await.map_err(|e| CentralError::BadResponse(e.to_string()))?.to_bytes();
        Ok((status, header_len, bytes))
    }
}
