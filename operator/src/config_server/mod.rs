//! The config server the sidecars long-poll (protocol: `docs/config-server.md`), and on
//! the same HTTPS port the sidecar-injection webhook (`POST /mutate-pods`, see
//! [`crate::webhook`]) and the LoadTest runners' reports (`POST
//! /v1/loadtests/{namespace}/{name}/runners/{index}`, see [`crate::load_test::runs`]).
//!
//! Answers come from the in-memory [`PolicyIndex`] and the Pod reflector store, never
//! from the API server on the request path; the only API call is a TokenReview when a
//! token is not in the cache. Every replica serves, leader or not.

pub mod auth;
pub mod subscribers;
pub mod tls;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{ObjectRef, Store};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use trimtab_api::{
    runner_protocol::{self, RunnerReport},
    sidecar_config::{LoadReport, NO_POLICY_REASON},
};

use self::{
    auth::{AuthError, Authenticator, PodIdentity},
    subscribers::Subscribers,
};
use crate::{
    index::PolicyIndex,
    load_reports::LoadReports,
    load_test::runs::{Answer, ReportError, Runs},
    webhook::Injector,
};

/// The default and the longest long-poll.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT_SECONDS: u64 = 60;
/// The largest load report accepted.
const MAX_REPORT_BYTES: usize = 1 << 20;
/// The largest AdmissionReview accepted: a pod is at most ~1.5 MiB (etcd's object limit),
/// and the review carries it once for a creation.
const MAX_REVIEW_BYTES: usize = 4 << 20;
/// How often the connected-sidecars gauge is refreshed.
const SUBSCRIBER_GAUGE_EVERY: Duration = Duration::from_secs(5);
/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server reads and writes.
#[derive(Debug)]
pub struct ServerState {
    /// The routes, by policy.
    pub index: PolicyIndex,
    /// Token → pod.
    pub auth: Authenticator,
    /// Every pod, for labels and UID checks.
    pub pods: Store<Pod>,
    /// Set once the pod store has its first full list.
    pub pods_synced: Arc<AtomicBool>,
    /// Where load reports go.
    pub load_reports: LoadReports,
    /// Who is subscribed.
    pub subscribers: Subscribers,
    /// The LoadTests whose runners report here.
    pub runs: Runs,
    /// Request counters.
    pub metrics: ServerMetrics,
    /// The sidecar injector; `None` when this operator does not inject (no sidecar image
    /// configured), and `/mutate-pods` answers 404.
    pub injector: Option<Injector>,
}

/// The config server's own metrics.
#[derive(Clone, Debug)]
pub struct ServerMetrics {
    requests: IntCounterVec,
    subscribers: IntGauge,
}

impl ServerMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "trimtab_operator_config_requests_total",
                "Config server requests, by path and status code",
            ),
            &["path", "code"],
        )?;
        let subscribers = IntGauge::new(
            "trimtab_operator_config_subscribers",
            "Sidecars connected to this replica",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(subscribers.clone()))?;
        Ok(Self {
            requests,
            subscribers,
        })
    }
}

/// A request that is refused, with the status and a message naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// See [`AuthError`].
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The pod matches no policy and holds no config.
    #[error("pod {namespace}/{name} matches no BalancerPolicy's spec.clients.podSelector")]
    NoPolicy {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
    },
    /// A load report for a policy the pod was not given.
    #[error("endpoints[{index}].policy: pod {pod} was not given policy {policy:?}")]
    NotGiven {
        /// Position in the report.
        index: usize,
        /// `namespace/name` of the pod.
        pod: String,
        /// The policy named.
        policy: String,
    },
    /// A query parameter or header that does not parse.
    #[error("{field}: {message}")]
    BadRequest {
        /// The parameter, header or JSON path.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A body over the limit.
    #[error("body larger than {limit} bytes")]
    TooLarge {
        /// The limit of this endpoint.
        limit: usize,
    },
    /// `/mutate-pods` on an operator that has no sidecar to inject.
    #[error(
        "sidecar injection is not enabled on this operator (set --sidecar-image / TRIMTAB_SIDECAR_IMAGE)"
    )]
    InjectionDisabled,
    /// A LoadTest runner's report refused.
    #[error(transparent)]
    Runner(#[from] ReportError),
    /// The operator has not listed policies and pods yet.
    #[error("the operator is starting: policies and pods are not listed yet")]
    Starting,
    /// A failure of the operator itself, not of the request.
    #[error("internal error: {0}")]
    Internal(String),
    /// An unknown path.
    #[error(
        "no such endpoint; this server has GET /v1/config, POST /v1/load-reports, POST /v1/loadtests/NAMESPACE/NAME/runners/INDEX and POST /mutate-pods"
    )]
    NotFound,
    /// A known path with the wrong method.
    #[error("method not allowed; use {allow}")]
    Method {
        /// The method to use.
        allow: &'static str,
    },
}

