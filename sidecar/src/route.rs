//! A route as the request path sees it: the resolved [`Route`] config plus the live
//! state of its endpoints (load, outlier ejection, health, reported load). Endpoint
//! state is kept across config reloads by address, so a reload neither forgets an
//! ejection nor resets the latency estimates.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::uri::Authority;
use rand::Rng;
use smallvec::SmallVec;
use trimtab_api::{
    balancer_policy::{Algorithm, EndpointState},
    sidecar_config::{self, Route},
};

use crate::{
    balancer::{Balance, Balancer, EndpointLoad, Target, weights::LoadReport},
    forward::MAX_IDLE_PER_ENDPOINT,
    http_client::ConnectionPool,
    metrics::{EndpointMetrics, Metrics, RouteMetrics},
    outlier::{self, OutlierState},
};

/// Milliseconds since the process started: the clock of ejections and samples.
pub fn now_ms() -> u64 {
    millis_at(Instant::now())
}

/// `now_ms()` at `now`, for callers that read the clock already.
pub fn millis_at(now: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(|| now);
    u64::try_from(now.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX)
}

/// Endpoint indices: a route's endpoints are few, so they live on the stack (a `Vec`
/// was an allocation per request).
pub type Indices = SmallVec<[usize; 8]>;

/// One backend and everything the sidecar has learnt about it.
#[derive(Debug)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// Keep-alive connections to it, kept across reloads with the endpoint.
    pub pool: Arc<ConnectionPool>,
    /// Load signals the balancer reads.
    pub load: EndpointLoad,
    /// Passive health.
    pub outlier: OutlierState,
    /// Active health: false after `unhealthyThreshold` failed probes.
    healthy: AtomicBool,
    /// Consecutive probe results, positive for passes and negative for failures.
    pub probe_streak: std::sync::atomic::AtomicI32,
    /// The config's weight and state (set on every reload).
    config_weight: AtomicU32,
    config_state: AtomicU8,
    /// cpuWeighted's load state (Active, Throttled, Ejected).
    load_state: AtomicU8,
    /// Latest ORCA report: utilization, qps and eps as `f64` bits, and when.
    orca_utilization: AtomicU64,
    orca_qps: AtomicU64,
    orca_eps: AtomicU64,
    orca_at_ms: AtomicU64,
    /// Responses and 5xx/failed responses seen, for qps and error rate when the
    /// endpoint reports no rps itself.
    pub responses: AtomicU64,
    /// Failures (5xx or no response).
    pub failures: AtomicU64,
    /// ORCA reports not yet sent to the control plane (`weighting.source: loadReports`).
    pub load_window: LoadWindow,
    /// When it joined (slow start); `None` for endpoints of the first config.
    joined: Option<Instant>,
    /// Metric children.
    pub metrics: EndpointMetrics,
}

impl Target for Endpoint {
    fn load(&self) -> &EndpointLoad {
        &self.load
    }
}

fn state_code(s: EndpointState) -> u8 {
    match s {
        EndpointState::Active => 0,
        EndpointState::Throttled => 1,
        EndpointState::Ejected => 2,
        EndpointState::Unhealthy => 3,
    }
}

fn state_from(code: u8) -> EndpointState {
    match code {
        1 => EndpointState::Throttled,
        2 => EndpointState::Ejected,
        3 => EndpointState::Unhealthy,
        _ => EndpointState::Active,
    }
}

impl Endpoint {
    fn new(
        config: &sidecar_config::Endpoint,
        route_id: &str,
        origin: Instant,
        joined: Option<Instant>,
        metrics: &Metrics,
    ) -> Option<Self> {
        // A URI authority is also a valid `Host` value.
        let authority: Authority = config.address.parse().ok()?;
        Some(Self {
            address: config.address.clone(),
            pool: ConnectionPool::new(authority.as_str(), MAX_IDLE_PER_ENDPOINT),
            load: EndpointLoad::new_at(config.weight, origin),
            outlier: OutlierState::default(),
            healthy: AtomicBool::new(true),
            probe_streak: Default::default(),
            config_weight: AtomicU32::new(config.weight),
            config_state: AtomicU8::new(state_code(config.state)),
            load_state: AtomicU8::new(state_code(EndpointState::Active)),
            orca_utilization: AtomicU64::new(0),
            orca_qps: AtomicU64::new(0),
            orca_eps: AtomicU64::new(0),
            orca_at_ms: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            load_window: LoadWindow::default(),
            joined,
            metrics: metrics.endpoint(route_id, &config.address),
        })
    }

