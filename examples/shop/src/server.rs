//! Starting and stopping a shop: binding the listener, serving HTTP/1.1 (keep-alive)
//! and h2c connections with hyper, wrapping every request with the worker pool, the
//! ORCA header and the metrics, and publishing the smoothed load ten times a second.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    api::{self, ApiError, Route},
    capacity::{CapacityError, Resized, WorkerPool},
    catalog::{Catalog, Oversold, ProductId},
    checkout::{OrderNumbers, StockDiscipline},
    config::{Bug, Config, ConfigError, ServiceTimeDistribution},
    load::{self, LoadMeter, LoadReport, Smoothed},
    metrics::Metrics,
    orca,
    sessions::Sessions,
};

/// How often the load averages are updated and the ORCA header rebuilt: often enough
/// that a one-second window is smooth, rarely enough to cost nothing.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// How long shutdown waits for in-flight requests before closing connections anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why a shop could not start. The cause is the error's `source()`, so print the chain
/// (anyhow's `{:#}`) to see it.
#[allow(missing_docs)] // the fields are described by each variant's message
#[derive(Debug, thiserror::Error)]
pub enum ShopError {
    #[error("invalid config")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("metrics could not be registered")]
    Metrics(#[from] prometheus::Error),
}

/// The last published load and the header that carries it, swapped as one.
#[derive(Debug)]
struct Published {
    report: LoadReport,
    header: HeaderValue,
}

impl Published {
    fn of(report: LoadReport) -> Self {
        // The ORCA text is ASCII digits, letters, `=`, `.`, `,` and spaces, always a
        // valid header value; the fallback only keeps this free of a panic path.
        let header =
            HeaderValue::from_str(&orca::text(&report)).unwrap_or(HeaderValue::from_static("TEXT"));
        Self { report, header }
    }
}

/// Everything a request can reach, shared behind one `Arc` (the `Context` of the
/// kube-rs controllers, for a web service).
#[derive(Debug)]
pub struct State {
    pub(crate) config: Config,
    pub(crate) store: Arc<Store>,
    pub(crate) pool: WorkerPool,
    pub(crate) meter: LoadMeter,
    pub(crate) metrics: Metrics,
    pub(crate) discipline: StockDiscipline,
    published: ArcSwap<Published>,
}

/// What replicas of one shop share, as they would share a database: the catalog with
/// its stock, the login sessions with their carts, and the order numbers. Each replica
/// keeps its own worker pool, load, metrics and bugs.
#[derive(Debug)]
pub struct Store {
    pub(crate) catalog: Catalog,
    pub(crate) sessions: Sessions,
    pub(crate) orders: OrderNumbers,
}

impl Store {
    /// A store with the catalog `config` describes (its `products` and
    /// `initial_stock`), for replicas started with [`Shop::bind_replica`].
    pub fn new(config: &Config) -> Result<Arc<Self>, ShopError> {
        config.validate()?;
        Ok(Arc::new(Self {
            catalog: Catalog::new(config.products, config.initial_stock),
            sessions: Sessions::new(),
            orders: OrderNumbers::default(),
        }))
    }
}

impl State {
    fn new(config: Config, store: Arc<Store>) -> Result<Self, ShopError> {
        config.validate()?;
        let pool =
            WorkerPool::new(config.capacity, config.base_workers).map_err(ConfigError::from)?;
        let initial = LoadReport {
            workers: pool.workers(),
            ..LoadReport::default()
        };
        Ok(Self {
            store,
            pool,
            meter: LoadMeter::new(),
            metrics: Metrics::new()?,
            discipline: if config.has_bug(Bug::Oversell) {
                StockDiscipline::CheckThenAct
            } else {
                StockDiscipline::Atomic
            },
            published: ArcSwap::from_pointee(Published::of(initial)),
            config,
        })
    }

    /// The load most recently published.
    pub(crate) fn load(&self) -> LoadReport {
        self.published.load().report
    }

    /// Sets the gauges that describe state rather than count events, at scrape time.
    pub(crate) fn refresh_gauges(&self) {
        let load = self.load();
        let metrics = &self.metrics;
        metrics.utilization.set(load.utilization);
        metrics.demand.set(load.demand);
        metrics.queued.set(self.meter.queued());
        metrics
            .workers
            .set(i64::try_from(self.pool.workers()).unwrap_or(i64::MAX));
        metrics.capacity.set(self.pool.capacity());
        let oversold = self.store.catalog.oversold();
        metrics
            .stock_negative_products
            .set(i64::from(oversold.products));
        metrics.oversold_units.set(oversold.units);
    }

    /// How long this request holds its slot.
    fn service_time(&self) -> Duration {
        let mean = self.config.service_time;
        match self.config.service_time_distribution {
            ServiceTimeDistribution::Constant => mean,
            ServiceTimeDistribution::Exponential => {
                // Inverse-CDF sampling: −mean·ln(1−u), u uniform in [0, 1).
                let u: f64 = rand::random();
                Duration::try_from_secs_f64(mean.as_secs_f64() * -(1.0 - u).ln()).unwrap_or(mean)
            }
        }
    }
}

/// Starts shops.
#[derive(Debug)]
pub struct Shop;

impl Shop {
    /// Binds `config.listen` (port 0 for an ephemeral port) and serves until the
    /// returned handle is shut down or dropped. Must be called within a Tokio runtime.
    pub async fn bind(config: Config) -> Result<(SocketAddr, ShopHandle), ShopError> {
        let store = Store::new(&config)?;
        Self::bind_replica(config, store).await
    }

