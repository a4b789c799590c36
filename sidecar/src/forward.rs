//! Forwarding one request: pick an endpoint, rewrite the headers a proxy must rewrite,
//! send it over the pooled client, retry what may be retried, and answer with the
//! endpoint's response (streamed) or with an error that says which endpoint failed
//! and how.

use std::{
    convert::Infallible,
    error::Error as StdError,
    io,
    net::{IpAddr, SocketAddr},
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode,
    header::{self, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, Entry, HOST, UPGRADE},
    request::Parts,
};
use http_body_util::{BodyExt, Empty, Full, Limited, combinators::UnsyncBoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use rand::{RngCore as _, SeedableRng, rngs::SmallRng};
use tokio::{io::AsyncWriteExt as _, task::coop, time::Sleep};
use trimtab_api::balancer_policy::MetricsSource;

use crate::{
    balancer::weights::{ORCA_HEADER, parse_orca},
    http_client::{
        Additions, ClientError, PooledBody,
        framing::{HOP_BY_HOP, named_by_connection},
    },
    outlier::Outcome,
    retry::{self, Failure},
    route::{Endpoint, Indices, NoEndpoint, RouteRuntime, millis_at},
    sidecar::Shared,
};

/// Errors of bodies in flight.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The body type of every request and response the proxy sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// An endpoint's response, whose connection returns to the pool when the body ends.
type EndpointResponse = Response<PooledBody>;

/// Idle keep-alive connections kept per endpoint (nginx's `keepalive` directive); more
/// are closed as their responses end.
pub const MAX_IDLE_PER_ENDPOINT: usize = 1024;

/// Request bodies up to this size are buffered so that the request can be retried;
/// larger or chunked bodies stream through and are sent once (Envoy's
/// `per_request_buffer_limit_bytes` plays the same role).
pub const RETRY_BUFFER_LIMIT: u64 = 64 * 1024;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The client end of one accepted connection. The header values that name it are
/// formatted once per connection: formatting them per request was a measurable share of
/// the proxy's CPU (docs/benchmarks.md, "Sidecar proxy overhead").
#[derive(Debug)]
pub struct Peer {
    /// The client's IP as `X-Forwarded-For` carries it.
    forwarded_ip: HeaderValue,
    /// `for=…` as `Forwarded` carries it (RFC 7239 §6: IPv6 bracketed and quoted).
    forwarded_node: String,
    /// `Forwarded` for a request without a Host.
    forwarded_without_host: HeaderValue,
    /// What the last request's Host gave. A connection's requests nearly always carry
    /// the same Host, and deriving these from it (building and checking `Forwarded`,
    /// parsing the Host as an address) was a tenth of the proxy's own instructions per
    /// request. An `ArcSwap`, not a lock: HTTP/2 serves a connection's requests in
    /// parallel, and the request path takes no locks.
    last_host: ArcSwapOption<HostFields>,
    /// The request timer, kept between the connection's requests. Moving a registered
    /// timer's deadline later is one atomic operation; a timer per request was put in
    /// the runtime's timer wheel and taken out of it again, each time under the
    /// wheel's lock (0.8k of 20k instructions per request). A slot rather than a
    /// field: HTTP/2 serves a connection's requests in parallel, and a request that
    /// finds the slot empty makes a timer of its own.
    timer: ArrayQueue<Pin<Box<Sleep>>>,
}

/// The fields a request's Host gives it on its way to an endpoint.
#[derive(Debug)]
struct HostFields {
    host: HeaderValue,
    /// `Forwarded: for=…;host="…";proto=http`.
    forwarded: HeaderValue,
    /// The Host names the sidecar itself (`127.0.0.1:15001`), not the service.
    loopback: bool,
}

impl Peer {
    /// The peer of a connection accepted from `address`.
    pub fn new(address: SocketAddr) -> Self {
        let ip = address.ip();
        let forwarded_node = format!("for={}", forwarded_node(ip));
        Self {
            // An IP address's text is always a valid header value.
            forwarded_ip: HeaderValue::from_str(&ip.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            forwarded_without_host: HeaderValue::from_str(&format!("{forwarded_node};proto=http"))
                .unwrap_or_else(|_| HeaderValue::from_static("proto=http")),
            forwarded_node,
            last_host: ArcSwapOption::empty(),
            timer: ArrayQueue::new(1),
        }
    }

    /// Runs `request` for at most `limit`: `None` when the time ran out first.
    async fn within<F: Future>(
        &self,
        limit: Duration,
        mut request: Pin<&mut F>,
    ) -> Option<F::Output> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut timer = match self.timer.pop() {
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let outcome = std::future::poll_fn(|cx| {
            // As `tokio::time::timeout` does: the request first, and the timer even when
            // the request used up the task's budget, or a request that always does so
            // would never time out.
            let had_budget = coop::has_budget_remaining();
            if let Poll::Ready(output) = request.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            let expired = if had_budget && !coop::has_budget_remaining() {
                pin!(coop::unconstrained(std::future::poll_fn(|cx| {
                    timer.as_mut().poll(cx)
                })))
                .poll(cx)
            } else {
                timer.as_mut().poll(cx)
            };
            expired.map(|()| None)
        })
        .await;
        // A full slot holds a parallel request's timer; this one is dropped.
        let _ = self.timer.push(timer);
        outcome
    }

    /// The fields `host` gives, from the last request's when its Host was the same.
    fn host_fields(&self, host: &HeaderValue) -> Option<Arc<HostFields>> {
        if let Some(last) = &*self.last_host.load()
            && last.host == host
        {
            return Some(Arc::clone(last));
        }
        let text = host.to_str().ok()?;
        let mut forwarded = String::with_capacity(self.forwarded_node.len() + text.len() + 20);
        forwarded.push_str(&self.forwarded_node);
        forwarded.push_str(";host=\"");
        if text.contains(['"', '\\']) {
            forwarded.extend(text.chars().filter(|c| !matches!(c, '"' | '\\')));
        } else {
            forwarded.push_str(text);
        }
        forwarded.push_str("\";proto=http");
        let fields = Arc::new(HostFields {
            host: host.clone(),
            forwarded: HeaderValue::from_str(&forwarded).ok()?,
            loopback: is_loopback_host(text),
        });
        self.last_host.store(Some(Arc::clone(&fields)));
        Some(fields)
    }
}

/// Serves one request that arrived on the listener of `port`.
pub async fn serve(
    shared: Arc<Shared>,
    port: u16,
    peer: Arc<Peer>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let Some(route) = shared.route(port) else {
        return Ok(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no route listens on port {port} in the current config"),
        ));
    };
    Ok(forward(&shared, route, &peer, req).await)
}

async fn forward(
    shared: &Shared,
    route: Arc<RouteRuntime>,
    peer: &Peer,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let in_flight = InFlight::new(Arc::clone(&route));
    let max_body = shared.max_request_body;
    if let Some(length) = content_length(req.headers())
        && length > max_body
    {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body of {length} bytes exceeds the limit of {max_body} bytes"),
        );
    }
    let upgrade = is_upgrade(req.headers()).then(|| {
        (
            req.headers().get(UPGRADE).cloned(),
            hyper::upgrade::on(&mut req),
        )
    });
    let (mut parts, body) = req.into_parts();
    let additions = prepare_request_headers(
        &mut parts,
        peer,
        upgrade.as_ref().and_then(|(u, _)| u.clone()),
    );

    let replayable = upgrade.is_none()
        && retry::may_retry_method(&parts.method, &route.config.retries)
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= RETRY_BUFFER_LIMIT);
    // Most requests have no body: nothing to read, buffer or box.
    let mut body = if body.is_end_stream() {
        if replayable {
            RequestBody::Replayable(Bytes::new())
        } else {
            RequestBody::Streaming(Some(empty_body()))
        }
    } else if replayable {
        match Limited::new(body, RETRY_BUFFER_LIMIT as usize)
            .collect()
            .await
        {
            Ok(collected) => RequestBody::Replayable(collected.to_bytes()),
            Err(e) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    format!("the request body could not be read: {e}"),
                );
            }
        }
    } else {
        let limited = Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX));
        RequestBody::Streaming(Some(limited.boxed_unsync()))
    };

    let last_tried = AtomicUsize::new(usize::MAX);
    let request_timeout = route.config.timeouts.request.get();
    // Pinned where it is: moving this future (it holds the whole exchange's state)
    // into a timeout was a kilobyte-sized copy per request.
    let mut attempts = pin!(attempt_all(
        &route,
        &parts,
        &additions,
        &mut body,
        &last_tried
    ));
    let outcome = if request_timeout.is_zero() {
        Some(attempts.await)
    } else {
        peer.within(request_timeout, attempts.as_mut()).await
    };
    let attempt = match outcome {
        Some(attempt) => attempt,
        None => {
            let index = last_tried.load(Ordering::Relaxed);
            let endpoint = route.endpoints.get(index).map_or_else(
                || "none".to_owned(),
                |e| {
                    // A request that timed out on an endpoint counts against it, as a
                    // 5xx does (Envoy counts timeouts as gateway failures).
                    e.metrics.count(StatusCode::GATEWAY_TIMEOUT.as_u16());
                    route.record_outcome(index, Outcome::Failure);
                    e.address.clone()
                },
            );
            return error_response(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "no response within timeouts.request ({}) for route {}; last endpoint tried: {endpoint}",
                    route.config.timeouts.request, route.id
                ),
            );
        }
    };
    match attempt {
        Attempted::Response { response, load } => {
            finish(response, in_flight, load, upgrade.map(|(_, on)| on))
        }
        Attempted::Failed(response) => response,
    }
}

