//! metrics.k8s.io: what `kubectl top pod` reads. Usage is the sum of the pod's
//! containers' `usage.cpu` over metrics-server's scrape window.

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
};

use super::{CpuUsage, MetricsSourceError};
use crate::quantity::cpu_millis;

/// Reads PodMetrics through the API server's aggregation layer.
#[derive(Clone)]
pub struct MetricsServer {
    client: Client,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsServer")
    }
}

impl MetricsServer {
    /// A source using `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    pub(super) async fn cpu_usage(&self, namespace: &str) -> Result<CpuUsage, MetricsSourceError> {
        let gvk = GroupVersionKind::gvk("metrics.k8s.io", "v1beta1", "PodMetrics");
        let resource = ApiResource::from_gvk_with_plural(&gvk, "pods");
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &resource);
        let list = api.list(&ListParams::default()).await.map_err(|source| {
            MetricsSourceError::MetricsServer {
                namespace: namespace.to_owned(),
                source,
            }
        })?;
        let mut usage = CpuUsage::default();
        for pod in list {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let containers = pod.data.get("containers").and_then(|c| c.as_array());
            let mut millis = 0u64;
            for container in containers.into_iter().flatten() {
                let cpu = container
                    .pointer("/usage/cpu")
                    .and_then(|c| c.as_str())
                    .unwrap_or("0");
                millis += cpu_millis(cpu).map_err(|_| MetricsSourceError::BadSample {
                    source_name: "metrics.k8s.io",
                    pod: name.clone(),
                    value: cpu.to_owned(),
                })?;
            }
            if usage.window.is_none() {
                usage.window = pod
                    .data
                    .get("window")
                    .and_then(|w| w.as_str())
                    .and_then(|w| w.parse::<trimtab_api::Duration>().ok())
                    .map(trimtab_api::Duration::get);
            }
            usage.cores.insert(name, millis as f64 / 1000.0);
        }
        Ok(usage)
    }
}
