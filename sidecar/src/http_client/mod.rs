//! The data plane's HTTP/1.1 client to backends: one keep-alive pool of connections per
//! address, used by the proxy (a pool per endpoint, kept across config reloads with the
//! endpoint) and by the bots (a pool for the target).
//!
//! Why not hyper-util's legacy `Client`: its pool is keyed by scheme and authority
//! behind a mutex, and after every response it spawns a task that puts the connection
//! back once it is ready again. At tens of thousands of requests per second per core
//! that bookkeeping was the largest user-space cost after hyper's own codec
//! (docs/benchmarks.md, "Sidecar proxy overhead"). Here a pool belongs to one address,
//! idle connections wait in a lock-free queue, and a connection goes back the moment
//! its response body ends. The connections are not hyper's `client::conn::http1`
//! (the layer linkerd2-proxy builds its pools on) but [`connection`]: no task per
//! connection, the request's own task reads and writes the socket, as in nginx and
//! HAProxy. Framing is in [`framing`], parsing is httparse's.
//!
//! An idle connection is not watched: an endpoint's close is noticed when the
//! connection is next taken (its socket shows readable, checked without a system
//! call) or when it ages out. nginx watches its cached upstream connections and closes
//! them at once; here a closed one can hold a file descriptor until then.
//!
//! The queue is first in, first out, so under steady traffic every idle connection is
//! used in turn and none ever sits idle for [`POOL_IDLE_TIMEOUT`]: a burst's extra
//! connections would stay open for as long as traffic lasts. A LIFO pool (hyper-util's,
//! nginx's `keepalive` cache) lets them age out instead; here the pool counts the
//! fewest connections that sat idle over each idle timeout, which is how many that
//! period did not need, and closes that many when it ends. No task and no lock: the
//! response that ends a period does the trimming.

mod connection;
pub mod framing;
#[cfg(test)]
mod wire_tests;

use std::{
    error::Error as StdError,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use crossbeam_queue::SegQueue;
use http::{HeaderValue, Request, Response, StatusCode, request};
use hyper::body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;

pub use connection::{BodyError, ExchangeError};
pub use framing::{Additions, FramingError};

use connection::{BodyState, Connection};
use framing::ResponseHead;

use crate::retry::is_idempotent;

/// Idle connections older than this are closed instead of reused (the next request that
/// finds one, or the pool's end, closes it).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How many idle connections in a row may turn out closed before a request gives up on
/// the idle ones and connects afresh.
const STALE_TRIES: usize = 8;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connect did not finish within the connect timeout.
    #[error("connect to {address} timed out after {timeout:?}")]
    ConnectTimeout {
        /// `host:port`.
        address: String,
        /// The limit.
        timeout: Duration,
    },
    /// The TCP connect failed (refused, unreachable, name not resolved).
    #[error("connect to {address} failed: {error}")]
    Connect {
        /// `host:port`.
        address: String,
        /// The cause.
        error: std::io::Error,
    },
    /// The connection broke, or the endpoint's answer was not HTTP, while the request
    /// or the response head was on the wire.
    #[error(transparent)]
    Exchange(ExchangeError),
}

impl ClientError {
    /// Whether no connection was made (so the request never left).
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::ConnectTimeout { .. } | Self::Connect { .. })
    }
}

/// Keep-alive HTTP/1.1 connections to one `host:port`.
pub struct ConnectionPool {
    address: String,
    /// The address as a `Host` value, for requests that carry none.
    host: HeaderValue,
    idle: SegQueue<Idle>,
    /// Connections in `idle` (approximately: a push and its count are two steps).
    idle_count: AtomicUsize,
    max_idle: usize,
    /// Idle connections are closed after this long unused.
    idle_timeout: Duration,
    /// The fewest connections idle at once since the last trim: a surplus, if kept up
    /// for a whole `idle_timeout`.
    low_water: AtomicUsize,
    /// When the current trimming period started, in milliseconds since `created`.
    period_start_ms: AtomicU64,
    created: Instant,
}

