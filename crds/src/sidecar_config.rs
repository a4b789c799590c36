//! The resolved per-pod sidecar configuration, shared by the operator (which builds it)
//! and the sidecar (which serves it).
//!
//! A [`BalancerPolicy`] says *what* should happen; a [`Route`] is that policy resolved
//! for one pod: the endpoints are concrete `host:port` addresses with a weight and a
//! state, and every setting has its default filled in. The sidecar never reads a
//! policy's `service:` itself — the operator resolves EndpointSlices — but a policy with
//! a static `endpoints:` list resolves without a cluster ([`Route::from_policy`]), which
//! is how the same YAML runs locally.
//!
//! The setting structs are the CRD's own ([`Retries`], [`OutlierDetection`], …): one
//! place for each concept, so a field added to the CRD reaches the sidecar unchanged.
//!
//! A policy with `providers:` resolves to a route whose [`Route::llm`] carries the
//! providers and the LLM settings with their defaults filled in; it also resolves
//! without a cluster. API keys stay *sources* (a file, an environment variable) that the
//! sidecar reads when it sends; only a key the operator read from a Secret travels as a
//! value, in a [`SecretValue`] that never shows in `Debug` output, and that
//! [`SidecarConfig::redacted`] blanks before the config is shown anywhere.

use std::{collections::HashMap, net::Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::balancer_policy::{
    Algorithm, BalancerPolicy, ContextFitting, EndpointState, Failover, HealthCheck, Limits,
    Listener, ListenerProtocol, OutlierDetection, Provider, Retries, Routing, Timeouts, Weighting,
};

/// The largest weight an endpoint may carry (the CRD's `maxWeight` bound).
pub const MAX_ENDPOINT_WEIGHT: u32 = 10_000;

/// The largest number of retry attempts (the CRD's `retries.attempts` bound).
pub const MAX_RETRY_ATTEMPTS: u32 = 10;

/// Everything one sidecar serves: one route per local listener.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarConfig {
    /// Increases with every change; a sidecar never goes back to an older version.
    pub version: u64,
    /// One route per listener port.
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// One policy resolved for one pod: a listener and the endpoints behind it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Namespace of the policy this route comes from.
    pub namespace: String,
    /// Name of the policy this route comes from.
    pub name: String,
    /// The local listener (port and dialect).
    pub listener: Listener,
    /// How requests are spread over the endpoints.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// The backends, with weights and states.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// How `cpuWeighted` refines weights; the defaults when the policy had none.
    #[serde(default)]
    pub weighting: Weighting,
    /// Active health checks, when the policy asks for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Passive outlier detection.
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    /// Retries of failed requests.
    #[serde(default)]
    pub retries: Retries,
    /// Connect and request deadlines.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Per-endpoint overload protection and slow start.
    #[serde(default)]
    pub limits: Limits,
    /// The LLM gateway of a `providers:` policy (listener protocol `openai` or
    /// `anthropic`); `None` for an HTTP route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmRoute>,
}

/// The largest number of providers one LLM route may list.
pub const MAX_PROVIDERS: usize = 16;

/// An LLM route resolved: its providers in policy order and every LLM setting with its
/// defaults filled in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LlmRoute {
    /// The providers, in the policy's order (the order `priority` uses).
    pub providers: Vec<LlmProvider>,
    /// How a provider is chosen.
    #[serde(default)]
    pub routing: Routing,
    /// When and how far a request moves to the next provider.
    #[serde(default)]
    pub failover: Failover,
    /// How a conversation is made to fit the chosen model's window.
    #[serde(default)]
    pub context_fitting: ContextFitting,
}

/// One provider as the sidecar uses it: the CRD's [`Provider`] (its `apiKey` a source),
/// plus the key itself when the operator read it from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LlmProvider {
    /// The provider as the policy declares it.
    #[serde(flatten)]
    pub provider: Provider,
    /// The value of `apiKey.secretKeyRef`, filled by the operator; `None` in a local run,
    /// where the sidecar falls back to `OPENAI_API_KEY` / `ANTHROPIC_API_KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<SecretValue>,
}

/// A secret (an API key). `Debug` and `Display` print `<redacted>`, so a key never
/// reaches a log line by accident; it serializes as its value because the config
/// server must carry it to the sidecar, and [`SidecarConfig::redacted`] blanks it
/// before a config is shown.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretValue(String);

