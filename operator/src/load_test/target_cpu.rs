//! The target's CPU for the guards: the mean utilization (usage ÷ CPU requests) of
//! the pods `spec.target.podSelector` picks, from the source `guards.cpuSource` names
//! (the same sources, and the same division, as BalancerPolicy weights).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    ResourceExt,
    core::{Selector, SelectorExt},
};

use crate::{balancer_policy::resolve::pod_cpu_request, metrics_source::CpuUsage};

/// The mean utilization of the `namespace` pods `selector` picks that have both a CPU
/// request and a usage sample; `None` when there are none (nothing to judge by).
pub fn utilization(
    pods: &[Arc<Pod>],
    namespace: &str,
    selector: &Selector,
    usage: &CpuUsage,
) -> Option<f64> {
    let samples: Vec<f64> = pods
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .filter(|p| selector.matches(p.labels()))
        .filter_map(|p| {
            let cores = usage.cores.get(&p.name_any())?;
            let request = pod_cpu_request(p).filter(|&m| m > 0)?;
            Some(cores * 1000.0 / request as f64)
        })
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum::<f64>() / samples.len() as f64)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    fn pod(name: &str, namespace: &str, app: &str, cpu: Option<&str>) -> Arc<Pod> {
        let resources = cpu.map_or(json!({}), |c| json!({"requests": {"cpu": c}}));
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
                "spec": {"containers": [{"name": "app", "resources": resources}]},
            }))
            .expect("pod"),
        )
    }

    #[test]
    fn the_mean_of_usage_over_requests_of_the_selected_pods() {
        let pods = [
            pod("a", "shop", "web", Some("500m")),
            pod("b", "shop", "web", Some("1")),
            pod("c", "shop", "db", Some("1")),
            pod("d", "other", "web", Some("1")),
            pod("e", "shop", "web", None),
        ];
        let usage = CpuUsage {
            cores: BTreeMap::from(
                [("a", 0.4), ("b", 0.6), ("c", 1.0), ("d", 1.0), ("e", 1.0)]
                    .map(|(p, c)| (p.to_owned(), c)),
            ),
            window: None,
        };
        let web = Selector::from_iter([("app".to_owned(), "web".to_owned())]);
        // a: 0.4 / 0.5 = 0.8; b: 0.6 / 1 = 0.6; c is not web, d is elsewhere, e has no
        // request.
        let u = utilization(&pods, "shop", &web, &usage).expect("two pods");
        assert!((u - 0.7).abs() < 1e-9, "{u}");
        let none = Selector::from_iter([("app".to_owned(), "cache".to_owned())]);
        assert_eq!(utilization(&pods, "shop", &none, &usage), None);
    }
}