enum RequestBody {
    Replayable(Bytes),
    Streaming(Option<ProxyBody>),
}

impl RequestBody {
    fn take(&mut self) -> ProxyBody {
        match self {
            // `Empty` has no size, so boxing it allocates nothing.
            Self::Replayable(bytes) if bytes.is_empty() => empty_body(),
            Self::Replayable(bytes) => Full::new(bytes.clone())
                .map_err(|never| match never {})
                .boxed_unsync(),
            Self::Streaming(body) => body.take().unwrap_or_else(empty_body),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Self::Replayable(_))
    }
}

enum Attempted {
    Response {
        response: EndpointResponse,
        load: LoadGuard,
    },
    Failed(Response<ProxyBody>),
}

/// The attempt loop: first try plus retries within the budget.
async fn attempt_all(
    route: &Arc<RouteRuntime>,
    parts: &Parts,
    additions: &Additions,
    body: &mut RequestBody,
    last_tried: &AtomicUsize,
) -> Attempted {
    let cfg = &route.config.retries;
    // Seeded from the thread's generator by one draw: filling a whole seed from it
    // cost more than the rest of the pick.
    let mut rng = SmallRng::seed_from_u64(rand::rng().next_u64());
    let mut tried = Indices::new();
    let mut retries = 0_u32;
    let mut _retry_guard: Option<RetryGuard> = None;
    loop {
        // One reading of the clock before the attempt and one after serve the pick,
        // the RTT and outlier detection.
        let started = Instant::now();
        let index = match route.pick_at(&tried, &mut rng, started) {
            Ok(i) => i,
            Err(NoEndpoint::NoneUsable { total }) => {
                return Attempted::Failed(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "route {} has no usable endpoint ({total} configured; the others are ejected or unhealthy)",
                        route.id
                    ),
                ));
            }
            Err(NoEndpoint::Saturated { usable, limit }) => {
                return Attempted::Failed(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "all {usable} usable endpoints of route {} are at limits.maxConcurrentRequests ({limit} requests in flight each)",
                        route.id
                    ),
                ));
            }
        };
        tried.push(index);
        last_tried.store(index, Ordering::Relaxed);
        let endpoint = Arc::clone(&route.endpoints[index]);
        let load = LoadGuard::new(Arc::clone(&endpoint));
        let result = endpoint
            .pool
            .send_parts(
                parts,
                additions,
                body.take(),
                route.config.timeouts.connect.get(),
            )
            .await;
        let finished = Instant::now();
        let finished_ms = millis_at(finished);
        let elapsed = finished.saturating_duration_since(started);
        let failure = match result {
            Ok(response) => {
                let status = response.status().as_u16();
                endpoint.load.observe_rtt_at(elapsed, finished);
                endpoint.metrics.latency.observe(elapsed.as_secs_f64());
                endpoint.metrics.count(status);
                if let Some(report) = response
                    .headers()
                    .get(ORCA_HEADER)
                    .and_then(|v| v.to_str().ok())
                {
                    match parse_orca(report) {
                        Ok(report) => {
                            endpoint.record_load_report(&report, finished_ms);
                            if route.config.weighting.source == MetricsSource::LoadReports {
                                endpoint
                                    .load_window
                                    .record(report.utilization(), status >= 500);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(endpoint = %endpoint.address, error = %e, "ignored load report")
                        }
                    }
                }
                let outcome = if status >= 500 {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                route.record_outcome_at(index, outcome, finished_ms);
                let failure = Failure::Status(status);
                if !may_retry(route, body, retries, failure) {
                    return Attempted::Response { response, load };
                }
                let wait = retry::retry_after(
                    response.headers(),
                    SystemTime::now(),
                    cfg.max_backoff.get(),
                );
                drop(response);
                (failure, wait)
            }
            Err(error) => {
                endpoint.metrics.count(StatusCode::BAD_GATEWAY.as_u16());
                route.record_outcome_at(index, Outcome::Failure, finished_ms);
                let failure = classify(&error);
                if !may_retry(route, body, retries, failure) {
                    return Attempted::Failed(error_response(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "endpoint {} of route {} failed: {} ({}) after {} attempt(s)",
                            endpoint.address,
                            route.id,
                            describe(&error),
                            failure_name(failure),
                            retries + 1
                        ),
                    ));
                }
                (failure, None)
            }
        };
        drop(load);
        let (failure, retry_after) = failure;
        let wait = retry_after.unwrap_or_else(|| {
            retry::backoff(retries, cfg.backoff.get(), cfg.max_backoff.get(), &mut rng)
        });
        tracing::debug!(route = %route.id, endpoint = %endpoint.address, failure = failure_name(failure), ?wait, "retrying");
        retries += 1;
        route.metrics.retries.inc();
        _retry_guard = Some(RetryGuard::new(Arc::clone(route)));
        tokio::time::sleep(wait).await;
    }
}