    /// Starts one replica of a shop whose catalog, sessions and carts live in `store`,
    /// shared with the other replicas: a user logged in on one replica can check out
    /// on another, and checkouts on different replicas race for the same stock. The
    /// store's catalog wins over `config.products` and `config.initial_stock`.
    pub async fn bind_replica(
        config: Config,
        store: Arc<Store>,
    ) -> Result<(SocketAddr, ShopHandle), ShopError> {
        let state = Arc::new(State::new(config, store)?);
        let listen = state.config.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ShopError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ShopError::Bind {
            addr: listen,
            source,
        })?;
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::clone(&state), cancel.clone()));
        let sampler = tokio::spawn(publish_load(Arc::clone(&state), cancel.clone()));
        tracing::info!(
            %addr,
            capacity = state.pool.capacity(),
            workers = state.pool.workers(),
            service_time = ?state.config.service_time,
            bugs = ?state.config.bugs,
            "shop listening"
        );
        let handle = ShopHandle {
            addr,
            state,
            cancel,
            tasks: vec![server, sampler],
        };
        Ok((addr, handle))
    }
}

/// A running shop. Dropping it stops the shop; [`ShopHandle::shutdown`] also waits
/// for in-flight requests to finish.
#[derive(Debug)]
pub struct ShopHandle {
    addr: SocketAddr,
    state: Arc<State>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl ShopHandle {
    /// The address the shop listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, what a scenario's `--target` would be.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes the emulated capacity, as `POST /admin/capacity` does.
    pub fn set_capacity(&self, capacity: f64) -> Result<Resized, CapacityError> {
        self.state.pool.set_capacity(capacity)
    }

    /// The capacity multiplier in force.
    pub fn capacity(&self) -> f64 {
        self.state.pool.capacity()
    }

    /// The load last published (what the ORCA header says now).
    pub fn load(&self) -> LoadReport {
        self.state.load()
    }

    /// Stock of `product`, if it exists.
    pub fn stock(&self, product: ProductId) -> Option<i64> {
        self.state.store.catalog.get(product).map(|p| p.stock())
    }

    /// Sets the stock of `product` (restocking between runs); false if it does not exist.
    pub fn set_stock(&self, product: ProductId, stock: i64) -> bool {
        self.state
            .store
            .catalog
            .get(product)
            .map(|p| p.set_stock(stock))
            .is_some()
    }

    /// Products below zero stock and the units oversold.
    pub fn oversold(&self) -> Oversold {
        self.state.store.catalog.oversold()
    }

    /// The config the shop runs with.
    pub fn config(&self) -> &Config {
        &self.state.config
    }

    /// Stops accepting connections, lets in-flight requests finish (up to
    /// [`SHUTDOWN_GRACE`]) and waits for the shop's tasks to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        for task in self.tasks.drain(..) {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "shop task ended abnormally");
            }
        }
    }
}

impl Drop for ShopHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The accept loop.
async fn serve(listener: TcpListener, state: Arc<State>, cancel: CancellationToken) {
    let mut http = auto::Builder::new(TokioExecutor::new());
    // With a timer, hyper enforces its 30 s header read timeout, so a client that
    // opens a connection and never finishes its request head cannot hold it forever.
    http.http1().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    // Connection tasks, so the ones still open after the grace period can be ended.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Reap finished connections so the set holds only open ones.
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = cancel.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small JSON responses: without this, Nagle's algorithm and delayed ACKs can
        // add tens of milliseconds to a keep-alive exchange and swamp the service time.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let state = Arc::clone(&state);
        let service = service_fn(move |req| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(handle(state, req).await) }
        });
        let connection = graceful.watch(
            http.serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = ?SHUTDOWN_GRACE,
            open = connections.len(),
            "connections still open after the grace period; closing them"
        );
    }
    connections.shutdown().await;
}

/// Decrements the in-flight gauge however the request ends (finished or abandoned).
struct InFlight<'a>(&'a prometheus::IntGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One request: the worker slot and service time for shop work, then the API, then
/// the ORCA header and the metrics.
async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    state.metrics.in_flight.inc();
    let _in_flight = InFlight(&state.metrics.in_flight);
    let route = Route::recognize(req.method(), req.uri().path());
    let label = route.label();
    let mut response = if route.holds_worker_slot() {
        match state.pool.admit(&state.meter).await {
            Some(slot) => {
                let service_time = state.service_time();
                if !service_time.is_zero() {
                    tokio::time::sleep(service_time).await;
                }
                let response = api::respond(&state, route, req).await;
                drop(slot);
                response
            }
            None => ApiError::PoolClosed.into_response(),
        }
    } else {
        api::respond(&state, route, req).await
    };
    response
        .headers_mut()
        .insert(orca::HEADER, state.published.load().header.clone());
    let status = response.status();
    state.meter.record_response(status.as_u16());
    state
        .metrics
        .requests
        .with_label_values(&[label, status.as_str()])
        .inc();
    state
        .metrics
        .latency
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Every [`SAMPLE_INTERVAL`], folds the last interval's load into the averages and
/// publishes the new report and ORCA header.
async fn publish_load(state: Arc<State>, cancel: CancellationToken) {
    let mut smoothed = Smoothed::new(state.config.utilization_window);
    let mut previous = state.meter.totals();
    let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = cancel.cancelled() => break,
        }
        let current = state.meter.totals();
        let workers = state.pool.workers();
        if let Some(sample) = load::sample(&previous, &current, workers) {
            let elapsed =
                Duration::from_micros(u64::try_from(current.at_us - previous.at_us).unwrap_or(0));
            let report = smoothed.update(&sample, elapsed, workers, state.meter.queued());
            state.published.store(Arc::new(Published::of(report)));
            previous = current;
        }
    }
}
