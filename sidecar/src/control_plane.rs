//! The operator's config server as a config source (`--control-plane URL`; the protocol
//! is `docs/config-server.md`). The sidecar long-polls `GET /v1/config` over HTTPS with
//! its projected service-account token, applies what it receives through the same
//! [`Sidecar::apply`] as policy files (validated; a refused config leaves the running one
//! serving; a good one is kept in `--state-dir`), and posts the ORCA load its endpoints
//! reported (`POST /v1/load-reports`) for routes whose weights come from `loadReports`.
//!
//! It fails static: while the config server cannot be reached or refuses, the last
//! config keeps serving and the poll is retried with exponential backoff and full
//! jitter. At start, a config server that does not answer within a short deadline
//! gives way to the config kept in `--state-dir` ([`config_source::serve_kept`]).
//!
//! Every poll after the first says which version the sidecar serves (`version=`), so the
//! server numbers what it sends above it, even after an operator restart or from
//! another replica. Two edges of the protocol this client decides:
//! - After a config is *refused*, the next poll sends that config's ETag in
//!   `If-None-Match`, so the server holds the poll until the config changes instead of
//!   sending the same refused config back at once, forever.
//! - After a fail-static start the sidecar holds a config whose ETag it never learnt; it
//!   sends [`kept_etag`] (an entity tag the server never issues), which says "I hold a
//!   config" and is answered at once with the current one (or, for a pod that matches
//!   no policy any more, with an empty one that closes the stale listeners).

use std::{
    collections::HashMap,
    error::Error as StdError,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri,
    header::{AUTHORIZATION, CONTENT_TYPE, ETAG, IF_NONE_MATCH},
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rand::{SeedableRng, rngs::SmallRng};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use trimtab_api::{
    balancer_policy::MetricsSource,
    sidecar_config::{EndpointLoad, LoadReport, NO_POLICY_REASON, SidecarConfig},
};

use crate::{
    config_source,
    http_client::POOL_IDLE_TIMEOUT,
    metrics::Metrics,
    retry,
    route::RouteRuntime,
    sidecar::{Shared, Sidecar},
};

/// The largest config body read (a config with thousands of endpoints is a few MiB).
pub const MAX_CONFIG_BYTES: usize = 16 * 1024 * 1024;

/// The most of a refusal's body that is read and logged.
const MAX_ERROR_BYTES: usize = 4 * 1024;

/// The longest `wait` the server accepts (`docs/config-server.md`: 0–60 s).
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Load reports are considered at least this often, so that a route whose interval
/// is long does not delay a new route with a short one by more than this.
const LOAD_REPORT_TICK_MAX: Duration = Duration::from_secs(1);

/// And at most this often, whatever a route's interval says.
const LOAD_REPORT_TICK_MIN: Duration = Duration::from_millis(100);

/// How the client paces itself. [`Timing::default`] holds the production values;
/// tests shorten them.
#[derive(Debug, Clone)]
pub struct Timing {
    /// How long the server may hold a poll when nothing changed (the `wait` query
    /// parameter, whole seconds, at most 60).
    pub wait: Duration,
    /// How long past `wait` a poll may take before it counts as lost: a half-open
    /// connection (a node gone without a FIN) would otherwise hold the poll forever.
    pub grace: Duration,
    /// At start, how long to wait for the first config before serving the kept one.
    pub start_deadline: Duration,
    /// The first retry waits up to this long; the ceiling doubles per failure.
    pub backoff_base: Duration,
    /// The ceiling of the backoff, so that a recovered server is found within it.
    pub backoff_cap: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Polls start at least this far apart even when each is answered at once: a
    /// server that ignores `wait` (or sends a new ETag every time) cannot make a
    /// thousand sidecars spin, and a real change waits at most this long.
    pub min_poll_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(30),
            grace: Duration::from_secs(15),
            // Short: the application's pod is waiting for readiness, and the kept config
            // is a good answer while the operator restarts.
            start_deadline: Duration::from_secs(5),
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            min_poll_interval: Duration::from_millis(250),
        }
    }
}