fn may_retry(route: &RouteRuntime, body: &RequestBody, retries: u32, failure: Failure) -> bool {
    let cfg = &route.config.retries;
    body.replayable()
        && retries < cfg.attempts
        && failure.matches(&cfg.retry_on)
        && retry::budget_allows(
            route.active.load(Ordering::Relaxed),
            route.active_retries.load(Ordering::Relaxed),
            cfg.budget_percent,
        )
}

/// Which retry condition a transport error is.
fn classify(error: &ClientError) -> Failure {
    match error {
        ClientError::ConnectTimeout { .. } => Failure::ConnectTimeout,
        ClientError::Connect { error, .. } if error.kind() == io::ErrorKind::TimedOut => {
            Failure::ConnectTimeout
        }
        ClientError::Connect { .. } => Failure::ConnectFailure,
        ClientError::Exchange(_) => Failure::Reset,
    }
}

fn failure_name(f: Failure) -> &'static str {
    match f {
        Failure::Status(_) => "5xx",
        Failure::ConnectFailure => "connect-failure",
        Failure::ConnectTimeout => "connect timeout",
        Failure::Reset => "reset",
    }
}

/// The error and its causes, innermost last: `tcp connect error: Connection refused`.
fn describe(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// Removes hop-by-hop headers and works out `X-Forwarded-*` and `Forwarded` (RFC
/// 7239): a field the request already has is extended in its map; the others are
/// returned, to be sent after the request's own fields.
fn prepare_request_headers(
    parts: &mut Parts,
    peer: &Peer,
    upgrade: Option<HeaderValue>,
) -> Additions {
    // One pass over the request's fields finds the ones this needs: each lookup in the
    // map hashes the name. Cloning a header value shares its bytes.
    let mut host = None;
    let (mut has_for, mut has_proto, mut has_host, mut has_forwarded) =
        (false, false, false, false);
    for (name, value) in &parts.headers {
        if name == HOST {
            host.get_or_insert_with(|| value.clone());
        } else if name == header::FORWARDED {
            has_forwarded = true;
        } else if name == X_FORWARDED_FOR {
            has_for = true;
        } else if name == X_FORWARDED_PROTO {
            has_proto = true;
        } else if name == X_FORWARDED_HOST {
            has_host = true;
        }
    }
    let from_field = host.is_some();
    // HTTP/2 carries the host in :authority; only then is it copied.
    let host = host.or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    remove_hop_by_hop(&mut parts.headers);
    if let Some(upgrade) = upgrade {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, upgrade);
    }
    let mut additions = Additions::default();
    if has_for {
        extend_list(&mut parts.headers, X_FORWARDED_FOR, &peer.forwarded_ip);
    } else {
        additions
            .fields
            .push((X_FORWARDED_FOR, peer.forwarded_ip.clone()));
    }
    if !has_proto {
        additions
            .fields
            .push((X_FORWARDED_PROTO, HeaderValue::from_static("http")));
    }
    let host_fields = host.as_ref().and_then(|host| peer.host_fields(host));
    let forwarded = match &host_fields {
        Some(fields) => {
            if !has_host {
                additions
                    .fields
                    .push((X_FORWARDED_HOST, fields.host.clone()));
            }
            if fields.loopback {
                // A Host of `127.0.0.1:15001` names the sidecar and means nothing to the
                // backend: each attempt sends its endpoint's address instead.
                additions.replace_host = true;
            } else if !from_field {
                // An HTTP/1.1 endpoint needs the Host that :authority carried.
                additions.fields.push((HOST, fields.host.clone()));
            }
            &fields.forwarded
        }
        None => &peer.forwarded_without_host,
    };
    if has_forwarded {
        extend_list(&mut parts.headers, header::FORWARDED, forwarded);
    } else {
        additions
            .fields
            .push((header::FORWARDED, forwarded.clone()));
    }
    additions
}

