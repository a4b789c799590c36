//! The LLM gateway: the I/O around the pure core in [`crate::llm`]. A route whose
//! listener speaks `openai` or `anthropic` is served here instead of by the HTTP proxy.
//!
//! One request, in order:
//! 1. the body is read up to the sidecar's limit (413 above) and decoded in the
//!    application's dialect (400 naming the JSON path of the problem);
//! 2. tokens are counted once per tokenizer the providers use, and [`Router`] chooses a
//!    provider, preferring those whose context window holds the request;
//! 3. the request is fitted to the chosen window ([`fitting`]), translated when the
//!    provider speaks the other dialect, and sent with the provider's key — whatever
//!    credentials the application sent are never forwarded;
//! 4. until the first byte of the answer is in hand nothing has reached the
//!    application, so a connect error, `firstByteTimeout`, 429, 5xx or 529 moves the
//!    request to the next provider ([`Router::failover`], inside `maxAttempts` and the
//!    failover budget); when every provider failed, the application gets one error in its
//!    own dialect. With `failover.hedge`, a first attempt still silent after the route's
//!    p95 time to first token is raced against a second provider; the first to answer
//!    wins and the other is cancelled;
//! 5. a stream is forwarded chunk by chunk through a [`StreamMapper`]; a whole answer is
//!    translated once it is complete. Time to first byte, total time, rate-limit headers
//!    and failures go back to the router.
//!
//! `firstByteTimeout` bounds the wait for the first event of a stream, and the silence
//! between two events (a provider that stops mid-stream ends the application's stream
//! with an error event instead of hanging it). A whole answer arrives only when the model
//! has finished, so its first byte may come long after a stream's would: it is bounded
//! by the larger of `firstByteTimeout` and `timeouts.request`.
//!
//! The router is a plain `&mut` state machine behind a mutex held for a few
//! microseconds per decision, never across an await.
//!
//! Where each part lives: [`request`] (the decoded request and its token counts per
//! tokenizer), [`failover`] (choosing, failing over, hedging, concluding), [`attempt`]
//! (one provider: fit, translate, send, first byte), [`stream`] (forwarding a stream),
//! [`client`] (the HTTP client to the providers), [`keys`] and [`metrics`].

mod attempt;
mod client;
mod failover;
pub mod keys;
pub mod metrics;
mod request;
mod stream;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use trimtab_api::{
    balancer_policy::{ListenerProtocol, Provider, ProviderKind},
    sidecar_config::{LlmRoute, Route},
};

use crate::{
    forward::{BoxError, ProxyBody},
    llm::{
        anthropic as an,
        decode::decode,
        fitting::{self, TokenCounter},
        openai as oa,
        routing::{BreakerConfig, Router},
        translate::{self, ErrorKind},
    },
};

use self::request::AppRequest;
pub use self::{
    client::{ProviderClient, endpoint_url, provider_client},
    keys::ApiKey,
    metrics::LlmMetrics,
};

/// Response header naming the provider that answered.
pub const PROVIDER_HEADER: &str = "x-trimtab-provider";
/// Response header reporting context fitting: `evicted=3; tokens_before=…; tokens_after=…`.
pub const EVICTED_HEADER: &str = "x-trimtab-evicted";
/// Response header with the number of providers tried.
pub const ATTEMPTS_HEADER: &str = "x-trimtab-attempts";
/// The Messages API version sent to Anthropic providers (the one its reference names).
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// Largest provider answer read whole (a non-streamed completion or an error body).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// A route that cannot be served as an LLM gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The route has no `llm` section.
    #[error("{route}: not an LLM route (no providers)")]
    NotLlm {
        /// The route.
        route: String,
    },
    /// The TLS client cannot be set up.
    #[error("the TLS client for LLM providers cannot be built: {0}")]
    Tls(rustls::Error),
    /// A provider's base URL does not make a request URI.
    #[error("{route}: providers[{index}].baseUrl: {url:?} does not make a URI: {message}")]
    BaseUrl {
        /// The route.
        route: String,
        /// Index of the provider.
        index: usize,
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
}

#[derive(Debug)]
struct Upstream {
    spec: Provider,
    url: Uri,
    key: ApiKey,
    encoding: fitting::Encoding,
}

/// One LLM route's running state: its providers, router and tokenizer caches.
#[derive(Debug)]
pub struct LlmGateway {
    id: String,
    app: ProviderKind,
    config: LlmRoute,
    upstreams: Vec<Upstream>,
    router: Mutex<Router>,
    counters: HashMap<fitting::Encoding, Mutex<TokenCounter>>,
    client: ProviderClient,
    metrics: LlmMetrics,
    max_request_body: u64,
    request_timeout: Duration,
}

