//! Where pod CPU comes from: one interface, three sources (`spec.weighting.source`).
//!
//! Each returns CPU *usage in cores* per pod; the controller divides by the pod's CPU
//! requests to get utilization, so every source is compared on the same scale.

mod metrics_server;
mod prometheus;

use std::collections::BTreeMap;

pub use metrics_server::MetricsServer;
pub use prometheus::Prometheus;

/// CPU usage in cores by pod name, averaged over `window` when the source says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuUsage {
    /// Cores per pod.
    pub cores: BTreeMap<String, f64>,
    /// The span each reading averages over (PodMetrics `window`, a PromQL range); the
    /// weight controller compares a reading with the traffic split over the same span.
    pub window: Option<std::time::Duration>,
}

/// Why a source gave no samples. The policy becomes Degraded and keeps its last weights.
#[derive(Debug, thiserror::Error)]
pub enum MetricsSourceError {
    /// The metrics.k8s.io API failed (metrics-server missing or down).
    #[error("metrics.k8s.io PodMetrics in namespace {namespace}: {source}")]
    MetricsServer {
        /// The namespace queried.
        namespace: String,
        /// The API error.
        source: kube::Error,
    },
    /// The Prometheus server could not be reached or answered with an error.
    #[error("Prometheus query at {url}: {reason}")]
    Prometheus {
        /// The server's base URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The source answered with something that is not CPU usage.
    #[error("{source_name}: pod {pod}: CPU usage {value:?} is not a non-negative number of cores")]
    BadSample {
        /// Which source.
        source_name: &'static str,
        /// The pod it was for.
        pod: String,
        /// The value as received.
        value: String,
    },
}

/// A source of per-pod CPU usage.
#[derive(Debug, Clone)]
pub enum MetricsSource {
    /// metrics.k8s.io PodMetrics.
    MetricsServer(MetricsServer),
    /// A Prometheus instant query (boxed: it carries its own HTTP client).
    Prometheus(Box<Prometheus>),
    /// Utilization reported by the sidecars from ORCA headers; the config server
    /// collects it, so the controller reads it from there and this source has none.
    LoadReports,
}

impl MetricsSource {
    /// The source a spec names (`weighting.source`, `guards.cpuSource`), with its
    /// Prometheus server when it is `prometheus` (validation makes sure it is given).
    pub fn new(
        kind: trimtab_api::balancer_policy::MetricsSource,
        prometheus: Option<&trimtab_api::balancer_policy::PrometheusSource>,
        client: &kube::Client,
    ) -> Self {
        use trimtab_api::balancer_policy::MetricsSource as Kind;
        match kind {
            Kind::MetricsServer => Self::MetricsServer(MetricsServer::new(client.clone())),
            Kind::Prometheus => {
                let (url, query) = prometheus.map_or(("", ""), |p| (&p.url, &p.query));
                Self::Prometheus(Box::new(Prometheus::new(url, query)))
            }
            Kind::LoadReports => Self::LoadReports,
        }
    }

    /// CPU usage of the pods of `namespace` that the source knows.
    pub async fn cpu_usage(&self, namespace: &str) -> Result<CpuUsage, MetricsSourceError> {
        match self {
            Self::MetricsServer(s) => s.cpu_usage(namespace).await,
            Self::Prometheus(s) => s.cpu_usage(namespace).await,
            Self::LoadReports => Ok(CpuUsage::default()),
        }
    }
}