/// Why the control plane could not be used. Messages name the setting or the request
/// and never carry the token.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// `--control-plane` is not a usable https URL.
    #[error("--control-plane {url:?}: {reason}")]
    Url {
        /// The value given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--control-plane-ca` could not be read or holds no usable certificate.
    #[error("--control-plane-ca {path}: {reason}")]
    Ca {
        /// The CA bundle.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `TRIMTAB_CONTROL_PLANE_CA_PEM` holds no usable certificate.
    #[error("--control-plane-ca-pem (TRIMTAB_CONTROL_PLANE_CA_PEM): {reason}")]
    CaPem {
        /// Why.
        reason: String,
    },
    /// The token file could not be read or is not a usable token.
    #[error("--token-file {path}: {reason}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// Why (never the token itself).
        reason: String,
    },
    /// No HTTP answer: the connection or the TLS handshake failed, or it broke.
    #[error("{request}: {reason}")]
    Transport {
        /// `GET https://…/v1/config` and the like.
        request: String,
        /// `connect`, `tls` or `transport`.
        kind: &'static str,
        /// The chain of causes.
        reason: String,
    },
    /// No answer within the poll's time.
    #[error("{request}: no answer within {after:?}")]
    Timeout {
        /// The request.
        request: String,
        /// How long it waited.
        after: Duration,
    },
    /// The server refused the request.
    #[error("{request}: {status}: {message}")]
    Refused {
        /// The request.
        request: String,
        /// The answer's status.
        status: StatusCode,
        /// The server's `{"error": …}` (or the start of its body).
        message: String,
        /// The server's machine-readable `reason`, when it gave one.
        reason: Option<String>,
        /// How long the server asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// A 200 whose body is not a sidecar config.
    #[error("{request}: the config is not valid JSON at line {line}, column {column}: {message}")]
    Malformed {
        /// The request.
        request: String,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// An answer the protocol does not allow (a 200 without an ETag, an oversized body…).
    #[error("{request}: {reason}")]
    Protocol {
        /// The request.
        request: String,
        /// What was unexpected.
        reason: String,
    },
}

impl ControlPlaneError {
    /// The `kind` label of `trimtab_control_plane_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Url { .. } | Self::Ca { .. } | Self::CaPem { .. } => "settings",
            Self::Token { .. } => "token",
            Self::Transport { kind, .. } => kind,
            Self::Timeout { .. } => "timeout",
            Self::Refused { status, .. } => match *status {
                StatusCode::UNAUTHORIZED => "unauthorized",
                StatusCode::FORBIDDEN => "forbidden",
                StatusCode::SERVICE_UNAVAILABLE => "unavailable",
                _ => "status",
            },
            Self::Malformed { .. } => "malformed",
            Self::Protocol { .. } => "protocol",
        }
    }

    /// Whether the config server knows this pod and has no policy for it: not a
    /// failure of the control plane, but an authoritative empty config.
    pub fn is_no_policy(&self) -> bool {
        matches!(self, Self::Refused { status, reason, .. }
            if *status == StatusCode::FORBIDDEN && reason.as_deref() == Some(NO_POLICY_REASON))
    }

    /// The wait the server asked for, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What one poll brought.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    /// A config (200), with the ETag to send next time (`None` if the server sent none).
    Changed {
        /// The config, parsed but not yet validated.
        config: SidecarConfig,
        /// The `ETag` header, verbatim.
        etag: Option<String>,
    },
    /// Nothing changed within `wait` (304).
    Unchanged,
}

/// What the poll loop carries from one poll to the next.
#[derive(Debug, Default, Clone)]
pub struct Following {
    /// Sent as `If-None-Match`: the ETag of the last config received, applied or not.
    pub etag: Option<String>,
    /// Consecutive failed polls; the next poll first waits a backoff when non-zero.
    pub failures: u32,
    /// The server's `Retry-After` from the last failure.
    pub retry_after: Option<Duration>,
}