/// What a redacted secret shows instead of its value.
pub const REDACTED: &str = "<redacted>";

impl SecretValue {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl std::fmt::Display for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

/// One backend of a route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `host:port`: IPv4, `[IPv6]` or a DNS name.
    pub address: String,
    /// Relative share of traffic for the weighted algorithms (0 = none).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Active and Throttled endpoints receive traffic; Ejected and Unhealthy do not.
    #[serde(default)]
    pub state: EndpointState,
    /// The backing pod, when the operator knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

fn default_weight() -> u32 {
    1
}

impl Endpoint {
    /// An Active endpoint of weight 1 at `address`.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            weight: default_weight(),
            state: EndpointState::Active,
            pod: None,
        }
    }
}

/// A config that must not be served, naming the field path, the value and what was
/// expected, e.g. `routes[1].endpoints[0].address: "x" is not host:port`.
#[allow(missing_docs)] // the fields are described by each variant's message
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ConfigError {
    /// A required string was empty.
    #[error("{path}: must not be empty")]
    Empty { path: String },
    /// An endpoint address that is not `host:port`.
    #[error(
        "{path}: {value:?} is not host:port (expected an IPv4 address, [IPv6] or DNS name, then :1-65535)"
    )]
    Address { path: String, value: String },
    /// Two routes listen on the same port.
    #[error(
        "{path}: port {port} is already the listener of routes[{first}]; every route needs its own port"
    )]
    DuplicatePort {
        path: String,
        port: u16,
        first: usize,
    },
    /// The same address twice in one route.
    #[error("{path}: {value:?} is already routes[{route}].endpoints[{first}]")]
    DuplicateEndpoint {
        path: String,
        value: String,
        route: usize,
        first: usize,
    },
    /// A number outside its range.
    #[error("{path}: {value} is out of range; expected {expected}")]
    OutOfRange {
        path: String,
        value: String,
        expected: String,
    },
    /// Two fields that contradict each other.
    #[error("{path}: {message}")]
    Inconsistent { path: String, message: String },
}

/// Why a policy could not be resolved into a route without a cluster.
#[allow(missing_docs)] // the fields are described by each variant's message
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum FromPolicyError {
    /// The policy has no name.
    #[error("metadata.name: a BalancerPolicy needs a name")]
    MissingName,
    /// The policy names a Service, which only the operator resolves.
    #[error(
        "{policy}: spec.endpoints is not set ({uses} is used instead); only static endpoints and providers resolve without the operator"
    )]
    NotStatic { policy: String, uses: &'static str },
    /// The resolved route is invalid.
    #[error("{policy}: {source}")]
    Invalid {
        policy: String,
        #[source]
        source: ConfigError,
    },
}

impl SidecarConfig {
    /// This config with every secret value replaced by [`REDACTED`]: what `/config`,
    /// logs and `--print-config` show.
    pub fn redacted(&self) -> Self {
        let mut config = self.clone();
        for route in &mut config.routes {
            for provider in route.llm.iter_mut().flat_map(|l| l.providers.iter_mut()) {
                if let Some(key) = &mut provider.secret_key {
                    *key = SecretValue::new(REDACTED);
                }
            }
        }
        config
    }

    /// Checks every route and the uniqueness of listener ports. The first problem found
    /// is returned, with its full field path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut ports: HashMap<u16, usize> = HashMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            route.validate_at(&path, i)?;
            if let Some(&first) = ports.get(&route.listener.port) {
                return Err(ConfigError::DuplicatePort {
                    path: format!("{path}.listener.port"),
                    port: route.listener.port,
                    first,
                });
            }
            ports.insert(route.listener.port, i);
        }
        Ok(())
    }
}