impl std::fmt::Debug for ConnectionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionPool")
            .field("address", &self.address)
            .field("idle", &self.idle_count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

struct Idle {
    connection: Box<Connection>,
    since: Instant,
}

impl ConnectionPool {
    /// A pool for `address` (`host:port`, a name or an IP literal) that keeps at most
    /// `max_idle` idle connections; more are closed when their response ends.
    pub fn new(address: &str, max_idle: usize) -> Arc<Self> {
        Self::with_idle_timeout(address, max_idle, POOL_IDLE_TIMEOUT)
    }

    /// [`Self::new`] with idle connections closed after `idle_timeout` rather than
    /// [`POOL_IDLE_TIMEOUT`].
    pub fn with_idle_timeout(address: &str, max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            host: HeaderValue::from_str(address)
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            address: address.to_owned(),
            idle: SegQueue::new(),
            idle_count: AtomicUsize::new(0),
            max_idle,
            idle_timeout,
            low_water: AtomicUsize::new(0),
            period_start_ms: AtomicU64::new(0),
            created: Instant::now(),
        })
    }

    /// How many connections wait idle (approximately, under concurrent use).
    pub fn idle(&self) -> usize {
        self.idle_count.load(Ordering::Relaxed)
    }

    /// `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sends `request` on an idle connection, or on a new one when none is idle
    /// (connecting within `connect_timeout`; zero waits as long as the kernel does).
    /// The URI is sent in origin form, and `Host` is set to the address when missing.
    /// The connection returns to the pool when the response body ends; a body dropped
    /// before its end closes it.
    ///
    /// An idle connection the endpoint closed is usually seen before it is used. When
    /// the close crosses the request on the wire instead, the request is sent again on
    /// a new connection only if it is idempotent and has no body (RFC 9112 §9.3.1);
    /// otherwise the caller sees the error and its retry policy decides.
    pub async fn send<B>(
        self: &Arc<Self>,
        request: Request<B>,
        connect_timeout: Duration,
    ) -> Result<Response<PooledBody>, ClientError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let (head, body) = request.into_parts();
        self.send_parts(&head, &Additions::default(), body, connect_timeout)
            .await
    }

    /// [`Self::send`] with a request head the caller keeps, to send it again to another
    /// endpoint on a retry: nothing of it is copied. The fields of `additions` are sent
    /// after the head's own.
    pub async fn send_parts<B>(
        self: &Arc<Self>,
        head: &request::Parts,
        additions: &Additions,
        mut body: B,
        connect_timeout: Duration,
    ) -> Result<Response<PooledBody>, ClientError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let resendable = body.is_end_stream() && is_idempotent(&head.method);
        let mut stale = 0;
        loop {
            let (mut connection, reused) = match self.checkout(stale < STALE_TRIES) {
                Some(connection) => (connection, true),
                None => {
                    let opened = Connection::open(&self.address, connect_timeout).await?;
                    (Box::new(opened), false)
                }
            };
            match connection
                .exchange(head, additions, &mut body, &self.host)
                .await
            {
                Ok(response) => return Ok(self.lease(response, connection)),
                Err(e) if reused && resendable && e.nothing_received() => stale += 1,
                Err(e) => return Err(ClientError::Exchange(e)),
            }
        }
    }

    /// The oldest idle connection still open and not expired, if `reuse`.
    fn checkout(&self, reuse: bool) -> Option<Box<Connection>> {
        if !reuse {
            return None;
        }
        while let Some(mut idle) = self.idle.pop() {
            let left = self
                .idle_count
                .fetch_sub(1, Ordering::Relaxed)
                .saturating_sub(1);
            self.low_water.fetch_min(left, Ordering::Relaxed);
            if idle.since.elapsed() < self.idle_timeout && idle.connection.is_usable() {
                return Some(idle.connection);
            }
        }
        None
    }

    fn lease(
        self: &Arc<Self>,
        head: ResponseHead,
        connection: Box<Connection>,
    ) -> Response<PooledBody> {
        let ResponseHead {
            parts,
            body,
            keep_alive,
        } = head;
        let upgraded = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        let mut body = PooledBody {
            // After a 101 the connection belongs to the upgrade.
            state: if upgraded {
                BodyState::Done
            } else {
                BodyState::new(body)
            },
            connection: Some(connection),
            upgraded,
            keep_alive,
            pool: Arc::clone(self),
        };
        if matches!(body.state, BodyState::Done) {
            // No body (HEAD, 204, 304, `content-length: 0`): free at once, as nothing
            // may ever poll it.
            body.release();
        }
        Response::from_parts(parts, body)
    }

    fn put_back(&self, connection: Box<Connection>) {
        if self.idle_count.fetch_add(1, Ordering::Relaxed) >= self.max_idle {
            self.idle_count.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        self.idle.push(Idle {
            connection,
            since: now,
        });
        self.trim_surplus(now);
    }

    /// Once per `idle_timeout`, closes as many idle connections as stayed unused
    /// throughout it (the low-water mark of the idle count), and starts a new period.
    fn trim_surplus(&self, now: Instant) {
        let now_ms =
            u64::try_from(now.duration_since(self.created).as_millis()).unwrap_or(u64::MAX);
        let period_ms = u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let start = self.period_start_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(start) < period_ms
            || self
                .period_start_ms
                .compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let surplus = self.low_water.swap(usize::MAX, Ordering::Relaxed);
        for _ in 0..surplus.min(self.idle()) {
            // Dropping the connection closes its socket.
            if self.idle.pop().is_none() {
                break;
            }
            self.idle_count.fetch_sub(1, Ordering::Relaxed);
        }
        self.low_water.fetch_min(self.idle(), Ordering::Relaxed);
    }
}