/// Appends `next` to the comma-separated list in the field `name`; a value that is not
/// visible ASCII is replaced.
fn extend_list(headers: &mut HeaderMap, name: HeaderName, next: &HeaderValue) {
    if let Entry::Occupied(mut existing) = headers.entry(name) {
        let combined = existing.get().to_str().ok().and_then(|list| {
            HeaderValue::from_str(&join_list(list, next.to_str().unwrap_or("unknown"))).ok()
        });
        existing.insert(combined.unwrap_or_else(|| next.clone()));
    }
}

/// `existing, next`: one more element of a comma-separated header list.
fn join_list(existing: &str, next: &str) -> String {
    let mut joined = String::with_capacity(existing.len() + 2 + next.len());
    joined.push_str(existing);
    joined.push_str(", ");
    joined.push_str(next);
    joined
}

/// RFC 7239 §6: IPv6 nodes are bracketed and quoted.
fn forwarded_node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Removes the RFC 9110 §7.6.1 hop-by-hop headers and every header `Connection` names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds what is present: most requests carry none.
    // Removing all seven blindly hashed seven names per message.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if present[0] {
        // `HOP_BY_HOP[0]` is `Connection`; what else it names is hop-by-hop too. A
        // value that is not visible ASCII names nothing here.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter(|v| v.to_str().is_ok())
            .flat_map(named_by_connection)
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The endpoint's response, streamed back with the in-flight accounting attached to
/// its body; a 101 is spliced into a bidirectional byte pipe.
fn finish(
    response: EndpointResponse,
    in_flight: InFlight,
    load: LoadGuard,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ProxyBody> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let (parts, body) = response.into_parts();
        if let Some((mut upstream, read_ahead)) = body.into_upgraded() {
            tokio::spawn(async move {
                // The guards live as long as the tunnel: it is an active request.
                let _guards = (in_flight, load);
                let tunnel = async {
                    let mut client = TokioIo::new(client_upgrade.await.map_err(io::Error::other)?);
                    // What the endpoint sent right behind its 101 goes first.
                    client.write_all(&read_ahead).await?;
                    tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                };
                if let Err(e) = tunnel.await {
                    tracing::debug!(error = %e, "upgraded connection closed");
                }
            });
        }
        return Response::from_parts(parts, empty_body());
    }
    // The pool consumed the response's hop-by-hop fields.
    let (parts, body) = response.into_parts();
    let body = Tracked {
        inner: body,
        _guards: (in_flight, load),
    };
    Response::from_parts(parts, body.boxed_unsync())
}