impl Route {
    /// Resolves a policy with a static `endpoints:` list, filling in every default. Pure:
    /// this is what a local run serves, and what the operator produces for such a policy.
    pub fn from_policy(policy: &BalancerPolicy) -> Result<Self, FromPolicyError> {
        let name = policy
            .metadata
            .name
            .clone()
            .ok_or(FromPolicyError::MissingName)?;
        let namespace = policy
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let spec = &policy.spec;
        let route = match (&spec.endpoints, &spec.providers) {
            (Some(addresses), _) => {
                let endpoints = addresses
                    .iter()
                    .map(|a| Endpoint::new(a.0.clone()))
                    .collect();
                Self::resolved(policy, &namespace, endpoints)
            }
            // No Secret is read here: a local run takes keys from files and the
            // environment (see `LlmProvider::secret_key`).
            (None, Some(_)) => Self::resolved(policy, &namespace, Vec::new()),
            (None, None) => {
                return Err(FromPolicyError::NotStatic {
                    policy: format!("{namespace}/{name}"),
                    uses: if spec.service.is_some() {
                        "spec.service"
                    } else {
                        "nothing"
                    },
                });
            }
        };
        route
            .validate_at("spec", 0)
            .map_err(|source| FromPolicyError::Invalid {
                policy: route.id(),
                source,
            })?;
        Ok(route)
    }

    /// The route of `policy` (in `namespace`) with `endpoints` resolved by whoever
    /// resolved them: the static list here, the operator's EndpointSlice watch in a
    /// cluster. Every other setting comes from the spec with its defaults.
    pub fn resolved(policy: &BalancerPolicy, namespace: &str, endpoints: Vec<Endpoint>) -> Self {
        let spec = &policy.spec;
        Self {
            namespace: namespace.to_owned(),
            name: policy.metadata.name.clone().unwrap_or_default(),
            listener: spec.listener.clone(),
            algorithm: spec.algorithm,
            endpoints,
            weighting: spec.weighting.clone().unwrap_or_default(),
            health_check: spec.health_check.clone(),
            outlier_detection: spec.outlier_detection.clone(),
            retries: spec.retries.clone(),
            timeouts: spec.timeouts.clone(),
            limits: spec.limits.clone(),
            llm: spec.providers.as_ref().map(|providers| LlmRoute {
                providers: providers
                    .iter()
                    .map(|p| LlmProvider {
                        provider: p.clone(),
                        secret_key: None,
                    })
                    .collect(),
                routing: spec.routing.clone().unwrap_or_default(),
                failover: spec.failover.clone().unwrap_or_default(),
                context_fitting: spec.context_fitting.clone().unwrap_or_default(),
            }),
        }
    }

