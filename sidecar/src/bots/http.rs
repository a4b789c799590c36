//! The bots' HTTP client: one pooled keep-alive hyper-util client shared by every user
//! of the process (a million users must not mean a million connection pools), and the
//! classification of what went wrong on the wire.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Uri, header::CONTENT_TYPE, header::COOKIE};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{Client, connect::HttpConnector};

use super::request::RenderedRequest;

/// The client every user shares.
pub type BotClient = Client<HttpConnector, Full<Bytes>>;

/// Response bodies are read up to this size; a bigger body is a transport failure
/// (a scenario that needs more is downloading, not shopping).
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// A pooled client whose connects give up after `connect_timeout`.
pub fn client(connect_timeout: Duration) -> BotClient {
    crate::http_client::pooled(connect_timeout)
}

/// What came back.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// Why no response arrived.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The TCP connection could not be made.
    #[error("connect to {uri} failed: {message}")]
    Connect {
        /// The URI.
        uri: String,
        /// The cause.
        message: String,
    },
    /// No complete response within the timeout.
    #[error("no response from {uri} within {timeout:?}")]
    Timeout {
        /// The URI.
        uri: String,
        /// The limit.
        timeout: Duration,
    },
    /// The URI built from target and path is invalid.
    #[error("target URL + path {uri:?} is not a valid URI")]
    Uri {
        /// What was built.
        uri: String,
    },
    /// Reset, malformed response, oversized body.
    #[error("{uri}: {message}")]
    Transport {
        /// The URI.
        uri: String,
        /// The cause.
        message: String,
    },
}

/// Sends `req` to `uri` (the target's base + the request's path, see
/// [`super::request::CompiledRequest::uri`]) with the given cookie header, and reads the
/// whole body, all within `timeout`.
pub async fn send(
    client: &BotClient,
    uri: Uri,
    req: RenderedRequest,
    cookie: Option<HeaderValue>,
    timeout: Duration,
) -> Result<Response, SendError> {
    // Only errors name the URI: formatted then, not per request.
    let uri_text = || uri.to_string();
    let mut builder = Request::builder().method(req.method).uri(uri.clone());
    if let Some(headers) = builder.headers_mut() {
        for (name, value) in req.headers {
            headers.insert(name, value);
        }
        if let Some(ct) = req.content_type {
            headers
                .entry(CONTENT_TYPE)
                .or_insert(HeaderValue::from_static(ct));
        }
        if let Some(cookie) = cookie {
            headers.insert(COOKIE, cookie);
        }
    }
    let request = builder
        .body(Full::new(req.body))
        .map_err(|e| SendError::Transport {
            uri: uri_text(),
            message: e.to_string(),
        })?;
    // Boxed so that the (large) in-flight future lives on the heap only while a
    // request is in flight, not inside every idle user's task.
    let exchange = Box::pin(async {
        let response = client.request(request).await.map_err(|e| {
            if e.is_connect() {
                SendError::Connect {
                    uri: uri_text(),
                    message: crate::http_client::error_chain(&e),
                }
            } else {
                SendError::Transport {
                    uri: uri_text(),
                    message: crate::http_client::error_chain(&e),
                }
            }
        })?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| SendError::Transport {
                uri: uri_text(),
                message: format!("reading the body: {e}"),
            })?
            .to_bytes();
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    });
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(SendError::Timeout {
            uri: uri_text(),
            timeout,
        }),
    }
}