fn empty_body() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A plain-text error from the sidecar itself, marked with `x-trimtab-error`.
pub fn error_response(status: StatusCode, message: String) -> Response<ProxyBody> {
    let body = format!("trimtab: {message}\n");
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response.headers_mut().insert(
        HeaderName::from_static("x-trimtab-error"),
        HeaderValue::from_static("1"),
    );
    response
}

/// Counts a request as in flight on its route until its response body ends.
#[derive(Debug)]
struct InFlight(Arc<RouteRuntime>);

impl InFlight {
    fn new(route: Arc<RouteRuntime>) -> Self {
        route.active.fetch_add(1, Ordering::Relaxed);
        route.metrics.active.inc();
        Self(route)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active.dec();
    }
}

/// Counts a request as active on its endpoint until its response body ends.
#[derive(Debug)]
struct LoadGuard(Arc<Endpoint>);

impl LoadGuard {
    fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.load.start();
        Self(endpoint)
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.load.finish();
    }
}

/// Counts a retry in flight against the route's retry budget.
#[derive(Debug)]
struct RetryGuard(Arc<RouteRuntime>);

impl RetryGuard {
    fn new(route: Arc<RouteRuntime>) -> Self {
        route.active_retries.fetch_add(1, Ordering::Relaxed);
        Self(route)
    }
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.active_retries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that releases its guards when it ends or is dropped.
struct Tracked {
    inner: PooledBody,
    _guards: (InFlight, LoadGuard),
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_client::framing::encode_request_head;

