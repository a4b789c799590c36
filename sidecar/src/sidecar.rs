//! The running sidecar: the active config behind `arc-swap`, one listener per route,
//! and [`Sidecar::apply`], which swaps in a new config without dropping a request.
//!
//! A reload validates first and binds any new listener ports before anything changes,
//! so a config that cannot be served is refused whole and the old one keeps serving.
//! Listeners whose port stays keep their socket; requests already in flight finish on
//! the route generation they started on; listeners whose route is gone stop accepting
//! and let their open connections finish (graceful shutdown).
//!
//! A route whose listener speaks `openai` or `anthropic` is served by the
//! [`llm_gateway`](crate::llm_gateway) instead of the HTTP proxy; the choice is made
//! per request, from the snapshot, so a reload can turn a port from one into the other.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::Poll,
    time::Duration,
};

use arc_swap::ArcSwap;
use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use trimtab_api::sidecar_config::{ConfigError, SidecarConfig};

use crate::{
    config_source::StateDir,
    forward, health,
    llm_gateway::{self, GatewayError, LlmGateway, LlmMetrics, ProviderClient},
    metrics::{Metrics, MetricsError},
    route::RouteRuntime,
};

/// What the request path reads: the active config and its routes by listener port.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The config being served; `None` until the first one is applied.
    pub config: Option<SidecarConfig>,
    /// Routes by listener port.
    pub routes: HashMap<u16, Arc<RouteRuntime>>,
    /// The LLM gateways by listener port (routes with providers).
    pub llm: HashMap<u16, Arc<LlmGateway>>,
}

/// State shared by every listener and the admin server.
#[derive(Debug)]
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    /// Every metric.
    pub metrics: Metrics,
    /// Largest request body accepted, in bytes (413 above).
    pub max_request_body: u64,
}

impl Shared {
    /// The route on `port`, if the active config has one. Lock-free.
    pub fn route(&self, port: u16) -> Option<Arc<RouteRuntime>> {
        self.snapshot.load().routes.get(&port).cloned()
    }

    /// The active snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Whether a config has been loaded (the `/ready` answer).
    pub fn is_ready(&self) -> bool {
        self.snapshot.load().config.is_some()
    }
}

/// How the sidecar serves, from its settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address the route listeners bind (127.0.0.1: only the pod's own application).
    pub listen_address: IpAddr,
    /// Largest request body, in bytes.
    pub max_request_body: u64,
    /// Largest request head (request line and headers), in bytes: 431 above.
    pub max_header_bytes: usize,
    /// Where the last good config is kept (fail static).
    pub state_dir: Option<PathBuf>,
}

/// A config the sidecar refused; the running config is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// It failed validation.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// An LLM route cannot be set up.
    #[error("routes[{index}]: {source}")]
    Gateway {
        /// Index of the route.
        index: usize,
        /// Why.
        source: GatewayError,
    },
    /// The LLM gateway's metrics cannot be registered.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A new listener port could not be bound.
    #[error("routes[{index}].listener.port: cannot listen on {address}: {source}")]
    Bind {
        /// Index of the route.
        index: usize,
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Older than the config being served.
    #[error("version: {version} is older than the running version {running}")]
    Stale {
        /// The refused version.
        version: u64,
        /// The running version.
        running: u64,
    },
}

struct ListenerHandle {
    stop: watch::Sender<bool>,
    local: SocketAddr,
}

#[derive(Default)]
struct Reloading {
    listeners: HashMap<u16, ListenerHandle>,
    provider_clients: HashMap<Duration, ProviderClient>,
    llm_metrics: Option<LlmMetrics>,
}

