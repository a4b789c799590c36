//! Resolve: a policy's backends as addresses, from its Service's EndpointSlices (or its
//! static list), with the backing pods' CPU requests that utilization is measured against.
//!
//! Pure: the controller passes what its watches hold, so this is tested without a cluster.

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use trimtab_api::balancer_policy::BalancerPolicySpec;

use crate::quantity::cpu_millis;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One backend as the controller sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResolvedEndpoint {
    /// `ip:port` or `[ipv6]:port`.
    pub address: String,
    /// The backing pod's name, when the EndpointSlice names it.
    pub pod: Option<String>,
    /// Whether the EndpointSlice reports it ready (absent means ready, as the API says).
    pub ready: bool,
    /// Sum of the pod's containers' CPU requests in millicores, when the pod is known
    /// and every container requests CPU.
    pub cpu_request_millis: Option<u64>,
}

/// Why a policy's backends could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    /// `spec.service` names a Service that does not exist.
    #[error("spec.service.name: Service {namespace}/{name} not found")]
    ServiceNotFound {
        /// The policy's namespace.
        namespace: String,
        /// The Service's name.
        name: String,
    },
    /// The Service has no port `spec.service.port`.
    #[error("spec.service.port: Service {name} has no port {port} (it has {available})")]
    PortNotFound {
        /// The Service's name.
        name: String,
        /// The port asked for.
        port: u16,
        /// The ports it does have.
        available: String,
    },
    /// Neither a Service nor a static list (an LLM policy has no endpoints to resolve).
    #[error("policy has neither spec.service nor spec.endpoints")]
    NoBackends,
}