/// The entity tag sent after a fail-static start: the sidecar holds config `version`
/// but not its ETag. The server never issues it, so it never matches.
pub fn kept_etag(version: u64) -> String {
    format!("\"trimtab-kept-v{version}\"")
}

/// An HTTPS client of the operator.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A pooled HTTPS client that trusts `anchors`, for the operator's endpoints: the
/// config server here (HTTP/1.1 or h2), the LoadTest runner endpoint in the bots
/// (HTTP/1.1 only, `h2: false`, so that a replica that is not the leader can close the
/// connection and the next try reaches another one).
pub fn https_client(
    anchors: &TrustAnchors,
    connect_timeout: Duration,
    h2: bool,
) -> Result<HttpsClient, ControlPlaneError> {
    let tls = tls_config(anchors)?;
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1();
    let https = if h2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(https))
}

/// The CA certificates that may sign the config server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustAnchors {
    /// A PEM bundle file (`--control-plane-ca`).
    File(PathBuf),
    /// PEM text (`TRIMTAB_CONTROL_PLANE_CA_PEM`, what the injector sets).
    Pem(String),
}

/// The client of the operator's config server.
#[derive(Debug)]
pub struct ControlPlane {
    /// `https://host:port` plus any path prefix, without a trailing slash.
    base: String,
    token_file: PathBuf,
    client: HttpsClient,
    timing: Timing,
    metrics: Metrics,
}

impl ControlPlane {
    /// A client of the config server at `url` (https), trusting the CA certificates in
    /// `ca_file` and sending the token in `token_file`. Fails on a URL or CA bundle that
    /// can never work: those are settings errors, not outages.
    pub fn new(
        url: &str,
        ca_file: &Path,
        token_file: PathBuf,
        timing: Timing,
        metrics: Metrics,
    ) -> Result<Self, ControlPlaneError> {
        Self::with_trust_anchors(
            url,
            &TrustAnchors::File(ca_file.to_owned()),
            token_file,
            timing,
            metrics,
        )
    }

    /// As [`ControlPlane::new`], with the CA certificates from a file or PEM text.
    pub fn with_trust_anchors(
        url: &str,
        anchors: &TrustAnchors,
        token_file: PathBuf,
        timing: Timing,
        metrics: Metrics,
    ) -> Result<Self, ControlPlaneError> {
        let base = base_url(url)?;
        let client = https_client(anchors, timing.connect_timeout, true)?;
        Ok(Self {
            base,
            token_file,
            client,
            timing,
            metrics,
        })
    }