    #[test]
    fn removes_hop_by_hop_headers_and_those_named_in_connection() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn adds_forwarded_headers_and_appends_to_existing_ones() {
        let (mut parts, _) = Request::builder()
            .uri("/x")
            .header(HOST, "127.0.0.1:15001")
            .header("x-forwarded-for", "203.0.113.7")
            .body(())
            .expect("valid")
            .into_parts();
        let peer = Peer::new("127.0.0.1:5555".parse().expect("addr"));
        let additions = prepare_request_headers(&mut parts, &peer, None);
        let h = &on_the_wire(&parts, &additions);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "127.0.0.1:15001");
        assert_eq!(
            h[header::FORWARDED],
            "for=127.0.0.1;host=\"127.0.0.1:15001\";proto=http"
        );
        assert_eq!(
            h[HOST], "10.0.0.1:80",
            "a Host naming the sidecar is replaced by the endpoint's address"
        );
    }

    #[test]
    fn each_request_gets_the_forwarding_fields_of_its_own_host() {
        let peer = Peer::new("192.0.2.9:5555".parse().expect("addr"));
        let forward = |host: Option<&str>| {
            let mut request = Request::builder().uri("/");
            if let Some(host) = host {
                request = request.header(HOST, host);
            }
            let (mut parts, ()) = request.body(()).expect("valid").into_parts();
            let additions = prepare_request_headers(&mut parts, &peer, None);
            on_the_wire(&parts, &additions)
        };
        // The second request reuses what the first one's Host gave; the third and the
        // fourth have other Hosts, and the fifth none.
        for _ in 0..2 {
            let h = forward(Some("shop.example"));
            assert_eq!(h[HOST], "shop.example");
            assert_eq!(h["x-forwarded-host"], "shop.example");
            assert_eq!(
                h[header::FORWARDED],
                "for=192.0.2.9;host=\"shop.example\";proto=http"
            );
        }
        let h = forward(Some("localhost:15001"));
        assert_eq!(h[HOST], "10.0.0.1:80");
        assert_eq!(
            h[header::FORWARDED],
            "for=192.0.2.9;host=\"localhost:15001\";proto=http"
        );
        let h = forward(Some("a\"b"));
        assert_eq!(h[HOST], "a\"b");
        assert_eq!(h[header::FORWARDED], "for=192.0.2.9;host=\"ab\";proto=http");
        let h = forward(None);
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h[header::FORWARDED], "for=192.0.2.9;proto=http");
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
    }

    #[test]
    fn an_authority_becomes_the_host_and_existing_lists_are_extended() {
        // As an HTTP/2 request arrives: the host in the URI, no Host field.
        let (mut parts, ()) = Request::builder()
            .uri("http://shop.example:8080/cart")
            .header(header::FORWARDED, "for=203.0.113.7")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "edge.example")
            .body(())
            .expect("valid")
            .into_parts();
        let peer = Peer::new("[2001:db8::1]:5555".parse().expect("addr"));
        let additions = prepare_request_headers(&mut parts, &peer, None);
        let h = on_the_wire(&parts, &additions);
        assert_eq!(h[HOST], "shop.example:8080");
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
        assert_eq!(h["x-forwarded-proto"], "https", "kept from the edge");
        assert_eq!(h["x-forwarded-host"], "edge.example", "kept from the edge");
        assert_eq!(
            h[header::FORWARDED],
            "for=203.0.113.7, for=\"[2001:db8::1]\";host=\"shop.example:8080\";proto=http"
        );
        assert_eq!(h.len(), 5, "each field once: {h:?}");
    }

    /// The fields as an endpoint receives them: the head encoded for the wire, parsed.
    fn on_the_wire(parts: &Parts, additions: &Additions) -> HeaderMap {
        let mut wire = Vec::new();
        let endpoint = HeaderValue::from_static("10.0.0.1:80");
        encode_request_head(parts, additions, &endpoint, Some(0), true, &mut wire);
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut fields);
        assert!(request.parse(&wire).expect("valid head").is_complete());
        let mut received = HeaderMap::new();
        for field in request.headers.iter() {
            received.append(
                HeaderName::from_bytes(field.name.as_bytes()).expect("name"),
                HeaderValue::from_bytes(field.value).expect("value"),
            );
        }
        received
    }

    #[test]
    fn quotes_ipv6_in_forwarded() {
        assert_eq!(forwarded_node("::1".parse().expect("ip")), "\"[::1]\"");
    }

    #[test]
    fn keeps_a_non_loopback_host() {
        assert!(is_loopback_host("localhost:15001"));
        assert!(is_loopback_host("[::1]:15001"));
        assert!(is_loopback_host("127.0.0.1"));
        assert!(!is_loopback_host("api.example.com"));
    }

    #[test]
    fn recognises_upgrade_requests() {
        let mut h = HeaderMap::new();
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(is_upgrade(&h));
    }
}