impl RequestError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Auth(e) => StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN),
            Self::NoPolicy { .. } | Self::NotGiven { .. } => StatusCode::FORBIDDEN,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InjectionDisabled => StatusCode::NOT_FOUND,
            Self::Starting => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Runner(ReportError::Unknown(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Runner(ReportError::Token(_)) => StatusCode::UNAUTHORIZED,
            Self::Runner(ReportError::Index { .. } | ReportError::Results(_)) => {
                StatusCode::BAD_REQUEST
            }
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.status();
        let mut body = serde_json::json!({ "error": self.to_string() });
        if let Self::NoPolicy { .. } = self {
            body["reason"] = NO_POLICY_REASON.into();
        }
        let body = body.to_string();
        let mut response = json_response(status, body.into());
        let headers = response.headers_mut();
        match &self {
            Self::Starting | Self::Auth(AuthError::Review(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // Only the leader tracks LoadTests. Closing the connection sends the
            // runner's next try through the Service again, to some replica, rather
            // than down the same keep-alive connection to this one.
            Self::Runner(ReportError::Unknown(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Self::Auth(AuthError::Missing | AuthError::Rejected(_))
            | Self::Runner(ReportError::Token(_)) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Method { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            _ => {}
        }
        response
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Binds `addr` and serves HTTPS in the background until the process ends.
pub async fn serve(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<ServerState>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(tls);
    // The gauge walks every subscriber: sampled off the request path.
    let gauge = Arc::clone(&state);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SUBSCRIBER_GAUGE_EVERY);
        loop {
            every.tick().await;
            let connected = gauge.subscribers.connected();
            gauge
                .metrics
                .subscribers
                .set(i64::try_from(connected).unwrap_or(i64::MAX));
        }
    });
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "config server accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                else {
                    return;
                };
                let service = service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(handle(req, &state).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(local)
}

async fn handle(req: Request<Incoming>, state: &ServerState) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let result = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/config") => config(req, state).await,
        (&Method::POST, "/v1/load-reports") => load_report(req, state).await,
        (&Method::POST, "/mutate-pods") => mutate_pods(req, state).await,
        (_, "/v1/config") => Err(RequestError::Method { allow: "GET" }),
        (_, "/v1/load-reports" | "/mutate-pods") => Err(RequestError::Method { allow: "POST" }),
        (method, other) => match runner_protocol::parse_report_path(other) {
            Some(_) if method != Method::POST => Err(RequestError::Method { allow: "POST" }),
            Some((namespace, name, index)) => {
                let test = (namespace.to_owned(), name.to_owned());
                runner_report(req, state, test, index).await
            }
            None => Err(RequestError::NotFound),
        },
    };
    let response = result.unwrap_or_else(|e| {
        if e.status().is_server_error() {
            tracing::warn!(error = %e, "config request failed");
        } else {
            tracing::debug!(error = %e, "config request refused");
        }
        e.into_response()
    });
    let label = match path.as_str() {
        "/v1/config" | "/v1/load-reports" | "/mutate-pods" => path.as_str(),
        p if runner_protocol::parse_report_path(p).is_some() => "/v1/loadtests/runners",
        _ => "other",
    };
    state
        .metrics
        .requests
        .with_label_values(&[label, response.status().as_str()])
        .inc();
    response
}

/// The pod behind the request's token, checked against the pod store.
async fn identify(
    req: &Request<Incoming>,
    state: &ServerState,
) -> Result<(PodIdentity, Arc<Pod>), RequestError> {
    if !state.index.is_synced() || !state.pods_synced.load(Ordering::Acquire) {
        return Err(RequestError::Starting);
    }
    let token = bearer(req)?;
    let identity = state.auth.authenticate(token).await?;
    let pod = state
        .pods
        .get(&ObjectRef::new(&identity.name).within(&identity.namespace))
        .filter(|p| p.metadata.uid.as_deref() == Some(identity.uid.as_str()))
        .ok_or_else(|| AuthError::PodGone {
            namespace: identity.namespace.clone(),
            name: identity.name.clone(),
            uid: identity.uid.clone(),
        })?;
    Ok((identity, pod))
}

/// The query parameters of `GET /v1/config`.
#[derive(Debug, PartialEq)]
struct Poll {
    wait: Duration,
    /// The version the sidecar holds: the answer's version is above it.
    held: Option<u64>,
}

fn parse_query(query: Option<&str>) -> Result<Poll, RequestError> {
    let mut poll = Poll {
        wait: DEFAULT_WAIT,
        held: None,
    };
    let bad = |field: &str, message: String| RequestError::BadRequest {
        field: format!("query parameter {field}"),
        message,
    };
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "wait" => {
                let seconds: u64 = value.parse().map_err(|_| {
                    bad(
                        "wait",
                        format!("{value:?} is not a whole number of seconds"),
                    )
                })?;
                if seconds > MAX_WAIT_SECONDS {
                    return Err(bad(
                        "wait",
                        format!("{seconds} is over the maximum of {MAX_WAIT_SECONDS} seconds"),
                    ));
                }
                poll.wait = Duration::from_secs(seconds);
            }
            "version" => {
                poll.held =
                    Some(value.parse().map_err(|_| {
                        bad("version", format!("{value:?} is not a config version"))
                    })?);
            }
            other => return Err(bad(other, "unknown; expected wait or version".into())),
        }
    }
    Ok(poll)
}