    /// `namespace/name`, the route's name in logs and metrics.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn validate_at(&self, path: &str, index: usize) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::Empty {
                path: format!("{path}.name"),
            });
        }
        if self.namespace.is_empty() {
            return Err(ConfigError::Empty {
                path: format!("{path}.namespace"),
            });
        }
        if self.listener.port == 0 {
            return Err(out_of_range(format!("{path}.listener.port"), 0, "1-65535"));
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (j, endpoint) in self.endpoints.iter().enumerate() {
            let at = format!("{path}.endpoints[{j}]");
            if !is_host_port(&endpoint.address) {
                return Err(ConfigError::Address {
                    path: format!("{at}.address"),
                    value: endpoint.address.clone(),
                });
            }
            if let Some(&first) = seen.get(endpoint.address.as_str()) {
                return Err(ConfigError::DuplicateEndpoint {
                    path: format!("{at}.address"),
                    value: endpoint.address.clone(),
                    route: index,
                    first,
                });
            }
            seen.insert(&endpoint.address, j);
            if endpoint.weight > MAX_ENDPOINT_WEIGHT {
                return Err(out_of_range(
                    format!("{at}.weight"),
                    endpoint.weight,
                    &format!("0-{MAX_ENDPOINT_WEIGHT}"),
                ));
            }
        }
        validate_weighting(&self.weighting, &format!("{path}.weighting"))?;
        if let Some(hc) = &self.health_check {
            let at = format!("{path}.healthCheck");
            if !hc.path.starts_with('/') {
                return Err(ConfigError::Inconsistent {
                    path: format!("{at}.path"),
                    message: format!("{:?} must start with /", hc.path),
                });
            }
            if hc.timeout >= hc.interval {
                return Err(ConfigError::Inconsistent {
                    path: format!("{at}.timeout"),
                    message: format!(
                        "{} must be shorter than interval {}",
                        hc.timeout, hc.interval
                    ),
                });
            }
            for (field, value) in [
                ("unhealthyThreshold", hc.unhealthy_threshold),
                ("healthyThreshold", hc.healthy_threshold),
            ] {
                if !(1..=100).contains(&value) {
                    return Err(out_of_range(format!("{at}.{field}"), value, "1-100"));
                }
            }
        }
        let od = &self.outlier_detection;
        for (field, value) in [
            ("maxEjectionPercent", od.max_ejection_percent),
            ("panicThresholdPercent", od.panic_threshold_percent),
        ] {
            if value > 100 {
                return Err(out_of_range(
                    format!("{path}.outlierDetection.{field}"),
                    value,
                    "0-100",
                ));
            }
        }
        let retries = &self.retries;
        if retries.attempts > MAX_RETRY_ATTEMPTS {
            return Err(out_of_range(
                format!("{path}.retries.attempts"),
                retries.attempts,
                &format!("0-{MAX_RETRY_ATTEMPTS}"),
            ));
        }
        if retries.budget_percent > 100 {
            return Err(out_of_range(
                format!("{path}.retries.budgetPercent"),
                retries.budget_percent,
                "0-100",
            ));
        }
        if retries.backoff > retries.max_backoff {
            return Err(ConfigError::Inconsistent {
                path: format!("{path}.retries.backoff"),
                message: format!(
                    "{} must not exceed maxBackoff {}",
                    retries.backoff, retries.max_backoff
                ),
            });
        }
        if self.timeouts.connect.get().is_zero() {
            return Err(out_of_range(
                format!("{path}.timeouts.connect"),
                "0s",
                "more than 0s",
            ));
        }
        if self.limits.max_concurrent_requests == 0 {
            return Err(out_of_range(
                format!("{path}.limits.maxConcurrentRequests"),
                0,
                "1-1000000",
            ));
        }
        let protocol = self.listener.protocol;
        match &self.llm {
            Some(llm) => {
                if protocol == ListenerProtocol::Http {
                    return Err(ConfigError::Inconsistent {
                        path: format!("{path}.listener.protocol"),
                        message: "an LLM route (providers) needs protocol openai or anthropic, the dialect the application speaks; got http".into(),
                    });
                }
                if !self.endpoints.is_empty() {
                    return Err(ConfigError::Inconsistent {
                        path: format!("{path}.endpoints"),
                        message: "an LLM route sends to its providers; endpoints must be empty"
                            .into(),
                    });
                }
                llm.validate_at(path)?;
            }
            None if protocol != ListenerProtocol::Http => {
                return Err(ConfigError::Inconsistent {
                    path: format!("{path}.listener.protocol"),
                    message: format!(
                        "{protocol:?} makes an LLM gateway, which needs providers; use http for endpoints"
                    ),
                });
            }
            None => {}
        }
        Ok(())
    }
}