/// A response body read from its pooled connection by whoever polls it; the
/// connection goes back to the pool when the body ends, and is closed when the body
/// is dropped before.
pub struct PooledBody {
    state: BodyState,
    /// Boxed: responses move through several futures, and a connection is large.
    connection: Option<Box<Connection>>,
    /// Whether the response was a `101 Switching Protocols`, after which the
    /// connection is the upgrade's.
    upgraded: bool,
    keep_alive: bool,
    pool: Arc<ConnectionPool>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("state", &self.state)
            .field("address", &self.pool.address)
            .finish_non_exhaustive()
    }
}

impl PooledBody {
    /// After a `101 Switching Protocols`: the socket to the endpoint and the bytes it
    /// already sent past the response head.
    pub fn into_upgraded(mut self) -> Option<(TcpStream, Bytes)> {
        let connection = self.connection.take().filter(|_| self.upgraded)?;
        Some(connection.into_upgraded())
    }

    fn release(&mut self) {
        if self.upgraded {
            return;
        }
        if let Some(connection) = self.connection.take()
            && self.keep_alive
            && !connection.has_unread()
        {
            self.pool.put_back(connection);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(connection) = this.connection.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = ready!(connection.poll_body(&mut this.state, cx));
        match &polled {
            None => this.release(),
            Some(Ok(_)) if matches!(this.state, BodyState::Done) => this.release(),
            // A connection that broke mid-body is not reused.
            Some(Err(_)) => this.connection = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Remaining(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

/// An HTTP client error and its causes, `: `-joined: hyper's top-level message alone
/// ("client error (Connect)") does not say what went wrong.
pub fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, net::SocketAddr};

    use http::header::HOST;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::{body::Incoming, server::conn::http1 as server, service::service_fn};
    use hyper_util::rt::TokioIo;

    use super::*;

    /// A backend on 127.0.0.1 that answers each request with its URI and Host, closes
    /// each connection after one response when `close` is set, and counts connections
    /// accepted and still open.
    async fn backend(close: bool) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let address = listener.local_addr().expect("local address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (counter, open_counter) = (Arc::clone(&accepted), Arc::clone(&open));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                open_counter.fetch_add(1, Ordering::SeqCst);
                let open = Arc::clone(&open_counter);
                let service = service_fn(|request: Request<Incoming>| async move {
                    let host = request
                        .headers()
                        .get(HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let text = format!("{} {host}", request.uri());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                tokio::spawn(async move {
                    let _ = server::Builder::new()
                        .keep_alive(!close)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (address, accepted, open)
    }

    fn get(uri: &str) -> Request<Empty<Bytes>> {
        Request::get(uri).body(Empty::new()).expect("a request")
    }

    async fn text(response: Response<PooledBody>) -> String {
        let body = response.into_body().collect().await.expect("a body");
        String::from_utf8(body.to_bytes().to_vec()).expect("utf-8")
    }

    const CONNECT: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn sequential_requests_share_one_connection_in_origin_form_with_a_host() {
        let (address, accepted, _) = backend(false).await;
        let pool = ConnectionPool::new(&address.to_string(), 8);
        for path in ["/a", "/b?x=1", "/c"] {
            let uri = format!("http://{address}{path}");
            let response = pool.send(get(&uri), CONNECT).await.expect("a response");
            assert_eq!(text(response).await, format!("{path} {address}"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_the_server_closed_are_skipped_not_failed() {
        let (address, accepted, _) = backend(true).await;
        let pool = ConnectionPool::new(&address.to_string(), 8);
        for _ in 0..5 {
            let response = pool.send(get("/"), CONNECT).await.expect("a response");
            assert_eq!(response.status(), StatusCode::OK);
            text(response).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_limit_are_closed() {
        let (address, accepted, _) = backend(false).await;
        let pool = ConnectionPool::new(&address.to_string(), 1);
        // Three responses held at once need three connections ...
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(pool.send(get("/"), CONNECT).await.expect("a response"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        for response in held {
            text(response).await;
        }
        // ... of which one stays.
        assert_eq!(pool.idle_count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_a_burst_opened_are_closed_once_steady_traffic_leaves_them_unused() {
        let (address, accepted, open) = backend(false).await;
        let idle_timeout = Duration::from_millis(300);
        let pool = ConnectionPool::with_idle_timeout(&address.to_string(), 64, idle_timeout);
        // A burst: eight responses held at once need eight connections.
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(pool.send(get("/"), CONNECT).await.expect("a response"));
        }
        for response in held {
            text(response).await;
        }
        assert_eq!(pool.idle(), 8);
        // Then one request at a time. The queue hands out the connections in turn, so
        // each is used every eighth request and none ages out by itself; within the
        // first idle timeout nothing is closed.
        let sequential = || async {
            text(pool.send(get("/"), CONNECT).await.expect("a response")).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let started = Instant::now();
        while started.elapsed() < idle_timeout / 2 {
            sequential().await;
        }
        assert_eq!(pool.idle(), 8);
        // A whole period in which seven were never needed ends with those seven closed.
        while pool.idle() > 1 && started.elapsed() < Duration::from_secs(10) {
            sequential().await;
        }
        assert_eq!(pool.idle(), 1, "after {:?}", started.elapsed());
        assert!(started.elapsed() >= idle_timeout, "{:?}", started.elapsed());
        let deadline = Instant::now() + Duration::from_secs(5);
        while open.load(Ordering::SeqCst) > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            open.load(Ordering::SeqCst),
            1,
            "the backend sees them closed"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 8);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_does_not_return_the_connection() {
        let (address, accepted, _) = backend(false).await;
        let pool = ConnectionPool::new(&address.to_string(), 8);
        drop(pool.send(get("/"), CONNECT).await.expect("a response"));
        assert_eq!(pool.idle_count.load(Ordering::SeqCst), 0);
        text(pool.send(get("/"), CONNECT).await.expect("a response")).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error_naming_the_address() {
        // Bound and dropped: nothing listens there now.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a loopback port");
        let pool = ConnectionPool::new(&address.to_string(), 8);
        let error = pool
            .send(get("/"), CONNECT)
            .await
            .expect_err("nothing listens");
        assert!(error.is_connect(), "{error:?}");
        assert!(error.to_string().contains(&address.to_string()), "{error}");
    }
}
