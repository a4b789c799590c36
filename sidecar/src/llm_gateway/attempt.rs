//! One attempt at one provider: the request fitted and translated for it, sent with its
//! key, and its answer up to the first byte (or whole), classified for failover.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use trimtab_api::{
    RetryOn,
    balancer_policy::{FittingStrategy, ProviderKind},
};

use super::{
    ANTHROPIC_VERSION, Failure, LlmGateway, MAX_RESPONSE_BYTES, humanize,
    request::{AppRequest, View},
    unix_now,
};
use crate::{
    http_client::error_chain,
    llm::{
        anthropic as an,
        decode::decode,
        fitting::{self, EvictionPlan},
        openai as oa,
        routing::Outcome,
        translate::{self, ErrorKind},
    },
};

/// How one attempt at a provider ended before anything reached the application.
pub(super) enum Attempt {
    /// A stream whose first chunk arrived.
    Stream {
        headers: HeaderMap,
        first: Bytes,
        body: Incoming,
        ttft: Duration,
    },
    /// A complete non-streamed answer.
    Whole {
        headers: HeaderMap,
        body: Bytes,
        ttft: Duration,
        total: Duration,
    },
    /// The provider failed; `failover` says whether the policy moves on.
    Failed {
        kind: ErrorKind,
        message: String,
        outcome: Outcome,
        failover: bool,
        label: &'static str,
    },
}

impl LlmGateway {
    /// The body to send to `provider`: the request fitted to its window and translated
    /// into its dialect, and the eviction plan when messages were removed.
    pub(super) fn prepare(
        &self,
        request: &AppRequest,
        views: &HashMap<fitting::Encoding, View>,
        provider: usize,
    ) -> Result<(Bytes, Option<EvictionPlan>), Failure> {
        let upstream = &self.upstreams[provider];
        let fitting_config = &self.config.context_fitting;
        let available = self.available(provider);
        let mut request = request.clone();
        let mut plan = None;
        if let Some(view) = self.view(views, provider)
            && view.total > available
        {
            if fitting_config.strategy == FittingStrategy::Reject {
                let e = fitting::FitError::TooLong {
                    needed: view.total,
                    available,
                };
                return Err((ErrorKind::InvalidRequest, e.to_string()));
            }
            let p = fitting::evict_by_priority(
                &view.messages,
                view.fixed,
                available,
                fitting_config.keep_last_turns,
            )
            .map_err(|e| (ErrorKind::InvalidRequest, e.to_string()))?;
            request.apply(&p, &view.messages);
            plan = Some(p);
        }
        let model = translate::model_for(&upstream.spec, request.model()).to_owned();
        let invalid = |e: translate::TranslateError| (ErrorKind::InvalidRequest, e.to_string());
        let json = match (request, upstream.spec.kind) {
            (AppRequest::Openai(mut r), ProviderKind::Openai) => {
                r.model = model;
                serde_json::to_vec(&r)
            }
            (AppRequest::Anthropic(mut r), ProviderKind::Anthropic) => {
                r.model = model;
                serde_json::to_vec(&r)
            }
            (AppRequest::Openai(r), ProviderKind::Anthropic) => {
                let default_max =
                    u32::try_from(fitting_config.reserve_output_tokens).unwrap_or(u32::MAX);
                serde_json::to_vec(
                    &translate::openai_to_anthropic_request(&r, &model, default_max)
                        .map_err(invalid)?,
                )
            }
            (AppRequest::Anthropic(r), ProviderKind::Openai) => serde_json::to_vec(
                &translate::anthropic_to_openai_request(&r, &model).map_err(invalid)?,
            ),
        }
        .map_err(|e| {
            (
                ErrorKind::ServerError,
                format!("the request does not serialize: {e}"),
            )
        })?;
        Ok((Bytes::from(json), plan))
    }