impl LlmRoute {
    fn validate_at(&self, path: &str) -> Result<(), ConfigError> {
        if self.providers.is_empty() || self.providers.len() > MAX_PROVIDERS {
            return Err(out_of_range(
                format!("{path}.providers"),
                format!("{} providers", self.providers.len()),
                &format!("1-{MAX_PROVIDERS} providers"),
            ));
        }
        let reserve = self.context_fitting.reserve_output_tokens;
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (j, p) in self.providers.iter().map(|p| &p.provider).enumerate() {
            let at = format!("{path}.providers[{j}]");
            if p.name.is_empty() {
                return Err(ConfigError::Empty {
                    path: format!("{at}.name"),
                });
            }
            if let Some(&first) = names.get(p.name.as_str()) {
                return Err(ConfigError::Inconsistent {
                    path: format!("{at}.name"),
                    message: format!("{:?} is already providers[{first}]", p.name),
                });
            }
            names.insert(&p.name, j);
            if !is_http_url(&p.base_url) {
                return Err(ConfigError::Inconsistent {
                    path: format!("{at}.baseUrl"),
                    message: format!(
                        "{:?} is not an http:// or https:// URL with a host",
                        p.base_url
                    ),
                });
            }
            if p.model.is_empty() {
                return Err(ConfigError::Empty {
                    path: format!("{at}.model"),
                });
            }
            if !(1024..=100_000_000).contains(&p.context_window) {
                return Err(out_of_range(
                    format!("{at}.contextWindow"),
                    p.context_window,
                    "1024-100000000",
                ));
            }
            if reserve >= p.context_window {
                return Err(ConfigError::Inconsistent {
                    path: format!("{path}.contextFitting.reserveOutputTokens"),
                    message: format!(
                        "{reserve} leaves no room for input in providers[{j}].contextWindow {}",
                        p.context_window
                    ),
                });
            }
            if p.weight > MAX_ENDPOINT_WEIGHT {
                return Err(out_of_range(
                    format!("{at}.weight"),
                    p.weight,
                    &format!("0-{MAX_ENDPOINT_WEIGHT}"),
                ));
            }
            if let Some(key) = &p.api_key {
                let sources = [
                    key.secret_key_ref.is_some(),
                    key.file.as_deref().is_some_and(|f| !f.is_empty()),
                    key.env.as_deref().is_some_and(|e| !e.is_empty()),
                ];
                if sources.iter().filter(|&&s| s).count() != 1 {
                    return Err(ConfigError::Inconsistent {
                        path: format!("{at}.apiKey"),
                        message: "needs exactly one of secretKeyRef, file or env".into(),
                    });
                }
            }
        }
        let r = &self.routing;
        if r.half_life.get().is_zero() {
            return Err(out_of_range(
                format!("{path}.routing.halfLife"),
                "0s",
                "more than 0s",
            ));
        }
        if !(0.0..=10.0).contains(&r.switch_margin) {
            return Err(out_of_range(
                format!("{path}.routing.switchMargin"),
                r.switch_margin,
                "0-10",
            ));
        }
        if !(0.0..=0.5).contains(&r.exploration) {
            return Err(out_of_range(
                format!("{path}.routing.exploration"),
                r.exploration,
                "0-0.5",
            ));
        }
        let f = &self.failover;
        if !(1..=16).contains(&f.max_attempts) {
            return Err(out_of_range(
                format!("{path}.failover.maxAttempts"),
                f.max_attempts,
                "1-16",
            ));
        }
        if f.first_byte_timeout.get().is_zero() {
            return Err(out_of_range(
                format!("{path}.failover.firstByteTimeout"),
                "0s",
                "more than 0s",
            ));
        }
        if f.budget_percent > 100 {
            return Err(out_of_range(
                format!("{path}.failover.budgetPercent"),
                f.budget_percent,
                "0-100",
            ));
        }
        Ok(())
    }
}

/// Whether `url` is `http://` or `https://` followed by a host.
fn is_http_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    rest.and_then(|r| r.split(['/', '?', '#']).next())
        .is_some_and(|authority| !authority.is_empty() && !authority.contains(char::is_whitespace))
}

fn validate_weighting(w: &Weighting, at: &str) -> Result<(), ConfigError> {
    if !(w.smoothing > 0.0 && w.smoothing <= 1.0) {
        return Err(out_of_range(
            format!("{at}.smoothing"),
            w.smoothing,
            "(0, 1]",
        ));
    }
    if !(0.0..=100.0).contains(&w.error_penalty) {
        return Err(out_of_range(
            format!("{at}.errorPenalty"),
            w.error_penalty,
            "0-100",
        ));
    }
    if !(w.max_step_change > 0.0 && w.max_step_change.is_finite()) {
        return Err(out_of_range(
            format!("{at}.maxStepChange"),
            w.max_step_change,
            "more than 0",
        ));
    }
    if w.min_weight == 0 || w.min_weight > w.max_weight || w.max_weight > MAX_ENDPOINT_WEIGHT {
        return Err(ConfigError::Inconsistent {
            path: format!("{at}.minWeight"),
            message: format!(
                "minWeight {} and maxWeight {} must satisfy 1 <= minWeight <= maxWeight <= {MAX_ENDPOINT_WEIGHT}",
                w.min_weight, w.max_weight
            ),
        });
    }
    for (field, value) in [("maxLoad", w.max_load), ("criticalLoad", w.critical_load)] {
        if !(value > 0.0 && value <= 1.0) {
            return Err(out_of_range(format!("{at}.{field}"), value, "(0, 1]"));
        }
    }
    if w.critical_load <= w.max_load {
        return Err(ConfigError::Inconsistent {
            path: format!("{at}.criticalLoad"),
            message: format!("{} must exceed maxLoad {}", w.critical_load, w.max_load),
        });
    }
    if w.interval.get().is_zero() {
        return Err(out_of_range(format!("{at}.interval"), "0s", "more than 0s"));
    }
    Ok(())
}