async fn config(
    req: Request<Incoming>,
    state: &ServerState,
) -> Result<Response<Full<Bytes>>, RequestError> {
    let poll = parse_query(req.uri().query())?;
    let held_etag = match req.headers().get(header::IF_NONE_MATCH) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| RequestError::BadRequest {
            field: "header If-None-Match".into(),
            message: "not visible ASCII".into(),
        })?),
    };
    let (identity, pod) = identify(&req, state).await?;
    let namespace = identity.namespace.as_str();
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let _in_flight = state.subscribers.begin(&identity.uid);

    // Subscribe before reading, so a change between the read and the wait wakes us.
    let mut changes = state.index.subscribe();
    changes.borrow_and_update();
    let deadline = tokio::time::Instant::now() + poll.wait;
    let mut seen = 0;
    let mut recompute = true;
    loop {
        if recompute {
            let mut current = state.index.config_for(namespace, &labels);
            seen = current.config.version;
            if held_etag == Some(current.etag.as_str()) {
                state.subscribers.holds(&identity.uid, &current.policies);
            } else if current.policies.is_empty() && held_etag.is_none() {
                return Err(RequestError::NoPolicy {
                    namespace: identity.namespace,
                    name: identity.name,
                });
            } else {
                if let Some(held) = poll.held {
                    current.config.version = current.config.version.max(held + 1);
                }
                state.subscribers.holds(&identity.uid, &current.policies);
                let body = serde_json::to_vec(&current.config).unwrap_or_default();
                let mut response = json_response(StatusCode::OK, body.into());
                if let Ok(etag) = HeaderValue::from_str(&current.etag) {
                    response.headers_mut().insert(header::ETAG, etag);
                }
                return Ok(response);
            }
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
        // Every change wakes every poll; only one that can reach this pod costs a match.
        let (touched, now) = state.index.touches(seen, namespace, &labels);
        recompute = touched;
        if !touched {
            seen = now;
        }
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    if let Some(etag) = held_etag.and_then(|e| HeaderValue::from_str(e).ok()) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    Ok(response)
}

async fn load_report(
    req: Request<Incoming>,
    state: &ServerState,
) -> Result<Response<Full<Bytes>>, RequestError> {
    let (identity, pod) = identify(&req, state).await?;
    let body = read_body(req, MAX_REPORT_BYTES).await?;
    let report: LoadReport =
        serde_json::from_slice(&body).map_err(|e| RequestError::BadRequest {
            field: format!("body (line {}, column {})", e.line(), e.column()),
            message: e.to_string(),
        })?;
    crate::load_reports::validate(&report).map_err(|e| RequestError::BadRequest {
        field: "body".into(),
        message: e.to_string(),
    })?;
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let given = state.index.config_for(&identity.namespace, &labels);
    let given: Vec<&str> = given
        .policies
        .iter()
        .map(|((_, name), _)| name.as_str())
        .collect();
    if let Some((index, e)) = report
        .endpoints
        .iter()
        .enumerate()
        .find(|(_, e)| !given.contains(&e.policy.as_str()))
    {
        return Err(RequestError::NotGiven {
            index,
            pod: format!("{}/{}", identity.namespace, identity.name),
            policy: e.policy.clone(),
        });
    }
    state.load_reports.record(
        &identity.namespace,
        &identity.uid,
        &report,
        SystemTime::now(),
        |_| true,
    );
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

/// A LoadTest runner's report, authenticated by the test's token; answered with what
/// the runner must do. A runner waiting for the start is held until the start is fixed
/// or [`runner_protocol::MAX_WAIT_SECONDS`] pass.
async fn runner_report(
    req: Request<Incoming>,
    state: &ServerState,
    test: (String, String),
    index: u32,
) -> Result<Response<Full<Bytes>>, RequestError> {
    let token = bearer(&req)?.to_owned();
    // Who is asking is settled before a byte of the body is read.
    state.runs.admit(&test, index, &token)?;
    let body = read_body(req, runner_protocol::MAX_REPORT_BYTES).await?;
    let report: RunnerReport =
        serde_json::from_slice(&body).map_err(|e| RequestError::BadRequest {
            field: format!("body (line {}, column {})", e.line(), e.column()),
            message: e.to_string(),
        })?;
    let directive = match state.runs.report(&test, index, &token, report)? {
        Answer::Now(directive) => directive,
        Answer::WaitForStart(mut start) => {
            let wait = Duration::from_secs(runner_protocol::MAX_WAIT_SECONDS);
            // Either way the answer is read fresh: a start, or still none.
            let _ = tokio::time::timeout(wait, start.wait_for(Option::is_some)).await;
            state.runs.directive(&test, index)
        }
    };
    let body = serde_json::to_vec(&directive)
        .map_err(|e| RequestError::Internal(format!("encoding the directive: {e}")))?;
    Ok(json_response(StatusCode::OK, body.into()))
}

/// The bearer token of `req`.
fn bearer(req: &Request<Incoming>) -> Result<&str, AuthError> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(AuthError::Missing)
}

/// The injection webhook: the API server is the client (authenticated by TLS: only it
/// has the caBundle; the answer only ever adds the sidecar the pod asked for).
async fn mutate_pods(
    req: Request<Incoming>,
    state: &ServerState,
) -> Result<Response<Full<Bytes>>, RequestError> {
    let injector = state
        .injector
        .as_ref()
        .ok_or(RequestError::InjectionDisabled)?;
    let body = read_body(req, MAX_REVIEW_BYTES).await?;
    let review = injector
        .review(&body)
        .map_err(|e| RequestError::BadRequest {
            field: "body".into(),
            message: e.to_string(),
        })?;
    let body = serde_json::to_vec(&review)
        .map_err(|e| RequestError::Internal(format!("encoding the AdmissionReview: {e}")))?;
    Ok(json_response(StatusCode::OK, body.into()))
}

/// The body of `req`, at most `limit` bytes. Only an oversized body is a 413: a client
/// that hangs up half-way sent a bad request, not a large one.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, RequestError> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(RequestError::TooLarge { limit }),
        Err(e) => Err(RequestError::BadRequest {
            field: "body".into(),
            message: format!("the body could not be read: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_checked_and_named() {
        assert_eq!(
            parse_query(None).expect("default"),
            Poll {
                wait: DEFAULT_WAIT,
                held: None
            }
        );
        assert_eq!(
            parse_query(Some("wait=0&version=17")).expect("both"),
            Poll {
                wait: Duration::ZERO,
                held: Some(17)
            }
        );
        for (query, names) in [
            ("wait=61", "query parameter wait: 61 is over"),
            ("wait=soon", "query parameter wait: \"soon\""),
            ("version=-1", "query parameter version"),
            ("since=3", "query parameter since: unknown"),
        ] {
            let e = parse_query(Some(query)).expect_err(query).to_string();
            assert!(e.starts_with(names), "{query}: {e}");
        }
    }

    #[test]
    fn refusals_carry_their_status_and_headers() {
        let r = RequestError::Starting.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        let r = RequestError::Auth(AuthError::Missing).into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
        let r = RequestError::NoPolicy {
            namespace: "a".into(),
            name: "b".into(),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let r = RequestError::Runner(ReportError::Unknown("load/t".into())).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers().get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "a runner that reached a replica that is not the leader tries another"
        );
        let r = RequestError::Runner(ReportError::Token("load/t".into())).into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
}
