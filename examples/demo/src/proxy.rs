//! The Trimtab sidecar, in-process: one listener on a free loopback port, a new config
//! version for every phase (applied as the sidecar applies any reload), and what the
//! sidecar itself counted per endpoint.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, atomic::Ordering},
};

use serde::Serialize;
use trimtab_api::sidecar_config::{Route, SidecarConfig};
use trimtab_sidecar::{
    metrics::{Metrics, MetricsError},
    sidecar::{ApplyError, Options, Sidecar},
};

/// The sidecar's defaults for a local run (the `trimtab-sidecar` binary's defaults).
const MAX_REQUEST_BODY: u64 = 64 * 1024 * 1024;
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How often a free port is looked for again when another process takes it between
/// the probe and the sidecar's bind.
const BIND_ATTEMPTS: usize = 5;

/// Why the sidecar could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Its metrics could not be registered.
    #[error("sidecar metrics: {0}")]
    Metrics(#[from] MetricsError),
    /// No free loopback port could be found.
    #[error("cannot find a free port on 127.0.0.1 for the sidecar's listener: {0}")]
    Port(std::io::Error),
    /// The sidecar refused the config (the message names the field).
    #[error("the sidecar refused the demo's route: {0}")]
    Refused(#[from] ApplyError),
}

/// What the sidecar saw of one endpoint during a phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointCount {
    /// `host:port`.
    pub address: String,
    /// Responses (and failed attempts) the sidecar recorded for it.
    pub responses: u64,
    /// Of those, 5xx or no response.
    pub failures: u64,
    /// Its weight when the phase ended (cpuWeighted's learnt weight; 1 for the others).
    pub weight: u32,
}

/// The in-process sidecar and its one listener.
#[derive(Debug)]
pub struct Proxy {
    sidecar: Arc<Sidecar>,
    port: u16,
}

impl Proxy {
    /// A sidecar serving nothing yet, with its listener port chosen.
    pub fn new() -> Result<Self, ProxyError> {
        let sidecar = Sidecar::new(
            Options {
                listen_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                max_request_body: MAX_REQUEST_BODY,
                max_header_bytes: MAX_HEADER_BYTES,
                // No fail-static state: every run starts from the policy file.
                state_dir: None,
            },
            Metrics::new()?,
        );
        Ok(Self {
            sidecar,
            port: free_port().map_err(ProxyError::Port)?,
        })
    }

    /// Serves `route` on this proxy's port as the next config version. Requests in
    /// flight on the previous route finish on it; new ones take the new route.
    pub async fn serve(&mut self, mut route: Route) -> Result<(), ProxyError> {
        let mut attempt = 0;
        loop {
            route.listener.port = self.port;
            let config = SidecarConfig {
                version: self.sidecar.version() + 1,
                routes: vec![route.clone()],
            };
            match self.sidecar.apply(config).await {
                Ok(()) => return Ok(()),
                // Someone took the port since it was found free: find another.
                Err(ApplyError::Bind { .. }) if attempt + 1 < BIND_ATTEMPTS => {
                    attempt += 1;
                    self.port = free_port().map_err(ProxyError::Port)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The listener port routes are served on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`, where the bots send their requests.
    pub async fn url(&self) -> String {
        let addr = self
            .sidecar
            .listener_address(self.port)
            .await
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)));
        format!("http://{addr}")
    }

    /// What the sidecar counted for each endpoint of the route being served, in the
    /// route's endpoint order. The counts start at zero with every new set of
    /// endpoint addresses (each phase's replicas have new ports).
    pub fn counts(&self) -> Vec<EndpointCount> {
        self.sidecar
            .shared()
            .route(self.port)
            .map(|route| {
                route
                    .endpoints
                    .iter()
                    .map(|e| EndpointCount {
                        address: e.address.clone(),
                        responses: e.responses.load(Ordering::Relaxed),
                        failures: e.failures.load(Ordering::Relaxed),
                        weight: e.load.weight(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Responses with `status` the sidecar counted for the endpoints of the route
    /// being served (from its `trimtab_requests_total` metric).
    pub fn responses_with_status(&self, status: u16) -> u64 {
        let endpoints: Vec<String> = self.counts().into_iter().map(|c| c.address).collect();
        match self.sidecar.shared().metrics.encode() {
            Ok(text) => count_status(&text, status, &endpoints),
            Err(e) => {
                tracing::debug!(error = %e, "sidecar metrics could not be encoded");
                0
            }
        }
    }

    /// Stops the listener; open connections finish their requests.
    pub async fn shutdown(&self) {
        self.sidecar.shutdown().await;
    }
}

/// The sum of `trimtab_requests_total` samples with `code` `status` and an
/// `endpoint` among `endpoints`, from Prometheus text. (Earlier phases' endpoints keep
/// their counters in the registry; their addresses are not among `endpoints`.)
pub fn count_status(metrics: &str, status: u16, endpoints: &[String]) -> u64 {
    let code = format!("code=\"{status}\"");
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("trimtab_requests_total{"))
        .filter_map(|rest| rest.split_once('}'))
        .filter(|(labels, _)| {
            labels.split(',').any(|l| l == code)
                && endpoints
                    .iter()
                    .any(|e| labels.split(',').any(|l| l == format!("endpoint=\"{e}\"")))
        })
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        // Counter samples are whole numbers written as floats.
        .map(|v| v as u64)
        .sum()
}

/// A port nothing listens on right now (the OS's choice for port 0). The sidecar
/// binds it a moment later; [`Proxy::serve`] retries should another process win
/// that race. (The sidecar refuses port 0 in a config, so it cannot pick one itself.)
fn free_port() -> std::io::Result<u16> {
    let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(probe.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_one_status_of_the_current_endpoints_only() {
        let text = r#"# HELP trimtab_requests_total Requests forwarded.
# TYPE trimtab_requests_total counter
trimtab_requests_total{code="200",endpoint="127.0.0.1:4001",route="default/shop-demo"} 900
trimtab_requests_total{code="401",endpoint="127.0.0.1:4001",route="default/shop-demo"} 30
trimtab_requests_total{code="401",endpoint="127.0.0.1:4002",route="default/shop-demo"} 12
trimtab_requests_total{code="401",endpoint="127.0.0.1:3999",route="default/shop-demo"} 500
trimtab_requests_total{code="4010",endpoint="127.0.0.1:4001",route="default/shop-demo"} 7
"#;
        let endpoints = vec!["127.0.0.1:4001".to_owned(), "127.0.0.1:4002".to_owned()];
        assert_eq!(count_status(text, 401, &endpoints), 42);
        assert_eq!(count_status(text, 200, &endpoints), 900);
        assert_eq!(count_status(text, 503, &endpoints), 0);
    }
}