fn out_of_range(path: String, value: impl ToString, expected: &str) -> ConfigError {
    ConfigError::OutOfRange {
        path,
        value: value.to_string(),
        expected: expected.to_owned(),
    }
}

/// Whether `s` is `host:port` as the CRD's pattern admits it: IPv4 or a DNS name, or a
/// bracketed IPv6 address, then a port in 1-65535.
pub fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && matches!(port.parse::<u32>(), Ok(1..=65535));
    if !port_ok {
        return false;
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().is_ok();
    }
    let bytes = host.as_bytes();
    !bytes.is_empty()
        && host.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// The `reason` in the config server's 403 body (`{"error": …, "reason": "NoPolicy"}`)
/// for an authenticated pod that no policy selects: the sidecar serves no routes and is
/// ready, instead of treating it as an outage of the control plane.
pub const NO_POLICY_REASON: &str = "NoPolicy";

/// What a sidecar reports back to the config server (`POST /v1/load-reports`) for the
/// `loadReports` weighting source: per endpoint, the utilization its backends reported
/// in ORCA `endpoint-load-metrics` headers over the last window. The namespace is the
/// reporting pod's own; a sidecar reports only for policies it was given.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadReport {
    /// Seconds the report covers (the sidecar's report interval).
    pub window_seconds: f64,
    /// One entry per (policy, endpoint) that answered with load headers in the window.
    #[serde(default)]
    pub endpoints: Vec<EndpointLoad>,
}

