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

pub mod keys;
pub mod metrics;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use trimtab_api::{
    RetryOn,
    balancer_policy::{FittingStrategy, ListenerProtocol, Provider, ProviderKind},
    sidecar_config::{LlmRoute, Route},
};

use crate::{
    forward::{BoxError, ProxyBody},
    http_client::{POOL_IDLE_TIMEOUT, error_chain},
    llm::{
        anthropic as an,
        decode::decode,
        fitting::{self, EvictionPlan, FitMessage, MessageHints, TokenCounter},
        openai as oa,
        routing::{self, BreakerConfig, NoProvider, Outcome, Router},
        stream::{OpenAiStreamOptions, StreamMapper},
        translate::{self, ErrorKind},
    },
};

pub use self::{keys::ApiKey, metrics::LlmMetrics};

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

/// The HTTPS (and, for local and test providers, plain HTTP) client to the providers.
pub type ProviderClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The client to the providers, trusting the system's root certificates (the image's
/// CA bundle). Without any, plain-http providers still work and https ones fail at
/// connect with a TLS error naming the certificate.
pub fn provider_client(connect_timeout: Duration) -> Result<ProviderClient, GatewayError> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    // The crypto provider is named, not taken from the process default: which default
    // rustls picks depends on the features other crates enable.
    let ring = || Arc::new(rustls::crypto::ring::default_provider());
    let builder = match hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(ring())
    {
        Ok(builder) => builder,
        Err(e) => {
            tracing::warn!(error = %e, "no system root certificates; https providers will fail");
            let tls = rustls::ClientConfig::builder_with_provider(ring())
                .with_safe_default_protocol_versions()
                .map_err(GatewayError::Tls)?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls)
        }
    };
    let https = builder
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(https))
}

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