/// The running sidecar.
pub struct Sidecar {
    shared: Arc<Shared>,
    options: Options,
    http: Arc<HttpServers>,
    /// Held only while a config is applied, never on the request path.
    reloading: tokio::sync::Mutex<Reloading>,
    state_dir: Option<StateDir>,
    version: AtomicU64,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Sidecar {
    /// A sidecar serving nothing yet.
    pub fn new(options: Options, metrics: Metrics) -> Arc<Self> {
        let http = HttpServers::new(options.max_header_bytes);
        Arc::new(Self {
            shared: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(Snapshot::default()),
                metrics,
                max_request_body: options.max_request_body,
            }),
            state_dir: options.state_dir.clone().map(StateDir::new),
            options,
            http: Arc::new(http),
            reloading: tokio::sync::Mutex::new(Reloading::default()),
            version: AtomicU64::new(0),
        })
    }

    /// What the listeners and the admin server share.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The version of the config being served (0 before the first).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// The kept state directory, if any.
    pub fn state_dir(&self) -> Option<&StateDir> {
        self.state_dir.as_ref()
    }

    /// The local address of the listener on `port` (useful with port 0 in tests).
    pub async fn listener_address(&self, port: u16) -> Option<SocketAddr> {
        self.reloading
            .lock()
            .await
            .listeners
            .get(&port)
            .map(|l| l.local)
    }

    /// Stops every listener: no new connections, open ones finish their requests.
    pub async fn shutdown(&self) {
        let mut reloading = self.reloading.lock().await;
        for (_, handle) in reloading.listeners.drain() {
            let _ = handle.stop.send(true);
        }
        for route in self.shared.snapshot().routes.values() {
            route.retired.store(true, Ordering::Relaxed);
        }
    }

    /// Validates and serves `config`, or refuses it and keeps the running one.
    pub async fn apply(&self, config: SidecarConfig) -> Result<(), ApplyError> {
        let result = self.try_apply(config).await;
        let label = if result.is_ok() { "applied" } else { "refused" };
        self.shared
            .metrics
            .config_loads
            .with_label_values(&[label])
            .inc();
        result
    }

    async fn try_apply(&self, config: SidecarConfig) -> Result<(), ApplyError> {
        config.validate()?;
        let mut reloading = self.reloading.lock().await;
        let running = self.version();
        if config.version < running {
            return Err(ApplyError::Stale {
                version: config.version,
                running,
            });
        }
        // Bind new ports first: if one fails, nothing has changed yet.
        let mut bound = Vec::new();
        for (index, route) in config.routes.iter().enumerate() {
            let port = route.listener.port;
            if reloading.listeners.contains_key(&port) {
                continue;
            }
            let address = SocketAddr::new(self.options.listen_address, port);
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| ApplyError::Bind {
                    index,
                    address,
                    source,
                })?;
            bound.push((port, listener));
        }

        let old = self.shared.snapshot.load_full();
        let metrics = &self.shared.metrics;
        let mut llm = HashMap::new();
        for (index, route) in config.routes.iter().enumerate() {
            if route.llm.is_none() {
                continue;
            }
            let llm_metrics = match &reloading.llm_metrics {
                Some(m) => m.clone(),
                None => {
                    let m = LlmMetrics::register(metrics)?;
                    reloading.llm_metrics = Some(m.clone());
                    m
                }
            };
            let connect = route.timeouts.connect.get();
            let client = match reloading.provider_clients.get(&connect) {
                Some(c) => c.clone(),
                None => {
                    let c = llm_gateway::provider_client(connect)
                        .map_err(|source| ApplyError::Gateway { index, source })?;
                    reloading.provider_clients.insert(connect, c.clone());
                    c
                }
            };
            let previous = old.llm.get(&route.listener.port).map(|g| &**g);
            let gateway = LlmGateway::build(
                route,
                previous,
                client,
                llm_metrics,
                self.options.max_request_body,
            )
            .map_err(|source| ApplyError::Gateway { index, source })?;
            llm.insert(route.listener.port, Arc::new(gateway));
        }
        let mut routes = HashMap::new();
        for route in &config.routes {
            let previous = old.routes.get(&route.listener.port).map(|r| &**r);
            let runtime = Arc::new(RouteRuntime::build(route.clone(), previous, metrics));
            routes.insert(route.listener.port, runtime);
        }
        let version = config.version;
        let to_save = config.clone();
        self.shared.snapshot.store(Arc::new(Snapshot {
            config: Some(config),
            routes: routes.clone(),
            llm,
        }));
        self.version.store(version, Ordering::Relaxed);
        metrics
            .config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));

        // The old generation's background tasks stop; its in-flight requests finish.
        for route in old.routes.values() {
            route.retired.store(true, Ordering::Relaxed);
            let kept: HashSet<&str> = routes
                .get(&route.config.listener.port)
                .filter(|r| r.id == route.id)
                .map(|r| r.endpoints.iter().map(|e| e.address.as_str()).collect())
                .unwrap_or_default();
            for endpoint in &route.endpoints {
                if !kept.contains(endpoint.address.as_str()) {
                    metrics.forget_endpoint(&route.id, &endpoint.address);
                }
            }
        }
        for route in routes.values() {
            health::start(Arc::clone(route));
        }
        for (port, listener) in bound {
            let local = listener
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::new(self.options.listen_address, port));
            let (stop, stopped) = watch::channel(false);
            tokio::spawn(accept(
                Arc::clone(&self.shared),
                Arc::clone(&self.http),
                listener,
                port,
                stopped,
            ));
            tracing::info!(%local, "listening");
            reloading
                .listeners
                .insert(port, ListenerHandle { stop, local });
        }
        let removed: Vec<u16> = reloading
            .listeners
            .keys()
            .filter(|p| !routes.contains_key(p))
            .copied()
            .collect();
        for port in removed {
            if let Some(handle) = reloading.listeners.remove(&port) {
                let _ = handle.stop.send(true);
                tracing::info!(local = %handle.local, "listener closed: its route left the config");
            }
        }
        tracing::info!(version, routes = routes.len(), "config applied");
        // Kept after it serves, so that a slow disk never delays a config (weight
        // updates arrive every few seconds); on a blocking thread, because the fsync can
        // take long enough under I/O load to stall every connection of a runtime worker;
        // still under the reload lock, so that an older config never overwrites a newer
        // one. A restart within this window fails static to the config kept before.
        if let Some(dir) = self.state_dir.clone() {
            let saved = match tokio::task::spawn_blocking(move || dir.save(&to_save)).await {
                Ok(saved) => saved.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(error) = saved {
                tracing::warn!(%error, "could not keep the config for fail-static restarts");
            }
        }
        Ok(())
    }
}

