//! The demo's BalancerPolicy (`examples/local-demo.yaml`), resolved the way the sidecar
//! resolves any policy file, then pointed at the replicas that actually run.
//!
//! The file is the one `kubectl apply` accepts; only three things are replaced for a
//! run on one machine: the static `endpoints` (the replicas' ephemeral ports), the
//! listener port (a free one, so the demo never collides with a sidecar already on the
//! file's port) and, for the baseline, the algorithm. Everything else — weighting,
//! retries, outlier detection — is served as written.

use std::{net::SocketAddr, path::Path};

use trimtab_api::{
    balancer_policy::Algorithm,
    sidecar_config::{Endpoint, Route},
};
use trimtab_sidecar::config_source::{self, SourceError};

/// A policy file the demo cannot use.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file does not parse or does not resolve (the message names the document
    /// and the field).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The demo runs one route; the file has none or several.
    #[error("{path}: {found} BalancerPolicy documents; expected exactly one with static endpoints")]
    Count {
        /// The file.
        path: String,
        /// How many it has.
        found: usize,
    },
    /// The demo starts one replica per endpoint the file lists.
    #[error(
        "{path}: spec.endpoints lists {listed} endpoints; the demo runs {replicas} shop replicas, one per endpoint"
    )]
    Endpoints {
        /// The file.
        path: String,
        /// Endpoints in the file.
        listed: usize,
        /// Replicas running.
        replicas: usize,
    },
}

/// The one route of a policy file's text (`path` only names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<Route, PolicyError> {
    let mut routes = config_source::parse_policies(text, path)?;
    if routes.len() != 1 {
        return Err(PolicyError::Count {
            path: path.display().to_string(),
            found: routes.len(),
        });
    }
    // Exactly one, checked above.
    Ok(routes.remove(0))
}

/// `route` served on `port` over `replicas` (in the file's endpoint order) with
/// `algorithm`. Pure: the same inputs give the same route.
pub fn for_replicas(
    route: &Route,
    path: &Path,
    replicas: &[SocketAddr],
    port: u16,
    algorithm: Algorithm,
) -> Result<Route, PolicyError> {
    if route.endpoints.len() != replicas.len() {
        return Err(PolicyError::Endpoints {
            path: path.display().to_string(),
            listed: route.endpoints.len(),
            replicas: replicas.len(),
        });
    }
    let mut route = route.clone();
    route.listener.port = port;
    route.algorithm = algorithm;
    route.endpoints = route
        .endpoints
        .iter()
        .zip(replicas)
        .map(|(written, addr)| Endpoint {
            address: addr.to_string(),
            ..written.clone()
        })
        .collect();
    Ok(route)
}

#[cfg(test)]
mod tests {
    use trimtab_api::balancer_policy::MetricsSource;

    use super::*;

    const LOCAL_DEMO: &str = include_str!("../../local-demo.yaml");

    fn path() -> &'static Path {
        Path::new("examples/local-demo.yaml")
    }

    #[test]
    fn the_example_file_is_a_cpu_weighted_policy_over_three_static_endpoints() {
        let route = parse(LOCAL_DEMO, path()).expect("the example resolves");
        assert_eq!(route.algorithm, Algorithm::CpuWeighted);
        assert_eq!(route.endpoints.len(), 3);
        assert_eq!(route.weighting.source, MetricsSource::LoadReports);
        assert!(
            route.weighting.interval.get() <= std::time::Duration::from_secs(2),
            "a one-minute demo needs weights that move within seconds"
        );
    }

    #[test]
    fn replaces_endpoints_port_and_algorithm_and_keeps_the_rest() {
        let route = parse(LOCAL_DEMO, path()).expect("the example resolves");
        let replicas: Vec<SocketAddr> = ["127.0.0.1:40001", "127.0.0.1:40002", "127.0.0.1:40003"]
            .iter()
            .map(|a| a.parse().expect("address"))
            .collect();
        let served =
            for_replicas(&route, path(), &replicas, 41000, Algorithm::RoundRobin).expect("fits");
        assert_eq!(served.listener.port, 41000);
        assert_eq!(served.algorithm, Algorithm::RoundRobin);
        let addresses: Vec<&str> = served
            .endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect();
        assert_eq!(
            addresses,
            ["127.0.0.1:40001", "127.0.0.1:40002", "127.0.0.1:40003"]
        );
        assert_eq!(served.weighting, route.weighting);
        assert_eq!(served.retries, route.retries);
    }

    #[test]
    fn refuses_a_file_whose_endpoints_do_not_match_the_replicas() {
        let route = parse(LOCAL_DEMO, path()).expect("the example resolves");
        let one: Vec<SocketAddr> = vec!["127.0.0.1:40001".parse().expect("address")];
        let error = for_replicas(&route, path(), &one, 41000, Algorithm::CpuWeighted)
            .expect_err("three endpoints, one replica");
        assert_eq!(
            error.to_string(),
            "examples/local-demo.yaml: spec.endpoints lists 3 endpoints; the demo runs 1 shop replicas, one per endpoint"
        );
    }

    #[test]
    fn refuses_a_file_without_a_policy() {
        let error = parse("kind: LoadTest\nmetadata: {name: x}\n", path()).expect_err("no policy");
        assert!(
            error
                .to_string()
                .starts_with("examples/local-demo.yaml: 0 BalancerPolicy documents"),
            "{error}"
        );
    }
}