    /// Whether active health checks currently pass (always true without them).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the active health result.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// The config's state for this endpoint.
    pub fn config_state(&self) -> EndpointState {
        state_from(self.config_state.load(Ordering::Relaxed))
    }

    /// The config's weight.
    pub fn config_weight(&self) -> u32 {
        self.config_weight.load(Ordering::Relaxed)
    }

    /// cpuWeighted's live load state.
    pub fn load_state(&self) -> EndpointState {
        state_from(self.load_state.load(Ordering::Relaxed))
    }

    /// Sets cpuWeighted's live load state.
    pub fn set_load_state(&self, state: EndpointState) {
        self.load_state.store(state_code(state), Ordering::Relaxed);
    }

    /// The state as reported in metrics and status: the worst of config, health,
    /// ejection and load.
    pub fn effective_state(&self, now_ms: u64) -> EndpointState {
        let config = self.config_state();
        if config == EndpointState::Unhealthy || !self.is_healthy() {
            EndpointState::Unhealthy
        } else if config == EndpointState::Ejected
            || self.outlier.is_ejected(now_ms)
            || self.load_state() == EndpointState::Ejected
        {
            EndpointState::Ejected
        } else if config == EndpointState::Throttled
            || self.load_state() == EndpointState::Throttled
        {
            EndpointState::Throttled
        } else {
            EndpointState::Active
        }
    }

    /// Whether the endpoint may receive traffic now.
    pub fn is_usable(&self, now_ms: u64) -> bool {
        matches!(
            self.effective_state(now_ms),
            EndpointState::Active | EndpointState::Throttled
        )
    }

    /// Records an ORCA load report from a response.
    pub fn record_load_report(&self, report: &LoadReport, now_ms: u64) {
        self.orca_utilization
            .store(report.utilization().to_bits(), Ordering::Relaxed);
        self.orca_qps
            .store(report.rps_fractional.to_bits(), Ordering::Relaxed);
        self.orca_eps.store(report.eps.to_bits(), Ordering::Relaxed);
        self.orca_at_ms.store(now_ms.max(1), Ordering::Relaxed);
    }

    /// The latest load report as (utilization, qps, eps, at_ms); at_ms 0 means none yet.
    pub fn latest_load_report(&self) -> (f64, f64, f64, u64) {
        (
            f64::from_bits(self.orca_utilization.load(Ordering::Relaxed)),
            f64::from_bits(self.orca_qps.load(Ordering::Relaxed)),
            f64::from_bits(self.orca_eps.load(Ordering::Relaxed)),
            self.orca_at_ms.load(Ordering::Relaxed),
        )
    }

    /// Slow start: the share of its full traffic a new endpoint gets, rising linearly
    /// from 0 to 1 over `window` (Envoy's slow_start_config with aggression 1.0).
    pub fn slow_start_factor(&self, window: Duration, now: Instant) -> f64 {
        match self.joined {
            Some(joined) if !window.is_zero() => {
                (now.saturating_duration_since(joined).as_secs_f64() / window.as_secs_f64())
                    .min(1.0)
            }
            _ => 1.0,
        }
    }

    fn reconfigure(&self, config: &sidecar_config::Endpoint, algorithm: Algorithm) {
        let previous = self.config_weight.swap(config.weight, Ordering::Relaxed);
        self.config_state
            .store(state_code(config.state), Ordering::Relaxed);
        // cpuWeighted keeps the weight it refined from load reports, unless the config
        // brings a new one (the operator's weight controller moved it).
        if algorithm != Algorithm::CpuWeighted || previous != config.weight {
            self.load.set_weight(config.weight);
        }
    }
}

/// The ORCA reports one endpoint sent since the control plane was last told about it
/// (`weighting.source: loadReports`). Sums, not means, so that the request path only
/// adds: utilization is summed in millionths so that one `fetch_add` records it. The
/// reporter swaps each counter to zero; a response racing the swap may land half in
/// this window and half in the next, never in neither.
#[derive(Debug, Default)]
pub struct LoadWindow {
    utilization_millionths: AtomicU64,
    reports: AtomicU64,
    errors: AtomicU64,
}