/// The endpoints of `spec`, sorted by address so that equal inputs give equal output.
///
/// `slices` may yield any EndpointSlices of the namespace; only those labelled with the
/// Service's name are used. Terminating endpoints are left out: they are going away.
/// `pod` looks a backing pod up by name. Both are lookups into the watches' stores, not
/// copies: a reconcile must not cost a copy of every pod in the namespace.
pub fn endpoints<'s, P: std::ops::Deref<Target = Pod>>(
    spec: &BalancerPolicySpec,
    namespace: &str,
    service: Option<&Service>,
    slices: impl IntoIterator<Item = &'s EndpointSlice>,
    pod: impl Fn(&str) -> Option<P>,
) -> Result<Vec<ResolvedEndpoint>, ResolveError> {
    if let Some(list) = &spec.endpoints {
        let mut out: Vec<_> = list
            .iter()
            .map(|a| ResolvedEndpoint {
                address: a.0.clone(),
                pod: None,
                ready: true,
                cpu_request_millis: None,
            })
            .collect();
        out.sort();
        return Ok(out);
    }
    let Some(wanted) = &spec.service else {
        return Err(ResolveError::NoBackends);
    };
    let Some(service) = service else {
        return Err(ResolveError::ServiceNotFound {
            namespace: namespace.to_owned(),
            name: wanted.name.clone(),
        });
    };
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let Some(service_port) = ports.iter().find(|p| p.port == i32::from(wanted.port)) else {
        return Err(ResolveError::PortNotFound {
            name: wanted.name.clone(),
            port: wanted.port,
            available: ports
                .iter()
                .map(|p| p.port.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    // EndpointSlice ports carry the Service port's name (empty when it has none).
    let port_name = service_port.name.clone().unwrap_or_default();

    let mut out = Vec::new();
    for slice in slices {
        let labels = slice.metadata.labels.as_ref();
        if labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) != Some(&wanted.name) {
            continue;
        }
        let Some(port) = slice.ports.as_ref().and_then(|ports| {
            ports
                .iter()
                .find(|p| p.name.clone().unwrap_or_default() == port_name)
                .and_then(|p| p.port)
        }) else {
            continue;
        };
        let ipv6 = slice.address_type == "IPv6";
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.as_ref();
            if conditions.and_then(|c| c.terminating) == Some(true) {
                continue;
            }
            let ready = conditions.and_then(|c| c.ready) != Some(false);
            let endpoint_pod = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone());
            let cpu_request_millis = endpoint_pod
                .as_deref()
                .and_then(&pod)
                .and_then(|p| pod_cpu_request(&p));
            // One address per endpoint is the API's rule; take the first.
            if let Some(ip) = endpoint.addresses.first() {
                out.push(ResolvedEndpoint {
                    address: if ipv6 {
                        format!("[{ip}]:{port}")
                    } else {
                        format!("{ip}:{port}")
                    },
                    pod: endpoint_pod,
                    ready,
                    cpu_request_millis,
                });
            }
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.address == b.address);
    Ok(out)
}

/// The pod's total CPU request in millicores, or `None` if any container lacks one
/// (utilization relative to a partial request would be meaningless).
pub fn pod_cpu_request(pod: &Pod) -> Option<u64> {
    let containers = &pod.spec.as_ref()?.containers;
    if containers.is_empty() {
        return None;
    }
    containers.iter().try_fold(0u64, |sum, c| {
        let request = c.resources.as_ref()?.requests.as_ref()?.get("cpu")?;
        Some(sum + cpu_millis(&request.0).ok()?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use serde_json::json;
    use trimtab_api::BalancerPolicy;

    fn spec(service: serde_json::Value) -> BalancerPolicySpec {
        let policy: BalancerPolicy = serde_json::from_value(json!({
            "apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"clients": {"podSelector": {}}, "listener": {"port": 15001}, "service": service},
        }))
        .expect("policy");
        policy.spec
    }

    fn service() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "inventory", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": 9090}, {"name": "admin", "port": 9000}]},
        }))
        .expect("service")
    }

    fn slice(name: &str, service: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 9090}, {"name": "admin", "port": 9000}],
            "endpoints": endpoints,
        }))
        .expect("slice")
    }

    fn pod(name: &str, cpu: &[&str]) -> (String, Pod) {
        let containers: Vec<_> = cpu
            .iter()
            .enumerate()
            .map(|(i, c)| json!({"name": format!("c{i}"), "resources": {"requests": {"cpu": c}}}))
            .collect();
        let pod = serde_json::from_value(
            json!({"metadata": {"name": name}, "spec": {"containers": containers}}),
        )
        .expect("pod");
        (name.to_owned(), pod)
    }

    fn no_pods(_: &str) -> Option<&'static Pod> {
        None
    }

    #[test]
    fn resolves_the_target_port_of_the_named_service_port_from_every_slice() {
        let slices = [
            slice(
                "a",
                "inventory",
                json!([
                    {"addresses": ["10.1.0.2"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "inv-1"}},
                    {"addresses": ["10.1.0.3"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "inv-2"}},
                ]),
            ),
            slice(
                "b",
                "inventory",
                json!([
                    {"addresses": ["10.1.0.4"], "targetRef": {"kind": "Pod", "name": "inv-3"}},
                    {"addresses": ["10.1.0.5"], "conditions": {"terminating": true}},
                ]),
            ),
            slice("c", "other", json!([{"addresses": ["10.9.9.9"]}])),
        ];
        let pods = BTreeMap::from([pod("inv-1", &["250m", "250m"]), pod("inv-3", &["1"])]);
        let got = endpoints(
            &spec(json!({"name": "inventory", "port": 8080})),
            "shop",
            Some(&service()),
            &slices,
            |name: &str| pods.get(name),
        )
        .expect("resolves");
        assert_eq!(
            got,
            [
                ResolvedEndpoint {
                    address: "10.1.0.2:9090".into(),
                    pod: Some("inv-1".into()),
                    ready: true,
                    cpu_request_millis: Some(500)
                },
                ResolvedEndpoint {
                    address: "10.1.0.3:9090".into(),
                    pod: Some("inv-2".into()),
                    ready: false,
                    cpu_request_millis: None
                },
                ResolvedEndpoint {
                    address: "10.1.0.4:9090".into(),
                    pod: Some("inv-3".into()),
                    ready: true,
                    cpu_request_millis: Some(1000)
                },
            ]
        );
    }

    #[test]
    fn a_missing_service_or_port_is_named() {
        let s = spec(json!({"name": "inventory", "port": 81}));
        assert_eq!(
            endpoints(&s, "shop", None, &[], no_pods),
            Err(ResolveError::ServiceNotFound {
                namespace: "shop".into(),
                name: "inventory".into()
            })
        );
        let err = endpoints(&s, "shop", Some(&service()), &[], no_pods).expect_err("no port 81");
        assert_eq!(
            err.to_string(),
            "spec.service.port: Service inventory has no port 81 (it has 8080, 9000)"
        );
    }

    #[test]
    fn a_pod_with_a_container_lacking_a_cpu_request_has_no_request() {
        let (_, mut p) = pod("x", &["100m"]);
        assert_eq!(pod_cpu_request(&p), Some(100));
        if let Some(spec) = p.spec.as_mut() {
            spec.containers.push(Default::default());
        }
        assert_eq!(pod_cpu_request(&p), None);
    }
}
