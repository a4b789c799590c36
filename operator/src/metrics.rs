//! The operator's own Prometheus metrics, served on `/metrics`.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// The operator's metric families, registered once.
#[derive(Clone, Debug)]
pub struct Metrics {
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    source_errors: IntCounterVec,
    duration: HistogramVec,
    status_writes: HistogramVec,
}

/// The metrics of one controller: the families with its `controller` label.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    controller: &'static str,
    families: Metrics,
}

impl Metrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reconciles = IntCounterVec::new(
            Opts::new(
                "trimtab_operator_reconciles_total",
                "Reconciles that completed",
            ),
            &["controller"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "trimtab_operator_reconcile_errors_total",
                "Reconciles that failed, by reason",
            ),
            &["controller", "reason"],
        )?;
        let source_errors = IntCounterVec::new(
            Opts::new(
                "trimtab_operator_metrics_source_errors_total",
                "Failed CPU metrics queries",
            ),
            &["controller"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "trimtab_operator_reconcile_duration_seconds",
                "Time one reconcile took",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &["controller"],
        )?;
        // Its count is the status writes sent, changed or not: at a 1 s interval over
        // many policies, writes that change nothing are what loads the API server.
        let status_writes = HistogramVec::new(
            HistogramOpts::new(
                "trimtab_operator_status_write_duration_seconds",
                "Time one status write (server-side apply) took",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &["controller"],
        )?;
        for c in [&reconciles, &failures, &source_errors] {
            registry.register(Box::new(c.clone()))?;
        }
        for h in [&duration, &status_writes] {
            registry.register(Box::new(h.clone()))?;
        }
        Ok(Self {
            reconciles,
            failures,
            source_errors,
            duration,
            status_writes,
        })
    }

    /// The view of `controller` (e.g. `balancerpolicy`).
    pub fn controller(&self, controller: &'static str) -> ControllerMetrics {
        ControllerMetrics {
            controller,
            families: self.clone(),
        }
    }
}

impl ControllerMetrics {
    /// A completed reconcile that took `elapsed`.
    pub fn observe_reconcile(&self, elapsed: Duration) {
        self.families
            .reconciles
            .with_label_values(&[self.controller])
            .inc();
        self.families
            .duration
            .with_label_values(&[self.controller])
            .observe(elapsed.as_secs_f64());
    }

    /// A status write that took `elapsed`.
    pub fn observe_status_write(&self, elapsed: Duration) {
        self.families
            .status_writes
            .with_label_values(&[self.controller])
            .observe(elapsed.as_secs_f64());
    }

    /// A failed reconcile.
    pub fn reconcile_failed(&self, reason: &str) {
        self.families
            .failures
            .with_label_values(&[self.controller, reason])
            .inc();
    }

    /// A failed metrics query (the message goes to the log, not a label).
    pub fn metrics_source_error(&self, message: &str) {
        tracing::warn!(
            controller = self.controller,
            error = message,
            "CPU metrics unavailable"
        );
        self.families
            .source_errors
            .with_label_values(&[self.controller])
            .inc();
    }
}