/// What [`LoadWindow::take`] drained: the reports of one window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadTotals {
    /// Responses that carried a load report.
    pub reports: u64,
    /// Of those, 5xx responses.
    pub errors: u64,
    /// The sum of their utilizations.
    pub utilization_sum: f64,
}

impl LoadTotals {
    /// The mean utilization of the window (0 when nothing was reported).
    pub fn mean_utilization(&self) -> f64 {
        if self.reports == 0 {
            0.0
        } else {
            self.utilization_sum / self.reports as f64
        }
    }
}

impl LoadWindow {
    /// Records one response's report: its utilization (gRFC A58's choice, see
    /// [`LoadReport::utilization`]) and whether the response was a 5xx.
    pub fn record(&self, utilization: f64, error: bool) {
        // Finite and non-negative: `parse_orca` refuses anything else; `as` saturates.
        let millionths = (utilization * 1e6).round() as u64;
        self.utilization_millionths
            .fetch_add(millionths, Ordering::Relaxed);
        self.reports.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Everything recorded since the last take, and starts a new window.
    pub fn take(&self) -> LoadTotals {
        let reports = self.reports.swap(0, Ordering::Relaxed);
        // A response racing the swaps may count its error here and its report in the
        // next window; a report with more errors than requests would be refused whole.
        let errors = self.errors.swap(0, Ordering::Relaxed).min(reports);
        LoadTotals {
            reports,
            errors,
            utilization_sum: self.utilization_millionths.swap(0, Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoEndpoint {
    /// The route has no endpoints, or none is usable (and panic mode found none either).
    NoneUsable {
        /// Endpoints configured.
        total: usize,
    },
    /// Every usable endpoint is at `limits.maxConcurrentRequests`.
    Saturated {
        /// Endpoints at the limit.
        usable: usize,
        /// The limit.
        limit: u32,
    },
}

/// One route being served.
#[derive(Debug)]
pub struct RouteRuntime {
    /// The resolved config.
    pub config: Route,
    /// `namespace/name`.
    pub id: String,
    /// Endpoints, in config order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// The strategy.
    pub balancer: Balancer,
    /// Requests in flight.
    pub active: AtomicU64,
    /// Retries in flight (the retry budget's numerator).
    pub active_retries: AtomicU64,
    /// Set when a newer config replaced this route: its background tasks stop.
    pub retired: AtomicBool,
    /// Metric children.
    pub metrics: RouteMetrics,
    /// When this route generation was built.
    pub built: Instant,
}

impl RouteRuntime {
    /// Builds the runtime of `config`, reusing the state of endpoints that `previous`
    /// (the same listener's route in the running config) already had.
    pub fn build(config: Route, previous: Option<&RouteRuntime>, metrics: &Metrics) -> Self {
        let id = config.id();
        let origin = previous.map_or_else(Instant::now, |p| p.built);
        let now = Instant::now();
        let known: HashMap<&str, &Arc<Endpoint>> = previous
            .filter(|p| p.id == id)
            .map(|p| {
                p.endpoints
                    .iter()
                    .map(|e| (e.address.as_str(), e))
                    .collect()
            })
            .unwrap_or_default();
        let joined = previous.map(|_| now);
        let endpoints: Vec<Arc<Endpoint>> = config
            .endpoints
            .iter()
            .filter_map(|e| match known.get(e.address.as_str()) {
                Some(existing) => {
                    existing.reconfigure(e, config.algorithm);
                    Some(Arc::clone(existing))
                }
                // `validate` admitted only host:port, which is always a valid authority.
                None => Endpoint::new(e, &id, origin, joined, metrics).map(Arc::new),
            })
            .collect();
        let weights: Vec<u32> = endpoints.iter().map(|e| e.load.weight()).collect();
        Self {
            balancer: Balancer::new(config.algorithm, &weights),
            metrics: metrics.route(&id),
            id,
            endpoints,
            active: AtomicU64::new(0),
            active_retries: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            config,
            built: origin,
        }
    }

    /// The endpoints usable now, or all of them in panic mode.
    pub fn eligible(&self, now_ms: u64) -> Indices {
        let usable: Indices = (0..self.endpoints.len())
            .filter(|&i| self.endpoints[i].is_usable(now_ms))
            .collect();
        if outlier::in_panic(
            usable.len(),
            self.endpoints.len(),
            self.config.outlier_detection.panic_threshold_percent,
        ) {
            return (0..self.endpoints.len()).collect();
        }
        usable
    }

    /// Chooses an endpoint, avoiding `tried` when any other is eligible, skipping
    /// endpoints at `limits.maxConcurrentRequests`, and holding back endpoints in slow
    /// start.
    pub fn pick<R: Rng + ?Sized>(&self, tried: &[usize], rng: &mut R) -> Result<usize, NoEndpoint> {
        self.pick_at(tried, rng, Instant::now())
    }

    /// [`Self::pick`] at `now`, for callers that read the clock already.
    pub fn pick_at<R: Rng + ?Sized>(
        &self,
        tried: &[usize],
        rng: &mut R,
        now: Instant,
    ) -> Result<usize, NoEndpoint> {
        let mut eligible = self.eligible(millis_at(now));
        if eligible.is_empty() {
            return Err(NoEndpoint::NoneUsable {
                total: self.endpoints.len(),
            });
        }
        let limit = self.config.limits.max_concurrent_requests;
        let usable = eligible.len();
        eligible.retain(|i| self.endpoints[*i].load.active() < limit);
        if eligible.is_empty() {
            return Err(NoEndpoint::Saturated { usable, limit });
        }
        if eligible.iter().any(|i| !tried.contains(i)) {
            eligible.retain(|i| !tried.contains(i));
        }
        let choice =
            self.balancer
                .pick(&self.endpoints, &eligible, rng)
                .ok_or(NoEndpoint::NoneUsable {
                    total: self.endpoints.len(),
                })?;
        let factor =
            self.endpoints[choice].slow_start_factor(self.config.limits.slow_start.get(), now);
        if factor < 1.0 && eligible.len() > 1 && rng.random::<f64>() >= factor {
            eligible.retain(|i| *i != choice);
            return Ok(self
                .balancer
                .pick(&self.endpoints, &eligible, rng)
                .unwrap_or(choice));
        }
        Ok(choice)
    }

    /// Records a finished attempt for outlier detection; returns the ejection time if
    /// it ejected the endpoint.
    pub fn record_outcome(&self, index: usize, outcome: outlier::Outcome) -> Option<Duration> {
        self.record_outcome_at(index, outcome, now_ms())
    }

    /// [`Self::record_outcome`] at `now` ([`now_ms`]'s clock).
    pub fn record_outcome_at(
        &self,
        index: usize,
        outcome: outlier::Outcome,
        now: u64,
    ) -> Option<Duration> {
        let endpoint = &self.endpoints[index];
        endpoint.responses.fetch_add(1, Ordering::Relaxed);
        if outcome == outlier::Outcome::Failure {
            endpoint.failures.fetch_add(1, Ordering::Relaxed);
        }
        // Counting the ejected endpoints is O(n): only failures need it.
        let ejected_now = match outcome {
            outlier::Outcome::Success => 0,
            outlier::Outcome::Failure => self
                .endpoints
                .iter()
                .filter(|e| e.outlier.is_ejected(now))
                .count(),
        };
        let ejected = endpoint.outlier.record(
            outcome,
            now,
            ejected_now,
            self.endpoints.len(),
            &self.config.outlier_detection,
        );
        if let Some(duration) = ejected {
            endpoint.metrics.ejections.inc();
            tracing::warn!(route = %self.id, endpoint = %endpoint.address, ?duration, "endpoint ejected by outlier detection");
        }
        ejected
    }
}

#[cfg(test)]
mod tests {
    use trimtab_api::{
        Duration as ApiDuration,
        balancer_policy::{Limits, Listener, OutlierDetection, Retries, Timeouts, Weighting},
    };

    use super::*;
    use crate::balancer::test_support::seeded;

    fn config(addresses: &[&str]) -> Route {
        Route {
            namespace: "test".into(),
            name: "r".into(),
            listener: Listener {
                port: 15001,
                protocol: Default::default(),
            },
            algorithm: Algorithm::RoundRobin,
            endpoints: addresses
                .iter()
                .map(|a| sidecar_config::Endpoint::new(*a))
                .collect(),
            weighting: Weighting::default(),
            health_check: None,
            outlier_detection: OutlierDetection {
                consecutive_errors: 1,
                ..OutlierDetection::default()
            },
            retries: Retries::default(),
            timeouts: Timeouts::default(),
            limits: Limits {
                slow_start: ApiDuration::from_secs(60),
                ..Limits::default()
            },
            llm: None,
        }
    }

    fn build(route: Route, previous: Option<&RouteRuntime>, metrics: &Metrics) -> RouteRuntime {
        RouteRuntime::build(route, previous, metrics)
    }

    #[test]
    fn a_reload_keeps_what_was_learnt_about_endpoints_that_stay() {
        let metrics = Metrics::new().expect("metrics");
        let first = build(config(&["10.0.0.1:80", "10.0.0.2:80"]), None, &metrics);
        first.record_outcome(0, outlier::Outcome::Failure);
        assert!(first.endpoints[0].outlier.is_ejected(now_ms()));
        let second = build(
            config(&["10.0.0.1:80", "10.0.0.3:80"]),
            Some(&first),
            &metrics,
        );
        assert!(Arc::ptr_eq(&first.endpoints[0], &second.endpoints[0]));
        assert!(
            second.endpoints[0].outlier.is_ejected(now_ms()),
            "the ejection was forgotten"
        );
        assert_eq!(second.eligible(now_ms()).as_slice(), [1]);
    }

    #[test]
    fn endpoints_that_join_later_start_slowly_but_the_first_ones_do_not() {
        let metrics = Metrics::new().expect("metrics");
        let first = build(config(&["10.0.0.1:80"]), None, &metrics);
        let second = build(
            config(&["10.0.0.1:80", "10.0.0.2:80"]),
            Some(&first),
            &metrics,
        );
        let window = Duration::from_secs(60);
        let now = Instant::now();
        assert_eq!(second.endpoints[0].slow_start_factor(window, now), 1.0);
        assert!(second.endpoints[1].slow_start_factor(window, now) < 0.01);
        assert_eq!(
            second.endpoints[1].slow_start_factor(window, now + window),
            1.0
        );
        // Just joined: nearly every pick goes to the established endpoint.
        let mut rng = seeded();
        let picks_of_new = (0..200)
            .filter(|_| second.pick(&[], &mut rng) == Ok(1))
            .count();
        assert!(picks_of_new < 10, "{picks_of_new}");
    }

    #[test]
    fn cpu_weighted_keeps_refined_weights_until_the_config_changes_them() {
        let metrics = Metrics::new().expect("metrics");
        let mut cfg = config(&["10.0.0.1:80"]);
        cfg.algorithm = Algorithm::CpuWeighted;
        let first = build(cfg.clone(), None, &metrics);
        first.endpoints[0].load.set_weight(57); // refined from load reports
        let second = build(cfg.clone(), Some(&first), &metrics);
        assert_eq!(second.endpoints[0].load.weight(), 57);
        cfg.endpoints[0].weight = 3; // the operator moved it
        let third = build(cfg, Some(&second), &metrics);
        assert_eq!(third.endpoints[0].load.weight(), 3);
    }

    #[test]
    fn a_load_window_sums_reports_and_starts_over_when_taken() {
        let window = LoadWindow::default();
        assert_eq!(window.take(), LoadTotals::default());
        window.record(0.25, false);
        window.record(0.75, true);
        window.record(0.5, false);
        let totals = window.take();
        assert_eq!((totals.reports, totals.errors), (3, 1));
        assert!((totals.mean_utilization() - 0.5).abs() < 1e-9, "{totals:?}");
        assert_eq!(window.take(), LoadTotals::default());
    }

    #[test]
    fn reports_why_no_endpoint_can_be_picked() {
        let metrics = Metrics::new().expect("metrics");
        let mut cfg = config(&["10.0.0.1:80"]);
        cfg.limits.max_concurrent_requests = 1;
        let route = build(cfg, None, &metrics);
        let mut rng = seeded();
        assert_eq!(route.pick(&[], &mut rng), Ok(0));
        route.endpoints[0].load.start();
        assert_eq!(
            route.pick(&[], &mut rng),
            Err(NoEndpoint::Saturated {
                usable: 1,
                limit: 1
            })
        );
        let empty = build(config(&[]), None, &metrics);
        assert_eq!(
            empty.pick(&[], &mut rng),
            Err(NoEndpoint::NoneUsable { total: 0 })
        );
    }
}