impl LlmGateway {
    /// The gateway of `route`; `previous` (the same route before a reload) hands over
    /// its router and token caches when the providers did not change, so latency
    /// estimates and circuit breakers survive a config push.
    pub fn build(
        route: &Route,
        previous: Option<&LlmGateway>,
        client: ProviderClient,
        metrics: LlmMetrics,
        max_request_body: u64,
    ) -> Result<Self, GatewayError> {
        let id = route.id();
        let config = route
            .llm
            .clone()
            .ok_or_else(|| GatewayError::NotLlm { route: id.clone() })?;
        let app = match route.listener.protocol {
            ListenerProtocol::Anthropic => ProviderKind::Anthropic,
            _ => ProviderKind::Openai,
        };
        let mut upstreams = Vec::with_capacity(config.providers.len());
        for (index, p) in config.providers.iter().enumerate() {
            let url = endpoint_url(p.provider.kind, &p.provider.base_url);
            let uri = url.parse::<Uri>().map_err(|e| GatewayError::BaseUrl {
                route: id.clone(),
                index,
                url: p.provider.base_url.clone(),
                message: e.to_string(),
            })?;
            upstreams.push(Upstream {
                spec: p.provider.clone(),
                url: uri,
                key: ApiKey::new(p),
                encoding: fitting::Encoding::for_model(p.provider.kind, &p.provider.model),
            });
        }
        let specs: Vec<Provider> = upstreams.iter().map(|u| u.spec.clone()).collect();
        let same = previous.filter(|p| p.id == id && p.config == config);
        let router = match same {
            Some(p) => lock(&p.router).clone(),
            None => Router::new(
                &specs,
                config.routing.clone(),
                config.failover.clone(),
                BreakerConfig::default(),
            ),
        };
        let mut counters = HashMap::new();
        for u in &upstreams {
            counters.entry(u.encoding).or_insert_with(|| {
                let counter = TokenCounter::new(u.encoding).or_else(|e| {
                    tracing::warn!(error = %e, "tokenizer unavailable; estimating tokens from bytes");
                    TokenCounter::new(fitting::Encoding::AnthropicEstimate)
                });
                counter.map(Mutex::new)
            });
        }
        let counters = counters
            .into_iter()
            .filter_map(|(k, v)| v.ok().map(|v| (k, v)))
            .collect();
        Ok(Self {
            id,
            app,
            config,
            upstreams,
            router: Mutex::new(router),
            counters,
            client,
            metrics,
            max_request_body,
            request_timeout: route.timeouts.request.get(),
        })
    }

    /// `namespace/name` of the route.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The latency estimate of each provider, in policy order (for tests and debugging).
    pub fn estimates(&self) -> Vec<Option<f64>> {
        let router = lock(&self.router);
        (0..self.upstreams.len())
            .map(|i| router.estimate(i))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state stays consistent across a panic (every update is one call).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves one request of the application on an LLM listener.
pub async fn serve(
    gateway: Arc<LlmGateway>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let app = gateway.app;
    let response = match handle(&gateway, req).await {
        Ok(response) => response,
        Err((kind, message)) => {
            tracing::debug!(route = %gateway.id, ?kind, %message, "LLM request failed");
            error_response(app, kind, &message)
        }
    };
    let result = if response.status().is_success() {
        "ok"
    } else {
        "error"
    };
    gateway
        .metrics
        .requests
        .with_label_values(&[gateway.id.as_str(), result])
        .inc();
    Ok(response)
}

type Failure = (ErrorKind, String);

fn is_endpoint(app: ProviderKind, path: &str) -> bool {
    match app {
        // The OpenAI SDKs' base URL ends in /v1; a base URL without it is accepted too.
        ProviderKind::Openai => matches!(path, "/v1/chat/completions" | "/chat/completions"),
        // The Anthropic SDKs append /v1/messages to the base URL.
        ProviderKind::Anthropic => matches!(path, "/v1/messages" | "/messages"),
    }
}

async fn handle(
    gateway: &Arc<LlmGateway>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Failure> {
    let app = gateway.app;
    if !is_endpoint(app, req.uri().path()) {
        return Err((
            ErrorKind::NotFound,
            format!(
                "{} {} is not served here; this listener speaks {}",
                req.method(),
                req.uri().path(),
                match app {
                    ProviderKind::Openai => "OpenAI Chat Completions at POST /v1/chat/completions",
                    ProviderKind::Anthropic => "Anthropic Messages at POST /v1/messages",
                }
            ),
        ));
    }
    if req.method() != Method::POST {
        return Err((
            ErrorKind::InvalidRequest,
            format!("{} is not allowed here; use POST", req.method()),
        ));
    }
    // Beta features an Anthropic app opts into only mean something to an Anthropic
    // provider; every other header of the app (its credentials first) stays here.
    let beta = (app == ProviderKind::Anthropic)
        .then(|| req.headers().get("anthropic-beta").cloned())
        .flatten();
    let limit = usize::try_from(gateway.max_request_body).unwrap_or(usize::MAX);
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err((
                ErrorKind::RequestTooLarge,
                format!(
                    "the request body exceeds {} bytes",
                    gateway.max_request_body
                ),
            ));
        }
        Err(e) => {
            return Err((
                ErrorKind::InvalidRequest,
                format!("the request body could not be read: {e}"),
            ));
        }
    };
    let decoded = match app {
        ProviderKind::Openai => decode::<oa::ChatRequest>(&body).map(AppRequest::Openai),
        ProviderKind::Anthropic => decode::<an::MessagesRequest>(&body).map(AppRequest::Anthropic),
    };
    let request = decoded.map_err(|e| (ErrorKind::InvalidRequest, e.to_string()))?;
    let hints =
        fitting::message_hints(&body).map_err(|e| (ErrorKind::InvalidRequest, e.to_string()))?;
    gateway.dispatch(request, &hints, beta.as_ref()).await
}

fn humanize(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| -> BoxError { match never {} })
        .boxed_unsync()
}

/// An error answer in the application's dialect.
pub fn error_response(app: ProviderKind, kind: ErrorKind, message: &str) -> Response<ProxyBody> {
    let (status, body) = translate::render_error(app, kind, message);
    let mut response = Response::new(full(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
