//! Prometheus metrics. Families are registered once; each route and endpoint keeps its
//! own labelled children, so the request path only touches atomics (the label lookup
//! behind a `MetricVec` takes a lock, and happens once per endpoint and status code).

use std::sync::OnceLock;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Request latency buckets in seconds, 1 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A metric that could not be registered (a duplicate name: a programming error).
#[derive(Debug, thiserror::Error)]
#[error("metric registration failed: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Every metric the sidecar exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    active: IntGaugeVec,
    retries: IntCounterVec,
    ejections: IntCounterVec,
    /// Endpoint weight by route and endpoint.
    pub weight: GaugeVec,
    /// 1 for the endpoint's current state, 0 for the others.
    pub state: IntGaugeVec,
    /// Latest reported utilization (ORCA), by route and endpoint.
    pub utilization: GaugeVec,
    /// n·Σ fᵢ·pᵢ per route.
    pub balance_score: GaugeVec,
    /// Version of the config being served.
    pub config_version: IntGauge,
    /// Config loads by result (applied, refused).
    pub config_loads: IntCounterVec,
    /// 1 while the last exchange with the control plane succeeded, else 0.
    pub control_plane_connected: IntGauge,
    /// Configs received from the control plane, by result (applied, refused).
    pub control_plane_updates: IntCounterVec,
    /// Failed control-plane requests, by kind (connect, tls, timeout, unauthorized, …):
    /// what an operator reads first when `connected` is 0.
    pub control_plane_errors: IntCounterVec,
    /// Load reports posted to the control plane, by result (sent, failed).
    pub load_reports: IntCounterVec,
}

impl Metrics {
    /// Registers every family in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let route_endpoint = &["route", "endpoint"];
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new("trimtab_requests_total", "Requests forwarded, by route, endpoint and response status."),
                &["route", "endpoint", "code"],
            )?,
            latency: HistogramVec::new(
                HistogramOpts::new(
                    "trimtab_request_duration_seconds",
                    "Time from sending a request to an endpoint until its response headers arrived.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                route_endpoint,
            )?,
            active: IntGaugeVec::new(Opts::new("trimtab_active_requests", "Requests in flight, by route."), &["route"])?,
            retries: IntCounterVec::new(Opts::new("trimtab_retries_total", "Retried attempts, by route."), &["route"])?,
            ejections: IntCounterVec::new(
                Opts::new("trimtab_ejections_total", "Outlier ejections, by route and endpoint."),
                route_endpoint,
            )?,
            weight: GaugeVec::new(Opts::new("trimtab_endpoint_weight", "Current endpoint weight."), route_endpoint)?,
            state: IntGaugeVec::new(
                Opts::new("trimtab_endpoint_state", "1 for the endpoint's current state (Active, Throttled, Ejected, Unhealthy)."),
                &["route", "endpoint", "state"],
            )?,
            utilization: GaugeVec::new(
                Opts::new("trimtab_endpoint_utilization", "Latest utilization the endpoint reported (ORCA), 0-1."),
                route_endpoint,
            )?,
            balance_score: GaugeVec::new(
                Opts::new(
                    "trimtab_balance_score",
                    "n * sum(f_i * p_i): share of traffic times share of load; 1.0 is perfectly even.",
                ),
                &["route"],
            )?,
            config_version: IntGauge::new("trimtab_config_version", "Version of the config being served.")?,
            config_loads: IntCounterVec::new(
                Opts::new("trimtab_config_loads_total", "Config loads by result: applied or refused."),
                &["result"],
            )?,
            control_plane_connected: IntGauge::new(
                "trimtab_control_plane_connected",
                "1 while the last request to the control plane succeeded, 0 while it cannot be reached or refuses.",
            )?,
            control_plane_updates: IntCounterVec::new(
                Opts::new(
                    "trimtab_control_plane_config_updates_total",
                    "Configs received from the control plane, by result: applied or refused.",
                ),
                &["result"],
            )?,
            control_plane_errors: IntCounterVec::new(
                Opts::new(
                    "trimtab_control_plane_errors_total",
                    "Failed control-plane requests, by kind: token, connect, tls, transport, timeout, unauthorized, forbidden, unavailable, status, malformed, protocol.",
                ),
                &["kind"],
            )?,
            load_reports: IntCounterVec::new(
                Opts::new(
                    "trimtab_load_reports_total",
                    "Load reports posted to the control plane, by result: sent or failed.",
                ),
                &["result"],
            )?,
            registry,
        };
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.latency.clone()))?;
        m.registry.register(Box::new(m.active.clone()))?;
        m.registry.register(Box::new(m.retries.clone()))?;
        m.registry.register(Box::new(m.ejections.clone()))?;
        m.registry.register(Box::new(m.weight.clone()))?;
        m.registry.register(Box::new(m.state.clone()))?;
        m.registry.register(Box::new(m.utilization.clone()))?;
        m.registry.register(Box::new(m.balance_score.clone()))?;
        m.registry.register(Box::new(m.config_version.clone()))?;
        m.registry.register(Box::new(m.config_loads.clone()))?;
        m.registry
            .register(Box::new(m.control_plane_connected.clone()))?;
        m.registry
            .register(Box::new(m.control_plane_updates.clone()))?;
        m.registry
            .register(Box::new(m.control_plane_errors.clone()))?;
        m.registry.register(Box::new(m.load_reports.clone()))?;
        Ok(m)
    }

    /// Registers another family (the LLM gateway's) in the same registry, so `/metrics`
    /// shows it.
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), MetricsError> {
        Ok(self.registry.register(collector)?)
    }

    /// The text exposition format of every metric.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The children of one route.
    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            active: self.active.with_label_values(&[route]),
            retries: self.retries.with_label_values(&[route]),
        }
    }

    /// The children of one endpoint of a route.
    pub fn endpoint(&self, route: &str, endpoint: &str) -> EndpointMetrics {
        EndpointMetrics {
            route: route.to_owned(),
            endpoint: endpoint.to_owned(),
            requests: self.requests.clone(),
            by_code: (100..600).map(|_| OnceLock::new()).collect(),
            latency: self.latency.with_label_values(&[route, endpoint]),
            ejections: self.ejections.with_label_values(&[route, endpoint]),
        }
    }

    /// Drops the gauges of an endpoint that left its route.
    pub fn forget_endpoint(&self, route: &str, endpoint: &str) {
        let _ = self.weight.remove_label_values(&[route, endpoint]);
        let _ = self.utilization.remove_label_values(&[route, endpoint]);
        for state in ["Active", "Throttled", "Ejected", "Unhealthy"] {
            let _ = self.state.remove_label_values(&[route, endpoint, state]);
        }
    }
}

/// Per-route metric children.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// Requests in flight.
    pub active: IntGauge,
    /// Retried attempts.
    pub retries: IntCounter,
}

/// Per-endpoint metric children; counters by status code are created on first use.
#[derive(Debug)]
pub struct EndpointMetrics {
    route: String,
    endpoint: String,
    requests: IntCounterVec,
    by_code: Vec<OnceLock<IntCounter>>,
    /// Time to response headers.
    pub latency: Histogram,
    /// Outlier ejections.
    pub ejections: IntCounter,
}

impl EndpointMetrics {
    /// Counts one response with `status` (100-599; others are counted as 502).
    pub fn count(&self, status: u16) {
        let index = usize::from(status.clamp(100, 599) - 100);
        self.by_code[index]
            .get_or_init(|| {
                let code = (index + 100).to_string();
                self.requests
                    .with_label_values(&[&self.route, &self.endpoint, &code])
            })
            .inc();
    }
}