/// The endpoint a provider of `kind` is sent requests at, under `base_url` (the SDKs'
/// convention: OpenAI's base URL includes `/v1`, Anthropic's does not).
pub fn endpoint_url(kind: ProviderKind, base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    match kind {
        ProviderKind::Openai => format!("{base}/chat/completions"),
        ProviderKind::Anthropic => format!("{base}/v1/messages"),
    }
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

/// The application's request, decoded in its dialect.
#[derive(Debug, Clone)]
enum AppRequest {
    Openai(oa::ChatRequest),
    Anthropic(an::MessagesRequest),
}

impl AppRequest {
    fn model(&self) -> &str {
        match self {
            Self::Openai(r) => &r.model,
            Self::Anthropic(r) => &r.model,
        }
    }

    fn stream(&self) -> bool {
        match self {
            Self::Openai(r) => r.stream.unwrap_or(false),
            Self::Anthropic(r) => r.stream.unwrap_or(false),
        }
    }

    fn include_usage(&self) -> bool {
        match self {
            Self::Openai(r) => r
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            Self::Anthropic(_) => true,
        }
    }

    fn max_output(&self) -> u64 {
        match self {
            Self::Openai(r) => u64::from(r.max_completion_tokens.or(r.max_tokens).unwrap_or(0)),
            Self::Anthropic(r) => u64::from(r.max_tokens),
        }
    }

    fn fit_view(
        &self,
        counter: &mut TokenCounter,
        hints: &[MessageHints],
    ) -> (Vec<FitMessage>, u64) {
        let (mut messages, fixed) = match self {
            Self::Openai(r) => fitting::openai_messages(r, counter),
            Self::Anthropic(r) => fitting::anthropic_messages(r, counter),
        };
        fitting::apply_hints(&mut messages, hints);
        (messages, fixed)
    }

    fn apply(&mut self, plan: &EvictionPlan, fit: &[FitMessage]) {
        match self {
            Self::Openai(r) => fitting::apply_openai(r, plan, fit),
            Self::Anthropic(r) => fitting::apply_anthropic(r, plan, fit),
        }
    }
}

/// The planner's view of the request under one tokenizer.
#[derive(Debug)]
struct View {
    messages: Vec<FitMessage>,
    fixed: u64,
    total: u64,
}

/// What the dispatch loop does after an attempt.
enum Step {
    /// Answer the application with this.
    Done(Result<Response<ProxyBody>, Failure>),
    /// Try the next provider; this is why.
    Next(Failure),
}

/// An attempt under way, with what its answer needs.
struct Pending<F> {
    provider: usize,
    plan: Option<EvictionPlan>,
    started: Instant,
    attempt: F,
    probe: Probe,
}

/// A provider chosen by the router whose outcome is not recorded yet. Dropped unsettled
/// — the application went away, or a hedge was won by the other provider — it records
/// [`Outcome::Cancelled`], so a half-open circuit breaker does not wait forever for a
/// verdict that will never come.
struct Probe {
    gateway: Arc<LlmGateway>,
    provider: usize,
    settled: bool,
}

impl Probe {
    fn new(gateway: &Arc<LlmGateway>, provider: usize) -> Self {
        Self {
            gateway: Arc::clone(gateway),
            provider,
            settled: false,
        }
    }

    /// The outcome was recorded elsewhere (or is left to the stream that carries it on).
    fn settle(mut self) {
        self.settled = true;
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.settled {
            lock(&self.gateway.router).record(self.provider, Instant::now(), Outcome::Cancelled);
        }
    }
}

/// How one attempt at a provider ended before anything reached the application.
enum Attempt {
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

impl LlmGateway {
    fn views(
        &self,
        request: &AppRequest,
        hints: &[MessageHints],
    ) -> HashMap<fitting::Encoding, View> {
        let mut views = HashMap::new();
        for (encoding, counter) in &self.counters {
            let mut counter = lock(counter);
            let (messages, fixed) = request.fit_view(&mut counter, hints);
            let total = fixed + messages.iter().map(|m| m.tokens).sum::<u64>();
            views.insert(
                *encoding,
                View {
                    messages,
                    fixed,
                    total,
                },
            );
        }
        views
    }

    fn available(&self, provider: usize) -> u64 {
        self.upstreams[provider]
            .spec
            .context_window
            .saturating_sub(self.config.context_fitting.reserve_output_tokens)
    }

    fn view<'v>(
        &self,
        views: &'v HashMap<fitting::Encoding, View>,
        provider: usize,
    ) -> Option<&'v View> {
        views
            .get(&self.upstreams[provider].encoding)
            .or_else(|| views.values().next())
    }

    async fn dispatch(
        self: &Arc<Self>,
        request: AppRequest,
        hints: &[MessageHints],
        beta: Option<&HeaderValue>,
    ) -> Result<Response<ProxyBody>, Failure> {
        let views = self.views(&request, hints);
        let fits = |i: usize| {
            self.view(&views, i)
                .is_none_or(|v| v.total <= self.available(i))
        };
        let tokens = views.values().map(|v| v.total).max().unwrap_or(0) + request.max_output();
        let mut tried: Vec<usize> = Vec::new();
        let mut last: Option<Failure> = None;
        loop {
            let now = Instant::now();
            let decision = {
                let mut router = lock(&self.router);
                if tried.is_empty() {
                    router.choose_fitting(now, rand::random::<f64>(), tokens, &fits)
                } else {
                    router.failover_fitting(now, &tried, tokens, &fits)
                }
            };
            let provider = match decision {
                Ok(d) => d.provider,
                Err(no) => return Err(all_failed(no, last, tried.len())),
            };
            if let Some(&from) = tried.last() {
                self.metrics
                    .failovers
                    .with_label_values(&[self.id.as_str(), self.upstreams[from].spec.name.as_str()])
                    .inc();
            }
            tried.push(provider);
            let probe = Probe::new(self, provider);
            let name = self.upstreams[provider].spec.name.clone();

            // Fit and translate: a request that cannot be sent is the application's
            // problem, not the provider's.
            let (body, plan) = match self.prepare(&request, &views, provider) {
                Ok(prepared) => prepared,
                Err(failure) => {
                    lock(&self.router).record(provider, Instant::now(), Outcome::Rejected);
                    probe.settle();
                    return Err(failure);
                }
            };
            if let Some(plan) = &plan {
                self.metrics
                    .evicted_messages
                    .with_label_values(&[self.id.as_str(), name.as_str()])
                    .inc_by(plan.evicted.len() as u64);
            }
            let started = Instant::now();
            let first = self.attempt(provider, body, request.stream(), beta, started);
            let hedge_delay = lock(&self.router).hedge_delay();
            let step = match hedge_delay {
                None => {
                    let attempt = first.await;
                    probe.settle();
                    self.conclude(&request, provider, plan, tried.len(), started, attempt)
                }
                Some(delay) => {
                    let first = Pending {
                        provider,
                        plan,
                        started,
                        attempt: first,
                        probe,
                    };
                    self.hedged(&request, &views, tokens, beta, &mut tried, first, delay)
                        .await
                }
            };
            match step {
                Step::Done(result) => return result,
                Step::Next(failure) => last = Some(failure),
            }
        }
    }

    /// Waits for `first`; if it has no first byte after `delay` (the route's p95 time to
    /// first token), sends the request to a second provider too ([`Router::hedge`], paid
    /// from the failover budget), keeps whichever answers first and cancels the other by
    /// dropping it, which closes its connection.
    #[allow(clippy::too_many_arguments)]
    async fn hedged<F: Future<Output = Attempt>>(
        self: &Arc<Self>,
        request: &AppRequest,
        views: &HashMap<fitting::Encoding, View>,
        tokens: u64,
        beta: Option<&HeaderValue>,
        tried: &mut Vec<usize>,
        first: Pending<F>,
        delay: Duration,
    ) -> Step {
        let Pending {
            provider: a,
            plan: plan_a,
            started: started_a,
            attempt,
            probe: probe_a,
        } = first;
        let mut first = std::pin::pin!(attempt);
        tokio::select! {
            attempt = &mut first => {
                probe_a.settle();
                return self.conclude(request, a, plan_a, tried.len(), started_a, attempt);
            }
            () = tokio::time::sleep(delay) => {}
        }
        let decision = lock(&self.router).hedge(Instant::now(), tried, tokens);
        let Ok(decision) = decision else {
            let attempt = first.await;
            probe_a.settle();
            return self.conclude(request, a, plan_a, tried.len(), started_a, attempt);
        };
        let b = decision.provider;
        let (body, plan_b) = match self.prepare(request, views, b) {
            Ok(prepared) => prepared,
            Err(_) => {
                lock(&self.router).record(b, Instant::now(), Outcome::Rejected);
                let attempt = first.await;
                probe_a.settle();
                return self.conclude(request, a, plan_a, tried.len(), started_a, attempt);
            }
        };
        let probe_b = Probe::new(self, b);
        tried.push(b);
        self.metrics
            .hedges
            .with_label_values(&[self.id.as_str(), self.upstreams[a].spec.name.as_str()])
            .inc();
        let started_b = Instant::now();
        let mut second = std::pin::pin!(self.attempt(b, body, request.stream(), beta, started_b));
        // `Some` while the attempt is under way; a probe left unsettled when the other
        // attempt wins records the loser as cancelled.
        let (mut plan_a, mut plan_b) = (Some(plan_a), Some(plan_b));
        let (mut probe_a, mut probe_b) = (Some(probe_a), Some(probe_b));
        loop {
            let step = tokio::select! {
                attempt = &mut first, if plan_a.is_some() => {
                    let plan = plan_a.take().flatten();
                    if let Some(probe) = probe_a.take() {
                        probe.settle();
                    }
                    self.conclude(request, a, plan, tried.len(), started_a, attempt)
                }
                attempt = &mut second, if plan_b.is_some() => {
                    let plan = plan_b.take().flatten();
                    if let Some(probe) = probe_b.take() {
                        probe.settle();
                    }
                    self.conclude(request, b, plan, tried.len(), started_b, attempt)
                }
            };
            match step {
                // The other attempt is dropped with this frame: cancelled.
                Step::Done(result) => return Step::Done(result),
                Step::Next(failure) if plan_a.is_none() && plan_b.is_none() => {
                    return Step::Next(failure);
                }
                // Recorded by `conclude`; the other attempt may still answer.
                Step::Next(_) => {}
            }
        }
    }

    /// What one finished attempt means for the request: an answer (or a final error) for
    /// the application, or a failure after which the next provider is tried.
    fn conclude(
        self: &Arc<Self>,
        request: &AppRequest,
        provider: usize,
        plan: Option<EvictionPlan>,
        attempts: usize,
        started: Instant,
        attempt: Attempt,
    ) -> Step {
        let name = &self.upstreams[provider].spec.name;
        match attempt {
            Attempt::Failed {
                kind,
                message,
                outcome,
                failover,
                label,
            } => {
                self.count_attempt(provider, label);
                lock(&self.router).record(provider, Instant::now(), outcome);
                tracing::info!(route = %self.id, provider = %name, %message, failover, "LLM provider attempt failed");
                let failure = (kind, format!("{name}: {message}"));
                if !failover {
                    return Step::Done(Err(failure));
                }
                Step::Next(failure)
            }
            Attempt::Whole {
                headers,
                body,
                ttft,
                total,
            } => {
                self.observe_ttft(provider, ttft);
                self.observe_headers(provider, &headers);
                match self.whole_response(provider, &body) {
                    Ok((bytes, output_tokens)) => {
                        self.count_attempt(provider, "success");
                        lock(&self.router).record(
                            provider,
                            Instant::now(),
                            Outcome::Success {
                                ttft,
                                total,
                                output_tokens,
                            },
                        );
                        let mut response = Response::new(full(bytes));
                        self.decorate(
                            &mut response,
                            provider,
                            plan.as_ref(),
                            attempts,
                            "application/json",
                        );
                        Step::Done(Ok(response))
                    }
                    Err(message) => {
                        // A 200 whose body is not the dialect's JSON: the provider is
                        // broken, and nothing has reached the application yet.
                        self.count_attempt(provider, "failed");
                        lock(&self.router).record(provider, Instant::now(), Outcome::Failed);
                        Step::Next((ErrorKind::ServerError, format!("{name}: {message}")))
                    }
                }
            }
            Attempt::Stream {
                headers,
                first,
                body,
                ttft,
            } => {
                self.observe_ttft(provider, ttft);
                self.observe_headers(provider, &headers);
                let mapper = StreamMapper::new(
                    self.upstreams[provider].spec.kind,
                    self.app,
                    request.model(),
                    OpenAiStreamOptions {
                        created: unix_now(),
                        include_usage: request.include_usage(),
                    },
                );
                let stream = StreamState {
                    gateway: Arc::clone(self),
                    provider,
                    mapper,
                    first: Some(first),
                    body,
                    started,
                    ttft,
                    finished: false,
                };
                let mut response = Response::new(stream.into_body());
                self.decorate(
                    &mut response,
                    provider,
                    plan.as_ref(),
                    attempts,
                    "text/event-stream",
                );
                response
                    .headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                Step::Done(Ok(response))
            }
        }
    }

    fn count_attempt(&self, provider: usize, outcome: &str) {
        self.metrics
            .attempts
            .with_label_values(&[
                self.id.as_str(),
                self.upstreams[provider].spec.name.as_str(),
                outcome,
            ])
            .inc();
    }

    fn observe_ttft(&self, provider: usize, ttft: Duration) {
        self.metrics
            .ttft
            .with_label_values(&[
                self.id.as_str(),
                self.upstreams[provider].spec.name.as_str(),
            ])
            .observe(ttft.as_secs_f64());
    }

    fn observe_headers(&self, provider: usize, headers: &HeaderMap) {
        let snapshot = routing::parse_rate_limits(
            self.upstreams[provider].spec.kind,
            headers,
            SystemTime::now(),
        );
        lock(&self.router).observe_rate_limits(provider, Instant::now(), &snapshot);
    }

    fn decorate(
        &self,
        response: &mut Response<ProxyBody>,
        provider: usize,
        plan: Option<&EvictionPlan>,
        attempts: usize,
        content_type: &'static str,
    ) {
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Ok(v) = HeaderValue::from_str(&self.upstreams[provider].spec.name) {
            headers.insert(PROVIDER_HEADER, v);
        }
        headers.insert(ATTEMPTS_HEADER, HeaderValue::from(attempts));
        if let Some(plan) = plan
            && let Ok(v) = HeaderValue::from_str(&plan.summary())
        {
            headers.insert(EVICTED_HEADER, v);
        }
    }

    /// The body to send to `provider`: the request fitted to its window and translated
    /// into its dialect, and the eviction plan when messages were removed.
    fn prepare(
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
    async fn attempt(
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
    fn whole_response(&self, provider: usize, body: &Bytes) -> Result<(Bytes, u64), String> {
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

fn all_failed(no: NoProvider, last: Option<Failure>, tried: usize) -> Failure {
    match last {
        Some((kind, message)) => (
            kind,
            format!("every LLM provider failed ({tried} tried; {no}); the last error: {message}"),
        ),
        None => (ErrorKind::Overloaded, no.to_string()),
    }
}

fn humanize(d: Duration) -> String {
    format!("{}ms", d.as_millis())
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

/// A provider's stream on its way to the application. Dropped before its end (the
/// application went away), it records the attempt as cancelled.
struct StreamState {
    gateway: Arc<LlmGateway>,
    provider: usize,
    mapper: StreamMapper,
    first: Option<Bytes>,
    body: Incoming,
    started: Instant,
    ttft: Duration,
    finished: bool,
}

impl StreamState {
    /// The stream as a response body: each provider chunk is mapped and sent as soon as
    /// it arrives; nothing is buffered beyond the current event.
    fn into_body(self) -> ProxyBody {
        let frames = futures_util::stream::unfold(self, |mut state| async move {
            loop {
                if state.finished {
                    return None;
                }
                let idle = state.gateway.config.failover.first_byte_timeout.get();
                let out = if let Some(first) = state.first.take() {
                    state.mapper.push(&first)
                } else {
                    match tokio::time::timeout(idle, state.body.frame()).await {
                        Err(_) => {
                            state.end(false);
                            state.mapper.abort(
                                ErrorKind::Timeout,
                                &format!(
                                    "the provider sent nothing for {} (failover.firstByteTimeout) in the middle of its stream",
                                    humanize(idle)
                                ),
                            )
                        }
                        Ok(frame) => match frame {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) => state.mapper.push(&data),
                                Err(_) => Vec::new(),
                            },
                            Some(Err(e)) => {
                                state.end(false);
                                state.mapper.abort(
                                    ErrorKind::ServerError,
                                    &format!("the provider's stream failed: {e}"),
                                )
                            }
                            None => {
                                // Ended before its last event: the mapper reports the cut.
                                let complete = state.mapper.is_done();
                                let out = state.mapper.finish();
                                state.end(complete);
                                out
                            }
                        },
                    }
                };
                if state.mapper.is_done() && !state.finished {
                    // Complete (or failed) by its own events: stop reading the provider.
                    state.end(true);
                }
                if !out.is_empty() {
                    return Some((Ok::<_, BoxError>(Frame::data(Bytes::from(out))), state));
                }
            }
        });
        StreamBody::new(frames).boxed_unsync()
    }

    /// Records how the stream ended, once.
    fn end(&mut self, clean: bool) {
        if self.finished {
            return;
        }
        self.finished = true;
        let gateway = &self.gateway;
        // A stream cut or failed before its last event counts against the provider.
        let outcome = if !clean {
            gateway.count_attempt(self.provider, "stream_failed");
            Outcome::Failed
        } else {
            gateway.count_attempt(self.provider, "success");
            Outcome::Success {
                ttft: self.ttft,
                total: self.started.elapsed(),
                output_tokens: 1,
            }
        };
        lock(&gateway.router).record(self.provider, Instant::now(), outcome);
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            lock(&self.gateway.router).record(self.provider, Instant::now(), Outcome::Cancelled);
        }
    }
}
