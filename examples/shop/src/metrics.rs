//! The shop's Prometheus metrics, on `GET /metrics`. Counters and histograms are
//! updated per request; gauges that describe state (utilization, stock, sessions) are
//! set when scraped, from the same sources the API answers from.

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the shop exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Responses by route (a fixed name, never the raw path) and status code.
    pub requests: IntCounterVec,
    /// Time from request head to response, by route, queueing for a slot included.
    pub latency: HistogramVec,
    /// Requests being handled now.
    pub in_flight: IntGauge,
    /// Smoothed busy share of the worker slots (the ORCA `cpu_utilization`).
    pub utilization: Gauge,
    /// Smoothed (busy + queued) ÷ slots.
    pub demand: Gauge,
    /// Requests waiting for a worker slot now.
    pub queued: IntGauge,
    /// Worker slots.
    pub workers: IntGauge,
    /// Capacity multiplier in force.
    pub capacity: Gauge,
    /// Products whose stock is below zero (only `--bug oversell` makes this non-zero).
    pub stock_negative_products: IntGauge,
    /// Units sold that did not exist.
    pub oversold_units: IntGauge,
    /// Checkouts by result: `placed` or `refused`.
    pub orders: IntCounterVec,
    /// Sessions opened by `POST /api/login` and still held.
    pub sessions: IntGauge,
}

/// Latency buckets from 1 ms to about 16 s, doubling: the service time is milliseconds
/// and an overloaded replica's queue can reach seconds.
fn latency_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

impl Metrics {
    /// Creates and registers every metric in a registry of its own (one per shop, so
    /// several shops in one test process do not collide).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "shop_requests_total",
                "Responses sent, by route and status code",
            ),
            &["route", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "shop_request_duration_seconds",
                "Time from request to response, queueing for a worker slot included",
            )
            .buckets(latency_buckets()),
            &["route"],
        )?;
        let in_flight = IntGauge::new("shop_requests_in_flight", "Requests being handled now")?;
        let utilization = Gauge::new(
            "shop_utilization",
            "Smoothed share of worker slots in use, as reported in ORCA cpu_utilization",
        )?;
        let demand = Gauge::new(
            "shop_demand",
            "Smoothed (busy + queued requests) / worker slots; above 1 when requests queue",
        )?;
        let queued = IntGauge::new("shop_queued_requests", "Requests waiting for a worker slot")?;
        let workers = IntGauge::new(
            "shop_worker_slots",
            "Worker slots (capacity x base workers)",
        )?;
        let capacity = Gauge::new("shop_capacity", "Emulated capacity multiplier")?;
        let stock_negative_products = IntGauge::new(
            "shop_stock_negative_products",
            "Products whose stock is below zero: oversold",
        )?;
        let oversold_units = IntGauge::new(
            "shop_oversold_units",
            "Units sold beyond the stock that existed",
        )?;
        let orders = IntCounterVec::new(
            Opts::new(
                "shop_orders_total",
                "Checkouts, by result (placed or refused)",
            ),
            &["result"],
        )?;
        let sessions = IntGauge::new("shop_sessions", "Sessions opened by POST /api/login")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(utilization.clone()))?;
        registry.register(Box::new(demand.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(workers.clone()))?;
        registry.register(Box::new(capacity.clone()))?;
        registry.register(Box::new(stock_negative_products.clone()))?;
        registry.register(Box::new(oversold_units.clone()))?;
        registry.register(Box::new(orders.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        Ok(Self {
            registry,
            requests,
            latency,
            in_flight,
            utilization,
            demand,
            queued,
            workers,
            capacity,
            stock_negative_products,
            oversold_units,
            orders,
            sessions,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        Ok(buffer)
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let metrics = Metrics::new().expect("metrics register");
        metrics.requests.with_label_values(&["login", "200"]).inc();
        metrics.latency.with_label_values(&["login"]).observe(0.01);
        metrics.orders.with_label_values(&["placed"]).inc();
        let text = String::from_utf8(metrics.encode().expect("encodes")).expect("utf-8");
        for name in [
            "shop_requests_total",
            "shop_request_duration_seconds_bucket",
            "shop_requests_in_flight",
            "shop_utilization",
            "shop_stock_negative_products",
            "shop_orders_total",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn two_shops_in_one_process_have_separate_registries() {
        assert!(Metrics::new().is_ok());
        assert!(Metrics::new().is_ok());
    }
}