/// Whether the sidecar is stopping, asked on every poll of a connection.
///
/// Not a `select!` over `stop.changed()`: that polled the watch's waiter on each of the
/// connection's wake-ups (two or three per request), and each such poll takes the
/// channel's waiter lock. The waiter, once registered by a first poll, stays registered
/// until the channel changes; in between, a look at the version (one atomic load) says
/// that it need not be polled again.
struct StopSignal<F> {
    probe: watch::Receiver<bool>,
    changed: Pin<Box<F>>,
    registered: bool,
    stopped: bool,
}

impl<F: Future> StopSignal<F> {
    fn new(probe: watch::Receiver<bool>, changed: F) -> Self {
        Self {
            probe,
            changed: Box::pin(changed),
            registered: false,
            stopped: false,
        }
    }

    /// True once, when the stop is first seen.
    fn poll_stop(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        if self.stopped || (self.registered && !self.probe.has_changed().unwrap_or(true)) {
            return false;
        }
        self.registered = true;
        self.stopped = self.changed.as_mut().poll(cx).is_ready();
        self.stopped
    }
}

/// Accepts connections on one listener until told to stop; then stops accepting and
/// asks its open connections to finish gracefully.
async fn accept(
    shared: Arc<Shared>,
    http: Arc<HttpServers>,
    listener: TcpListener,
    port: u16,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let http = Arc::clone(&http);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let client = Arc::new(forward::Peer::new(peer));
            let service = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                let client = Arc::clone(&client);
                async move {
                    // An LLM listener or an HTTP one, by the config of this request.
                    let gateway = shared.snapshot.load().llm.get(&port).cloned();
                    match gateway {
                        Some(gateway) => llm_gateway::serve(gateway, req).await,
                        None => forward::serve(shared, port, client, req).await,
                    }
                }
            });
            let Some(protocol) = Protocol::peek(&stream, &mut stop).await else {
                return;
            };
            let io = TokioIo::new(stream);
            let stop = StopSignal::new(stop.clone(), stop.changed());
            let result = match protocol {
                Protocol::Http1 => {
                    let connection = pin!(http.http1.serve_connection(io, service).with_upgrades());
                    until_stopped(connection, |c| c.graceful_shutdown(), stop)
                        .await
                        .map_err(|e| e.to_string())
                }
                Protocol::H2c => {
                    let connection = pin!(http.http2.serve_connection(io, service));
                    until_stopped(connection, |c| c.graceful_shutdown(), stop)
                        .await
                        .map_err(|e| e.to_string())
                }
                Protocol::Undecided => {
                    let connection = pin!(http.auto.serve_connection_with_upgrades(io, service));
                    until_stopped(connection, |c| c.graceful_shutdown(), stop)
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            if let Err(error) = result {
                tracing::debug!(port, %peer, %error, "connection ended with an error");
            }
        });
    }
}