/// The load one sidecar saw from one endpoint of one policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointLoad {
    /// Name of the policy (the route) the endpoint belongs to.
    pub policy: String,
    /// `host:port` of the endpoint, as in the route.
    pub address: String,
    /// Mean reported utilization in the window (gRFC A58: `application_utilization`
    /// when positive, else `cpu_utilization`); 1.0 is fully busy.
    pub utilization: f64,
    /// Responses that carried a load report in the window.
    pub requests: u64,
    /// Of those, responses that counted as errors (5xx).
    #[serde(default)]
    pub errors: u64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::{balancer_policy::ApiKeySource, duration::Duration};

    fn route(name: &str, port: u16, endpoints: &[&str]) -> Route {
        Route {
            namespace: "default".into(),
            name: name.into(),
            listener: Listener {
                port,
                protocol: Default::default(),
            },
            algorithm: Algorithm::RoundRobin,
            endpoints: endpoints.iter().map(|a| Endpoint::new(*a)).collect(),
            weighting: Weighting::default(),
            health_check: None,
            outlier_detection: OutlierDetection::default(),
            retries: Retries::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            llm: None,
        }
    }

    fn config(routes: Vec<Route>) -> SidecarConfig {
        SidecarConfig { version: 1, routes }
    }

    #[test]
    fn accepts_a_valid_config() {
        let c = config(vec![
            route(
                "a",
                15001,
                &["127.0.0.1:8080", "[::1]:8081", "db-proxy.example:5000"],
            ),
            route("b", 15002, &[]),
        ]);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn names_the_field_path_of_a_bad_address() {
        let c = config(vec![
            route("a", 15001, &["127.0.0.1:8080"]),
            route("b", 15002, &["x"]),
        ]);
        let err = c.validate().expect_err("invalid");
        assert_eq!(
            err.to_string(),
            r#"routes[1].endpoints[0].address: "x" is not host:port (expected an IPv4 address, [IPv6] or DNS name, then :1-65535)"#
        );
    }

    #[test]
    fn refuses_duplicate_listener_ports() {
        let c = config(vec![route("a", 15001, &[]), route("b", 15001, &[])]);
        let err = c.validate().expect_err("invalid");
        assert!(matches!(
            err,
            ConfigError::DuplicatePort {
                port: 15001,
                first: 0,
                ..
            }
        ));
        assert!(
            err.to_string()
                .starts_with("routes[1].listener.port: port 15001"),
            "{err}"
        );
    }

    #[test]
    fn refuses_duplicate_endpoints_in_a_route() {
        let c = config(vec![route("a", 15001, &["10.0.0.1:80", "10.0.0.1:80"])]);
        let err = c.validate().expect_err("invalid");
        assert!(
            err.to_string()
                .starts_with("routes[0].endpoints[1].address"),
            "{err}"
        );
    }

    #[test]
    fn refuses_critical_load_not_above_max_load() {
        let mut r = route("a", 15001, &[]);
        r.weighting.max_load = 0.9;
        r.weighting.critical_load = 0.8;
        let err = config(vec![r]).validate().expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "routes[0].weighting.criticalLoad: 0.8 must exceed maxLoad 0.9"
        );
    }

    #[test]
    fn refuses_health_check_timeout_not_below_interval() {
        let mut r = route("a", 15001, &[]);
        r.health_check = Some(HealthCheck {
            timeout: Duration::from_secs(5),
            interval: Duration::from_secs(5),
            ..HealthCheck::default()
        });
        let err = config(vec![r]).validate().expect_err("invalid");
        assert!(
            err.to_string().starts_with("routes[0].healthCheck.timeout"),
            "{err}"
        );
    }

    #[test]
    fn refuses_out_of_range_weights_and_attempts() {
        let mut r = route("a", 15001, &["10.0.0.1:80"]);
        r.endpoints[0].weight = 20_000;
        let err = config(vec![r.clone()]).validate().expect_err("invalid");
        assert!(
            err.to_string()
                .starts_with("routes[0].endpoints[0].weight: 20000"),
            "{err}"
        );
        r.endpoints[0].weight = 1;
        r.retries.attempts = 11;
        let err = config(vec![r]).validate().expect_err("invalid");
        assert!(
            err.to_string()
                .starts_with("routes[0].retries.attempts: 11"),
            "{err}"
        );
    }

    #[test]
    fn host_port_follows_the_crd_pattern() {
        for ok in [
            "10.0.7.1:8080",
            "[::1]:80",
            "[fe80::1]:443",
            "a:1",
            "db-proxy.example:5000",
        ] {
            assert!(is_host_port(ok), "{ok}");
        }
        for bad in [
            "x",
            "10.0.0.1",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            ":80",
            "-a:80",
            "a b:80",
            "[zz]:80",
            "::1:80",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn resolves_a_static_policy_with_defaults() {
        let yaml = r#"
apiVersion: trimtab.dev/v1alpha1
kind: BalancerPolicy
metadata: {name: shop-local, namespace: default}
spec:
  clients: {podSelector: {matchLabels: {app: shop-client}}}
  listener: {port: 15001}
  endpoints: ["127.0.0.1:18081", "127.0.0.1:18082"]
  algorithm: peakEwma
  retries: {attempts: 1, retryOn: [connect-failure, reset, gateway-error]}
"#;
        let policy: BalancerPolicy = serde_yaml_ng::from_str(yaml).expect("valid policy");
        let route = Route::from_policy(&policy).expect("static policy resolves");
        assert_eq!(route.id(), "default/shop-local");
        assert_eq!(route.listener.port, 15001);
        assert_eq!(route.algorithm, Algorithm::PeakEwma);
        assert_eq!(
            route.endpoints,
            vec![
                Endpoint::new("127.0.0.1:18081"),
                Endpoint::new("127.0.0.1:18082")
            ]
        );
        assert_eq!(route.retries.attempts, 1);
        assert_eq!(route.outlier_detection, OutlierDetection::default());
        assert_eq!(route.weighting, Weighting::default());
    }

    #[test]
    fn refuses_to_resolve_a_service_policy_locally() {
        let yaml = r#"
apiVersion: trimtab.dev/v1alpha1
kind: BalancerPolicy
metadata: {name: inv, namespace: shop}
spec:
  clients: {podSelector: {}}
  listener: {port: 15001}
  service: {name: inventory, port: 8080}
"#;
        let policy: BalancerPolicy = serde_yaml_ng::from_str(yaml).expect("valid policy");
        let err = Route::from_policy(&policy).expect_err("needs the operator");
        assert_eq!(
            err,
            FromPolicyError::NotStatic {
                policy: "shop/inv".into(),
                uses: "spec.service"
            }
        );
    }

    #[test]
    fn round_trips_through_json() {
        let mut r = route("a", 15001, &["10.0.0.1:80"]);
        r.endpoints[0].state = EndpointState::Throttled;
        r.endpoints[0].pod = Some("inventory-abc".into());
        let c = config(vec![r]);
        let json = serde_json::to_string(&c).expect("serializes");
        assert!(json.contains(r#""state":"Throttled""#), "{json}");
        let back: SidecarConfig = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, c);
    }

    const LLM_POLICY: &str = r#"
apiVersion: trimtab.dev/v1alpha1
kind: BalancerPolicy
metadata: {name: llm, namespace: assistant}
spec:
  clients: {podSelector: {matchLabels: {app: assistant}}}
  listener: {port: 15100, protocol: openai}
  providers:
  - {name: openai, type: openai, baseUrl: "https://api.openai.com/v1", model: gpt-4.1, contextWindow: 1047576,
     apiKey: {secretKeyRef: {name: llm-keys, key: openai}}}
  - {name: anthropic, type: anthropic, baseUrl: "https://api.anthropic.com", model: claude-sonnet-4-5,
     modelAliases: {gpt-4.1: claude-sonnet-4-5}, contextWindow: 200000, apiKey: {file: /keys/anthropic}}
  routing: {switchMargin: 0.3}
"#;

    fn llm_route() -> Route {
        let policy: BalancerPolicy = serde_yaml_ng::from_str(LLM_POLICY).unwrap();
        Route::from_policy(&policy).unwrap()
    }

    #[test]
    fn resolves_a_providers_policy_locally_with_llm_defaults() {
        let route = llm_route();
        assert!(route.endpoints.is_empty());
        let llm = route.llm.unwrap();
        assert_eq!(llm.providers.len(), 2);
        assert_eq!(
            llm.providers[1].provider.model_aliases["gpt-4.1"],
            "claude-sonnet-4-5"
        );
        assert_eq!(llm.providers[0].secret_key, None);
        assert_eq!(llm.routing.switch_margin, 0.3);
        assert_eq!(llm.routing.half_life, Duration::from_secs(30));
        assert_eq!(llm.failover, Failover::default());
        assert_eq!(llm.failover.max_attempts, 3);
        assert_eq!(llm.context_fitting.reserve_output_tokens, 4096);
    }

    #[test]
    fn refuses_an_llm_route_on_an_http_listener() {
        let mut route = llm_route();
        route.listener.protocol = ListenerProtocol::Http;
        assert_eq!(
            config(vec![route]).validate().unwrap_err().to_string(),
            "routes[0].listener.protocol: an LLM route (providers) needs protocol openai or anthropic, the dialect the application speaks; got http"
        );
    }

    #[test]
    fn names_the_field_path_of_a_bad_provider() {
        let mut route = llm_route();
        route.llm.as_mut().unwrap().providers[1].provider.base_url = "ftp://x".into();
        assert_eq!(
            config(vec![route.clone()])
                .validate()
                .unwrap_err()
                .to_string(),
            "routes[0].providers[1].baseUrl: \"ftp://x\" is not an http:// or https:// URL with a host"
        );
        let llm = route.llm.as_mut().unwrap();
        llm.providers[1].provider.base_url = "http://127.0.0.1:1".into();
        llm.providers[1].provider.api_key = Some(ApiKeySource {
            secret_key_ref: None,
            file: Some("/k".into()),
            env: Some("K".into()),
        });
        assert_eq!(
            config(vec![route.clone()])
                .validate()
                .unwrap_err()
                .to_string(),
            "routes[0].providers[1].apiKey: needs exactly one of secretKeyRef, file or env"
        );
        let llm = route.llm.as_mut().unwrap();
        llm.providers[1].provider.api_key = None;
        llm.context_fitting.reserve_output_tokens = 300_000;
        assert!(
            config(vec![route])
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("routes[0].contextFitting.reserveOutputTokens: 300000 leaves no room")
        );
    }

    #[test]
    fn secret_keys_never_show_in_debug_or_the_redacted_config() {
        let mut route = llm_route();
        route.llm.as_mut().unwrap().providers[0].secret_key = Some(SecretValue::new("sk-live-123"));
        let config = config(vec![route]);
        assert!(!format!("{config:?}").contains("sk-live-123"));
        let shown = serde_json::to_string(&config.redacted()).unwrap();
        assert!(!shown.contains("sk-live-123"));
        assert!(shown.contains(REDACTED));
        // The wire form carries the key to the sidecar, and reads back the same.
        let wire = serde_json::to_string(&config).unwrap();
        assert_eq!(
            serde_json::from_str::<SidecarConfig>(&wire).unwrap(),
            config
        );
    }
}