    /// Gets the first config: the config server's if it answers within
    /// `start_deadline`, else the one kept in `--state-dir`. Returns what the poll loop
    /// ([`Self::follow`]) starts from.
    pub async fn start(&self, sidecar: &Sidecar) -> Following {
        let mut following = Following::default();
        let first = tokio::time::timeout(
            self.timing.start_deadline,
            self.fetch_config(None, None, Duration::ZERO),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ControlPlaneError::Timeout {
                request: self.describe(&Method::GET, "/v1/config"),
                after: self.timing.start_deadline,
            })
        });
        match first {
            Ok(fetched) => {
                self.metrics.control_plane_connected.set(1);
                self.take(sidecar, &mut following, fetched).await;
            }
            Err(e) if e.is_no_policy() => {
                self.metrics.control_plane_connected.set(1);
                self.serve_no_routes(sidecar, &e).await;
                following.failures = 1;
            }
            Err(e) => {
                self.metrics.control_plane_connected.set(0);
                self.count(&e);
                tracing::warn!(error = %e, "no config from the control plane at start; trying the kept config");
                following.failures = 1;
                following.retry_after = e.retry_after();
            }
        }
        if !sidecar.shared().is_ready() && config_source::serve_kept(sidecar).await {
            following
                .etag
                .get_or_insert_with(|| kept_etag(sidecar.version()));
        }
        following
    }

    /// Long-polls the config server until `cancel`, applying every config it sends.
    /// Failures keep the running config serving and are retried with backoff.
    pub async fn follow(
        self: Arc<Self>,
        sidecar: Arc<Sidecar>,
        mut following: Following,
        cancel: CancellationToken,
    ) {
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let mut last_poll: Option<Instant> = None;
        loop {
            if let Some(last) = last_poll {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until((last + self.timing.min_poll_interval).into()) => {}
                }
            }
            if following.failures > 0 {
                let jittered = retry::backoff(
                    following.failures - 1,
                    self.timing.backoff_base,
                    self.timing.backoff_cap,
                    &mut rng,
                );
                // The server's Retry-After is a floor, still under our own cap.
                let wait = following.retry_after.map_or(jittered, |after| {
                    after.min(self.timing.backoff_cap).max(jittered)
                });
                tracing::debug!(
                    ?wait,
                    failures = following.failures,
                    "polling the control plane again after a backoff"
                );
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            last_poll = Some(Instant::now());
            let held = Some(sidecar.version()).filter(|&v| v > 0);
            let polled = tokio::select! {
                _ = cancel.cancelled() => return,
                polled = self.fetch_config(following.etag.as_deref(), held, self.timing.wait) => polled,
            };
            match polled {
                Ok(fetched) => {
                    self.metrics.control_plane_connected.set(1);
                    following.failures = 0;
                    following.retry_after = None;
                    let changed = matches!(fetched, Fetched::Changed { .. });
                    self.take(&sidecar, &mut following, fetched).await;
                    if changed && following.etag.is_none() {
                        // Without an ETag the next poll would be answered at once, again
                        // and again: pace it like a failure.
                        let e = ControlPlaneError::Protocol {
                            request: self.describe(&Method::GET, "/v1/config"),
                            reason: "a 200 without an ETag header; the next poll cannot wait for a change".into(),
                        };
                        self.count(&e);
                        tracing::warn!(error = %e, "control plane answer out of protocol");
                        following.failures = 1;
                    }
                }
                Err(e) if e.is_no_policy() => {
                    // Asked again after the usual backoff (up to its cap): a policy
                    // created for this pod later arrives within that.
                    self.metrics.control_plane_connected.set(1);
                    self.serve_no_routes(&sidecar, &e).await;
                    following.failures = following.failures.saturating_add(1);
                    following.retry_after = None;
                }
                Err(e) => {
                    self.metrics.control_plane_connected.set(0);
                    self.count(&e);
                    tracing::warn!(error = %e, failures = following.failures + 1, "control plane poll failed; the running config keeps serving");
                    following.failures = following.failures.saturating_add(1);
                    following.retry_after = e.retry_after();
                }
            }
        }
    }

    /// The control plane has no policy for this pod: serve none (and be ready: a pod
    /// that asked for the sidecar but matches no policy yet must still start).
    async fn serve_no_routes(&self, sidecar: &Sidecar, e: &ControlPlaneError) {
        let snapshot = sidecar.shared().snapshot();
        if snapshot
            .config
            .as_ref()
            .is_some_and(|c| c.routes.is_empty())
        {
            return;
        }
        let empty = SidecarConfig {
            version: sidecar.version(),
            routes: Vec::new(),
        };
        match sidecar.apply(empty).await {
            Ok(()) => {
                tracing::info!(reason = %e, "no policy selects this pod; serving no routes until one does")
            }
            Err(e) => tracing::error!(error = %e, "could not withdraw the routes"),
        }
    }

    /// Applies a fetched config (unless it is the one already served) and remembers its
    /// ETag whether applied or refused (see the module doc).
    async fn take(&self, sidecar: &Sidecar, following: &mut Following, fetched: Fetched) {
        let Fetched::Changed { config, etag } = fetched else {
            return;
        };
        following.etag = etag;
        if sidecar.shared().snapshot().config.as_ref() == Some(&config) {
            tracing::debug!(
                version = config.version,
                "the control plane sent the config already served"
            );
            return;
        }
        let version = config.version;
        match sidecar.apply(config).await {
            Ok(()) => {
                self.metrics
                    .control_plane_updates
                    .with_label_values(&["applied"])
                    .inc();
                tracing::info!(version, "config from the control plane applied");
            }
            Err(e) => {
                self.metrics
                    .control_plane_updates
                    .with_label_values(&["refused"])
                    .inc();
                tracing::error!(version, error = %e, "config from the control plane refused; the running config keeps serving");
            }
        }
    }

    /// One `GET /v1/config?wait=…&version=…`, sending `etag` as `If-None-Match` and
    /// `held`, the version being served, so that the answer is numbered above it.
    pub async fn fetch_config(
        &self,
        etag: Option<&str>,
        held: Option<u64>,
        wait: Duration,
    ) -> Result<Fetched, ControlPlaneError> {
        let wait = wait.min(MAX_WAIT);
        let mut path = format!("/v1/config?wait={}", wait.as_secs());
        if let Some(version) = held {
            path.push_str(&format!("&version={version}"));
        }
        let request_name = self.describe(&Method::GET, "/v1/config");
        let mut request = self.request(Method::GET, &path, Bytes::new()).await?;
        if let Some(value) = etag.and_then(|e| HeaderValue::from_str(e).ok()) {
            request.headers_mut().insert(IF_NONE_MATCH, value);
        }
        let deadline = wait + self.timing.grace;
        let exchange = async {
            let response = self.send(request, &request_name).await?;
            match response.status() {
                StatusCode::OK => {
                    let etag = response
                        .headers()
                        .get(ETAG)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let body = read_body(response, MAX_CONFIG_BYTES)
                        .await
                        .map_err(|reason| ControlPlaneError::Protocol {
                            request: request_name.clone(),
                            reason,
                        })?;
                    let config = parse_config(&body).map_err(|e| ControlPlaneError::Malformed {
                        request: request_name.clone(),
                        line: e.line(),
                        column: e.column(),
                        message: e.to_string(),
                    })?;
                    Ok(Fetched::Changed { config, etag })
                }
                StatusCode::NOT_MODIFIED => Ok(Fetched::Unchanged),
                _ => Err(refusal(&request_name, response).await),
            }
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(ControlPlaneError::Timeout {
                    request: request_name.clone(),
                    after: deadline,
                })
            })
    }

    /// One `POST /v1/load-reports`; `204` (any 2xx) is success.
    pub async fn send_load_report(&self, report: &LoadReport) -> Result<(), ControlPlaneError> {
        let request_name = self.describe(&Method::POST, "/v1/load-reports");
        let body = serde_json::to_vec(report).map_err(|e| ControlPlaneError::Protocol {
            request: request_name.clone(),
            reason: format!("the report does not serialize: {e}"),
        })?;
        let mut request = self
            .request(Method::POST, "/v1/load-reports", Bytes::from(body))
            .await?;
        request
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let exchange = async {
            let response = self.send(request, &request_name).await?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(refusal(&request_name, response).await)
            }
        };
        tokio::time::timeout(self.timing.grace, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(ControlPlaneError::Timeout {
                    request: request_name.clone(),
                    after: self.timing.grace,
                })
            })
    }

    /// Posts, every `weighting.interval` of each route whose `weighting.source` is
    /// `loadReports`, the ORCA load its endpoints reported in that window, until
    /// `cancel`. Windows without a report are not posted. A failed post is logged and
    /// counted and its window dropped: the next window carries fresh load, and traffic
    /// never waits for the control plane.
    pub async fn report_loads(self: Arc<Self>, shared: Arc<Shared>, cancel: CancellationToken) {
        let mut window_start: HashMap<String, Instant> = HashMap::new();
        loop {
            let snapshot = shared.snapshot();
            let routes: Vec<&Arc<RouteRuntime>> = snapshot
                .routes
                .values()
                .filter(|r| r.config.weighting.source == MetricsSource::LoadReports)
                .collect();
            window_start.retain(|id, _| routes.iter().any(|r| &r.id == id));
            let now = Instant::now();
            for route in &routes {
                let started = *window_start.entry(route.id.clone()).or_insert(now);
                let window = now.saturating_duration_since(started);
                // A zero window would be refused (`windowSeconds` must be positive).
                if window.is_zero() || window < route.config.weighting.interval.get() {
                    continue;
                }
                window_start.insert(route.id.clone(), now);
                let Some(report) = take_load_report(route, window) else {
                    continue;
                };
                let sent = tokio::select! {
                    _ = cancel.cancelled() => return,
                    sent = self.send_load_report(&report) => sent,
                };
                match sent {
                    Ok(()) => {
                        self.metrics.load_reports.with_label_values(&["sent"]).inc();
                        tracing::debug!(route = %route.id, endpoints = report.endpoints.len(), "load report sent");
                    }
                    Err(e) => {
                        self.metrics
                            .load_reports
                            .with_label_values(&["failed"])
                            .inc();
                        self.count(&e);
                        tracing::warn!(route = %route.id, error = %e, "load report not delivered; its window is dropped");
                    }
                }
            }
            let tick = routes
                .iter()
                .map(|r| r.config.weighting.interval.get())
                .min()
                .unwrap_or(LOAD_REPORT_TICK_MAX)
                .clamp(LOAD_REPORT_TICK_MIN, LOAD_REPORT_TICK_MAX);
            drop(routes);
            drop(snapshot);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }

    /// Counts a failure by kind. The connected gauge is the poll's alone: a refused load
    /// report says nothing about whether configs arrive.
    fn count(&self, e: &ControlPlaneError) {
        self.metrics
            .control_plane_errors
            .with_label_values(&[e.kind()])
            .inc();
    }

    fn describe(&self, method: &Method, path: &str) -> String {
        format!("{method} {}{path}", self.base)
    }

    /// A request to `path` carrying the token as it is in the file now: the kubelet
    /// rotates projected tokens, so it is read for every request.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ControlPlaneError> {
        let token_error = |reason: String| ControlPlaneError::Token {
            path: self.token_file.clone(),
            reason,
        };
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| token_error(format!("cannot read: {e}")))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(token_error("is empty".into()));
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| token_error("holds characters not allowed in an HTTP header".into()))?;
        authorization.set_sensitive(true);
        let uri: Uri =
            format!("{}{path}", self.base)
                .parse()
                .map_err(|e| ControlPlaneError::Url {
                    url: format!("{}{path}", self.base),
                    reason: format!("{e}"),
                })?;
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        request.headers_mut().insert(AUTHORIZATION, authorization);
        Ok(request)
    }

    async fn send(
        &self,
        request: Request<Full<Bytes>>,
        request_name: &str,
    ) -> Result<Response<Incoming>, ControlPlaneError> {
        self.client
            .request(request)
            .await
            .map_err(|e| ControlPlaneError::Transport {
                request: request_name.to_owned(),
                kind: transport_kind(&e),
                reason: causes(&e),
            })
    }
}