/// hyper's servers for a listener's connections, configured once.
///
/// A connection's first bytes choose the server: HTTP/1.1 goes straight to hyper's
/// HTTP/1 server, h2c (prior knowledge) to its HTTP/2 server. hyper-util's `auto`
/// server makes the same choice, but it reads those bytes and hands them back through
/// a wrapper that then sits under every read for the connection's whole life. A peek
/// leaves them in the socket. `auto` still serves a connection whose first segment is
/// too short to tell.
struct HttpServers {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

impl HttpServers {
    fn new(max_header_bytes: usize) -> Self {
        // hyper answers 431 when the request head exceeds its read buffer, and 400 for
        // a head it cannot parse. (hyper requires at least 8 KiB.)
        let read_buffer = max_header_bytes.max(8192);
        let header_list = u32::try_from(max_header_bytes).unwrap_or(u32::MAX);
        let mut http1 = http1::Builder::new();
        http1.max_buf_size(read_buffer);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.max_header_list_size(header_list);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1().max_buf_size(read_buffer);
        auto.http2().max_header_list_size(header_list);
        Self { http1, http2, auto }
    }
}

/// A connection polled to its end, asked once to shut down gracefully when the
/// sidecar stops it. (A future of its own rather than an `async fn`: generic over
/// hyper's connection types, an `async fn` trips rustc's `Send` inference for the
/// spawned task.)
struct UntilStopped<'a, C, F> {
    connection: Pin<&'a mut C>,
    shutdown: fn(Pin<&mut C>),
    stop: StopSignal<F>,
}

fn until_stopped<C, F>(
    connection: Pin<&mut C>,
    shutdown: fn(Pin<&mut C>),
    stop: StopSignal<F>,
) -> UntilStopped<'_, C, F> {
    UntilStopped {
        connection,
        shutdown,
        stop,
    }
}

impl<C: Future, F: Future> Future for UntilStopped<'_, C, F> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        if this.stop.poll_stop(cx) {
            (this.shutdown)(this.connection.as_mut());
        }
        this.connection.as_mut().poll(cx)
    }
}

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4). Its first word is the
/// method `PRI`, registered so that no HTTP/1 request starts this way.
const H2_PREFACE_START: &[u8; 4] = b"PRI ";

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    H2c,
    /// Fewer bytes than it takes to tell, all of them the preface's.
    Undecided,
}

impl Protocol {
    /// What `stream`'s first bytes say it speaks, without taking them from the socket:
    /// `None` when it closes (or `stop` changes) before sending any.
    async fn peek(stream: &TcpStream, stop: &mut watch::Receiver<bool>) -> Option<Self> {
        let mut first = [0; H2_PREFACE_START.len()];
        let peeked = tokio::select! {
            peeked = stream.peek(&mut first) => peeked,
            // A connection that has sent nothing yet has nothing to finish.
            _ = stop.changed() => return None,
        };
        match peeked {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(Self::of(&first[..n])),
        }
    }

    fn of(first: &[u8]) -> Self {
        let seen = first.len().min(H2_PREFACE_START.len());
        if first[..seen] != H2_PREFACE_START[..seen] {
            Self::Http1
        } else if seen == H2_PREFACE_START.len() {
            Self::H2c
        } else {
            Self::Undecided
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_http1_from_h2c() {
        assert_eq!(Protocol::of(b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(Protocol::of(b"PUT"), Protocol::Http1);
        assert_eq!(Protocol::of(b"G"), Protocol::Http1);
        assert_eq!(
            Protocol::of(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Protocol::H2c
        );
        assert_eq!(Protocol::of(b"PRI "), Protocol::H2c);
        // `P` could still be POST, PUT, PATCH or the preface.
        assert_eq!(Protocol::of(b"P"), Protocol::Undecided);
        assert_eq!(Protocol::of(b"PRI"), Protocol::Undecided);
        assert_eq!(Protocol::of(b"PRIX"), Protocol::Http1);
    }
}
