//! The bots' HTTP client: one keep-alive connection pool to the target, shared by every
//! user of the process (a million users must not mean a million connection pools), and
//! the classification of what went wrong on the wire.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Uri, header::CONTENT_TYPE, header::COOKIE};
use http_body_util::{BodyExt, Full, Limited};

use super::request::RenderedRequest;
use crate::http_client::{ConnectionPool, error_chain};

/// Response bodies are read up to this size; a bigger body is a transport failure
/// (a scenario that needs more is downloading, not shopping).
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// The client every user shares: connections to the target's one address.
#[derive(Debug, Clone)]
pub struct BotClient {
    pool: Arc<ConnectionPool>,
    /// The target's authority as its URL spells it; a request whose URI names another
    /// is refused, so that a rendered path cannot send traffic elsewhere.
    authority: String,
    connect_timeout: Duration,
}

impl BotClient {
    /// A client for the target at `authority` (`host[:port]` as in its URL) that
    /// connects to `address` (`host:port`), giving up on a connect after
    /// `connect_timeout`. Every connection a user opens is kept for the next user:
    /// there is no cap on idle ones.
    pub fn new(authority: &str, address: &str, connect_timeout: Duration) -> Self {
        Self {
            pool: ConnectionPool::new(address, usize::MAX),
            authority: authority.to_owned(),
            connect_timeout,
        }
    }
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
    /// The rendered path moved the URI off the target.
    #[error("{uri} names another host than the target {target}")]
    OtherHost {
        /// What was built.
        uri: String,
        /// The target's `host[:port]`.
        target: String,
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
    if uri.authority().map(|a| a.as_str()) != Some(client.authority.as_str()) {
        return Err(SendError::OtherHost {
            uri: uri_text(),
            target: client.authority.clone(),
        });
    }
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
        let response = client
            .pool
            .send(request, client.connect_timeout)
            .await
            .map_err(|e| {
                if e.is_connect() {
                    SendError::Connect {
                        uri: uri_text(),
                        message: error_chain(&e),
                    }
                } else {
                    SendError::Transport {
                        uri: uri_text(),
                        message: error_chain(&e),
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

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;

    #[tokio::test]
    async fn a_rendered_path_cannot_send_a_request_to_another_host() {
        let client = BotClient::new("127.0.0.1:1", "127.0.0.1:1", Duration::from_secs(1));
        // What `{base}{path}` gives for a path of `@evil.example/x`.
        let uri: Uri = "http://127.0.0.1:1@evil.example/x".parse().expect("a URI");
        let request = RenderedRequest {
            method: Method::GET,
            path: "@evil.example/x".to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
            content_type: None,
        };
        let error = send(&client, uri, request, None, Duration::from_secs(1))
            .await
            .expect_err("refused before any connect");
        assert!(
            matches!(&error, SendError::OtherHost { target, .. } if target == "127.0.0.1:1"),
            "{error:?}"
        );
    }
}