/// The load report of one route for a window of `window`, draining its endpoints'
/// windows; `None` when no endpoint reported any load (nothing is posted then).
pub fn take_load_report(route: &RouteRuntime, window: Duration) -> Option<LoadReport> {
    let endpoints: Vec<EndpointLoad> = route
        .endpoints
        .iter()
        .filter_map(|endpoint| {
            let totals = endpoint.load_window.take();
            (totals.reports > 0).then(|| EndpointLoad {
                policy: route.config.name.clone(),
                address: endpoint.address.clone(),
                utilization: totals.mean_utilization(),
                requests: totals.reports,
                errors: totals.errors,
            })
        })
        .collect();
    if endpoints.is_empty() {
        return None;
    }
    Some(LoadReport {
        window_seconds: window.as_secs_f64(),
        endpoints,
    })
}

/// A sidecar config from a 200's body. Its errors carry the line and column.
pub fn parse_config(body: &[u8]) -> Result<SidecarConfig, serde_json::Error> {
    serde_json::from_slice(body)
}

/// `url` checked and reduced to the base that request paths are appended to
/// (`https://host:port[/prefix]`, without a trailing slash).
pub fn base_url(url: &str) -> Result<String, ControlPlaneError> {
    let url_error = |reason: &str| ControlPlaneError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|e| ControlPlaneError::Url {
        url: url.to_owned(),
        reason: format!("not a URL: {e}"),
    })?;
    if uri.scheme_str() != Some("https") {
        return Err(url_error(
            "expected an https:// URL (the config server carries tokens; it serves TLS only)",
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(url_error(
            "expected a host, as in https://trimtab-operator.trimtab-system.svc:8443",
        ));
    };
    if uri.query().is_some() {
        return Err(url_error("expected no query string"));
    }
    let prefix = uri.path().trim_end_matches('/');
    Ok(format!("https://{authority}{prefix}"))
}

/// The trust anchors for the config server: every certificate in the PEM bundle.
fn tls_config(anchors: &TrustAnchors) -> Result<rustls::ClientConfig, ControlPlaneError> {
    let ca_error = |reason: String| match anchors {
        TrustAnchors::File(path) => ControlPlaneError::Ca {
            path: path.clone(),
            reason,
        },
        TrustAnchors::Pem(_) => ControlPlaneError::CaPem { reason },
    };
    let mut roots = RootCertStore::empty();
    let certificates: Vec<_> = match anchors {
        TrustAnchors::File(path) => CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_error(format!("cannot read: {e}")))?
            .collect(),
        TrustAnchors::Pem(text) => CertificateDer::pem_slice_iter(text.as_bytes()).collect(),
    };
    for (i, certificate) in certificates.into_iter().enumerate() {
        let certificate =
            certificate.map_err(|e| ca_error(format!("certificate {}: {e}", i + 1)))?;
        roots.add(certificate).map_err(|e| {
            ca_error(format!(
                "certificate {} is not usable as a trust anchor: {e}",
                i + 1
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(ca_error(
            "holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_error(format!("no TLS version available: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `tls` when TLS failed (an untrusted certificate, a handshake the server broke off),
/// `connect` when no connection was made, `transport` when an open one broke.
fn transport_kind(e: &hyper_util::client::legacy::Error) -> &'static str {
    if chain(e).any(|cause| cause.is::<rustls::Error>()) {
        "tls"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    }
}

/// An error and its causes. An `io::Error`'s `source()` skips the error it wraps (it
/// returns that error's source), and hyper-rustls wraps rustls' errors in two of them,
/// so the wrapped error is followed instead.
fn chain<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |&error: &&'a (dyn StdError + 'static)| match error
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        Some(inner) => Some(inner as &(dyn StdError + 'static)),
        None => error.source(),
    })
}

/// An error and its causes, `a: b: c` (hyper's own messages say little on their own).
fn causes(e: &(dyn StdError + 'static)) -> String {
    let mut out = String::new();
    for cause in chain(e) {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// At most `limit` bytes of a response's body (the config server's, the runner
/// endpoint's).
pub(crate) async fn read_body(response: Response<Incoming>, limit: usize) -> Result<Bytes, String> {
    Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|e| format!("the body could not be read (limit {limit} bytes): {e}"))
}

/// The server's refusal: its `{"error": …}` message and any `Retry-After`.
async fn refusal(request: &str, response: Response<Incoming>) -> ControlPlaneError {
    #[derive(Deserialize)]
    struct Refusal {
        error: String,
        #[serde(default)]
        reason: Option<String>,
    }
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let body = read_body(response, MAX_ERROR_BYTES)
        .await
        .unwrap_or_default();
    let (message, reason) = match serde_json::from_slice::<Refusal>(&body) {
        Ok(refusal) => (refusal.error, refusal.reason),
        Err(_) if body.is_empty() => ("(no body)".to_owned(), None),
        Err(_) => (
            String::from_utf8_lossy(&body).chars().take(200).collect(),
            None,
        ),
    };
    ControlPlaneError::Refused {
        request: request.to_owned(),
        status,
        message,
        reason,
        retry_after,
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    retry::retry_after(headers, SystemTime::now(), MAX_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_an_https_url_and_keeps_its_path_prefix() {
        assert_eq!(
            base_url("https://trimtab-operator.trimtab-system.svc:8443").expect("valid"),
            "https://trimtab-operator.trimtab-system.svc:8443"
        );
        assert_eq!(
            base_url("https://127.0.0.1:8443/trimtab/").expect("valid"),
            "https://127.0.0.1:8443/trimtab"
        );
    }

    #[test]
    fn refuses_a_plain_http_url_naming_the_flag() {
        let err = base_url("http://op:8443").expect_err("not https");
        assert!(
            err.to_string()
                .starts_with("--control-plane \"http://op:8443\": expected an https:// URL"),
            "{err}"
        );
        assert!(base_url("op:8443").is_err());
        assert!(base_url("https://op:8443/?x=1").is_err());
    }

    #[test]
    fn names_the_position_of_malformed_json() {
        let err = parse_config(b"{\"version\": 3,\n \"routes\": [}").expect_err("malformed");
        assert_eq!((err.line(), err.column()), (2, 13));
    }

    #[test]
    fn a_ca_bundle_without_certificates_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ca.crt");
        std::fs::write(&file, "not a certificate\n").expect("written");
        let err = tls_config(&TrustAnchors::File(file.clone())).expect_err("no certificate");
        assert!(
            err.to_string().starts_with("--control-plane-ca ")
                && err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
        let err =
            tls_config(&TrustAnchors::File(dir.path().join("missing.crt"))).expect_err("missing");
        assert!(err.to_string().contains("cannot read"), "{err}");
    }

    #[test]
    fn a_ca_given_as_pem_text_is_read_and_an_empty_one_refused_naming_the_variable() {
        let made = rcgen::generate_simple_self_signed(vec!["op".to_owned()]).expect("cert");
        assert!(tls_config(&TrustAnchors::Pem(made.cert.pem())).is_ok());
        let err = tls_config(&TrustAnchors::Pem("not pem".into())).expect_err("no certificate");
        assert!(
            err.to_string()
                .starts_with("--control-plane-ca-pem (TRIMTAB_CONTROL_PLANE_CA_PEM): holds no PEM"),
            "{err}"
        );
    }

    #[test]
    fn kept_etags_are_quoted_entity_tags() {
        assert_eq!(kept_etag(7), "\"trimtab-kept-v7\"");
    }

    #[test]
    fn error_kinds_name_the_refusal() {
        let refused = |status| ControlPlaneError::Refused {
            request: "GET x".into(),
            status,
            message: String::new(),
            reason: None,
            retry_after: None,
        };
        assert_eq!(refused(StatusCode::UNAUTHORIZED).kind(), "unauthorized");
        assert_eq!(refused(StatusCode::FORBIDDEN).kind(), "forbidden");
        assert_eq!(
            refused(StatusCode::SERVICE_UNAVAILABLE).kind(),
            "unavailable"
        );
        assert_eq!(refused(StatusCode::BAD_GATEWAY).kind(), "status");
    }
}