    /// Sends `body` to `provider` and waits for the first byte of the answer (within
    /// `firstByteTimeout`); a whole answer is read to its end.
    pub(super) async fn attempt(
        &self,
        provider: usize,
        body: Bytes,
        stream: bool,
        beta: Option<&HeaderValue>,
        started: Instant,
    ) -> Attempt {
        let upstream = &self.upstreams[provider];
        let failover_on = &self.config.failover.failover_on;
        let key = match upstream.key.get() {
            Ok(key) => key,
            Err(e) => {
                // A missing key is a configuration problem of this provider: the next
                // one may have its key.
                return Attempt::Failed {
                    kind: ErrorKind::Authentication,
                    message: e.to_string(),
                    // Nothing was sent: no verdict on the provider's health.
                    outcome: Outcome::Cancelled,
                    failover: true,
                    label: "no_key",
                };
            }
        };
        let mut builder = Request::post(upstream.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "trimtab-sidecar");
        if stream {
            builder = builder.header(header::ACCEPT, "text/event-stream");
        }
        match (upstream.spec.kind, &key) {
            (ProviderKind::Openai, Some(key)) => {
                builder = builder.header(header::AUTHORIZATION, format!("Bearer {}", key.expose()));
            }
            (ProviderKind::Anthropic, Some(key)) => {
                builder = builder.header("x-api-key", key.expose());
            }
            (_, None) => {}
        }
        if upstream.spec.kind == ProviderKind::Anthropic {
            builder = builder.header("anthropic-version", ANTHROPIC_VERSION);
            if let Some(beta) = beta {
                builder = builder.header("anthropic-beta", beta);
            }
        }
        let request = match builder.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Failed {
                    kind: ErrorKind::ServerError,
                    message: format!("the request to the provider cannot be built: {e}"),
                    outcome: Outcome::Rejected,
                    failover: false,
                    label: "rejected",
                };
            }
        };
        let first_byte_timeout = if stream {
            self.config.failover.first_byte_timeout.get()
        } else {
            self.config
                .failover
                .first_byte_timeout
                .get()
                .max(self.request_timeout)
        };
        let deadline = tokio::time::Instant::from_std(started + first_byte_timeout);
        let timed_out = || Attempt::Failed {
            kind: ErrorKind::Timeout,
            message: format!(
                "no first byte within failover.firstByteTimeout {}",
                humanize(first_byte_timeout)
            ),
            outcome: Outcome::Failed,
            failover: failover_on.contains(&RetryOn::Timeout),
            label: "timeout",
        };
        let response = match tokio::time::timeout_at(deadline, self.client.request(request)).await {
            Err(_) => return timed_out(),
            Ok(Err(e)) => {
                let connect = e.is_connect();
                return Attempt::Failed {
                    kind: ErrorKind::ServerError,
                    message: format!(
                        "{}: {}",
                        if connect {
                            "connect failed"
                        } else {
                            "the connection failed"
                        },
                        error_chain(&e)
                    ),
                    outcome: Outcome::Failed,
                    failover: if connect {
                        failover_on.contains(&RetryOn::ConnectFailure)
                    } else {
                        failover_on.contains(&RetryOn::Reset)
                            || failover_on.contains(&RetryOn::ConnectFailure)
                    },
                    label: "failed",
                };
            }
            Ok(Ok(r)) => r,
        };
        let (parts, mut body) = response.into_parts();
        let status = parts.status.as_u16();
        if !parts.status.is_success() {
            self.observe_headers(provider, &parts.headers);
            let text = read_bounded(body, started + self.request_timeout.max(first_byte_timeout))
                .await
                .unwrap_or_default();
            let error = translate::classify_provider_error(upstream.spec.kind, status, &text);
            let (outcome, failover, label) = match status {
                429 => (
                    Outcome::RateLimited {
                        retry_after: retry_after(&parts.headers),
                    },
                    failover_on.contains(&RetryOn::Status(429)),
                    "rate_limited",
                ),
                500..=599 => (
                    Outcome::Failed,
                    failover_on.contains(&RetryOn::Status(status))
                        || failover_on.contains(&RetryOn::ServerError)
                        || (matches!(status, 502..=504)
                            && failover_on.contains(&RetryOn::GatewayError)),
                    "failed",
                ),
                _ => (
                    Outcome::Rejected,
                    failover_on.contains(&RetryOn::Status(status)),
                    "rejected",
                ),
            };
            return Attempt::Failed {
                kind: error.kind,
                message: format!("HTTP {status}: {}", error.message),
                outcome,
                failover,
                label,
            };
        }
        // Wait for the first data frame: until it is here, failing over is invisible to
        // the application.
        let first = loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return timed_out(),
                Ok(None) => break Bytes::new(),
                Ok(Some(Err(e))) => {
                    return Attempt::Failed {
                        kind: ErrorKind::ServerError,
                        message: format!("the answer was cut before its first byte: {e}"),
                        outcome: Outcome::Failed,
                        failover: failover_on.contains(&RetryOn::Reset)
                            || failover_on.contains(&RetryOn::ServerError),
                        label: "failed",
                    };
                }
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => break data,
                    _ => continue,
                },
            }
        };
        let ttft = started.elapsed();
        if stream {
            return Attempt::Stream {
                headers: parts.headers,
                first,
                body,
                ttft,
            };
        }
        let rest = read_bounded(body, started + self.request_timeout.max(first_byte_timeout)).await;
        match rest {
            Ok(rest) => {
                let mut whole = Vec::with_capacity(first.len() + rest.len());
                whole.extend_from_slice(&first);
                whole.extend_from_slice(&rest);
                Attempt::Whole {
                    headers: parts.headers,
                    body: Bytes::from(whole),
                    ttft,
                    total: started.elapsed(),
                }
            }
            Err(message) => Attempt::Failed {
                kind: ErrorKind::ServerError,
                message,
                outcome: Outcome::Failed,
                failover: failover_on.contains(&RetryOn::Reset)
                    || failover_on.contains(&RetryOn::ServerError),
                label: "failed",
            },
        }
    }

    /// The application's body for a whole answer of `provider`, and the output tokens
    /// it reports; an error when the answer is not the provider's dialect.
    pub(super) fn whole_response(
        &self,
        provider: usize,
        body: &Bytes,
    ) -> Result<(Bytes, u64), String> {
        let kind = self.upstreams[provider].spec.kind;
        let bad = |e: &dyn std::fmt::Display| format!("the provider's answer is malformed: {e}");
        match (kind, self.app) {
            (ProviderKind::Openai, app) => {
                let resp: oa::ChatCompletion = decode(body).map_err(|e| bad(&e))?;
                let tokens = resp.usage.as_ref().map_or(0, |u| u.completion_tokens);
                if app == ProviderKind::Openai {
                    return Ok((body.clone(), tokens));
                }
                let translated =
                    translate::openai_to_anthropic_response(&resp).map_err(|e| bad(&e))?;
                let json = serde_json::to_vec(&translated).map_err(|e| bad(&e))?;
                Ok((Bytes::from(json), tokens))
            }
            (ProviderKind::Anthropic, app) => {
                let resp: an::MessagesResponse = decode(body).map_err(|e| bad(&e))?;
                let tokens = resp.usage.output_tokens;
                if app == ProviderKind::Anthropic {
                    return Ok((body.clone(), tokens));
                }
                let translated = translate::anthropic_to_openai_response(&resp, unix_now());
                let json = serde_json::to_vec(&translated).map_err(|e| bad(&e))?;
                Ok((Bytes::from(json), tokens))
            }
        }
    }
}

/// `Retry-After` as seconds or an HTTP date (RFC 9110 §10.2.3).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e6)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

async fn read_bounded(mut body: Incoming, deadline: Instant) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::from_std(deadline);
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err("the answer did not complete within timeouts.request".into()),
            Ok(None) => return Ok(out),
            Ok(Some(Err(e))) => return Err(format!("the answer was cut: {e}")),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > MAX_RESPONSE_BYTES {
                        return Err(format!("the answer exceeds {MAX_RESPONSE_BYTES} bytes"));
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}
