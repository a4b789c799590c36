//! `BalancerPolicy`: one route, a local listener in the client pods' sidecars and the
//! backends behind it, with the algorithm that spreads requests over them.
//!
//! Every doc comment here becomes `kubectl explain` text: it says what the field does,
//! its unit and default, and why one would change it (Envoy's configuration docs are the
//! model).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    duration::Duration,
    retry_on::RetryOn,
    schema::{conditions_schema, selector_schema},
};

/// The desired routing of one local listener to a set of backends.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "trimtab.dev",
    version = "v1alpha1",
    kind = "BalancerPolicy",
    doc = "A BalancerPolicy routes one local listener in the client pods' sidecars to a set of backends.",
    plural = "balancerpolicies",
    shortname = "bp",
    category = "trimtab",
    namespaced,
    status = "BalancerPolicyStatus",
    printcolumn = r#"{"name":"Algorithm","type":"string","jsonPath":".spec.algorithm"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","jsonPath":".status.activeEndpoints","description":"Endpoints currently receiving traffic"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.service), has(self.endpoints), has(self.providers)].filter(x, x).size() == 1"
).message("exactly one of service, endpoints or providers must be set"))]
#[x_kube(validation = Rule::new(
    "has(self.providers) == (self.listener.protocol != 'http')"
).message("providers require listener.protocol openai or anthropic, and an openai or anthropic listener requires providers"))]
#[x_kube(validation = Rule::new(
    "has(self.providers) || !(has(self.routing) || has(self.failover) || has(self.contextFitting))"
).message("routing, failover and contextFitting apply only to LLM policies (spec.providers)"))]
#[x_kube(validation = Rule::new(
    "!has(self.providers) || !has(self.contextFitting) || self.providers.all(p, p.contextWindow > self.contextFitting.reserveOutputTokens)"
).message("every provider's contextWindow must exceed contextFitting.reserveOutputTokens"))]
#[x_kube(validation = Rule::new(
    "self.algorithm != 'cpuWeighted' || !has(self.providers)"
).message("algorithm cpuWeighted balances service or endpoints backends; LLM providers are chosen by spec.routing"))]
pub struct BalancerPolicySpec {
    /// Which pods' sidecars apply this policy: the pods in this namespace whose labels
    /// match `podSelector`. An empty selector selects every pod in the namespace.
    pub clients: Clients,

    /// The local listener the application sends its outbound calls to
    /// (`http://127.0.0.1:<port>`), and the dialect it speaks there.
    pub listener: Listener,

    /// Backends from a Service in this namespace: the endpoints are read from its
    /// EndpointSlices and follow scaling and rollouts. Exactly one of `service`,
    /// `endpoints` and `providers` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,

    /// A static list of `host:port` backends: for destinations outside the cluster and
    /// for running the same file locally without a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub endpoints: Option<Vec<EndpointAddress>>,

    /// LLM providers, instead of `service` or `endpoints`: the listener becomes an LLM
    /// gateway that translates between dialects, routes by latency and fails over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub providers: Option<Vec<Provider>>,

    /// How requests are spread over healthy endpoints. `leastRequest` (power of two
    /// choices) is the default: it needs no tuning and avoids slow endpoints.
    #[serde(default)]
    pub algorithm: Algorithm,

    /// Where `cpuWeighted` takes utilization from, and how it turns into weights.
    /// Ignored by the other algorithms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighting: Option<Weighting>,

    /// Active HTTP health checks. Off unless set: passive outlier detection already
    /// ejects endpoints that fail real requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,

    /// Passive health: endpoints that fail real requests are ejected for a while.
    #[serde(default)]
    pub outlier_detection: OutlierDetection,

    /// When and how often a failed request is tried again on another endpoint.
    #[serde(default)]
    pub retries: Retries,

    /// Connect and whole-request deadlines.
    #[serde(default)]
    pub timeouts: Timeouts,

    /// Limits that protect endpoints from overload (Envoy's circuit breakers).
    #[serde(default)]
    pub limits: Limits,

    /// How an LLM provider is chosen for each request. LLM policies only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,

    /// When an LLM request moves to the next provider. LLM policies only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<Failover>,

    /// What happens when a conversation does not fit the chosen model's context
    /// window. LLM policies only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_fitting: Option<ContextFitting>,
}

/// The client pods whose sidecars apply a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Clients {
    /// A label selector over pods in the policy's namespace.
    #[schemars(schema_with = "selector_schema")]
    pub pod_selector: LabelSelector,
}

/// The local listener in each client sidecar.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// TCP port on 127.0.0.1 in the client pod. Two policies selecting the same pods
    /// must use different ports.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// The dialect the application speaks on this port: `http` proxies any HTTP; `openai`
    /// (Chat Completions) and `anthropic` (Messages) make an LLM gateway over `providers`.
    #[serde(default)]
    pub protocol: ListenerProtocol,
}

/// The dialect of a listener.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ListenerProtocol {
    /// Plain HTTP/1.1 or h2c, proxied as it is.
    #[default]
    Http,
    /// OpenAI Chat Completions.
    Openai,
    /// Anthropic Messages.
    Anthropic,
}

/// A Service in the policy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// The Service's name.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The Service port whose endpoints receive traffic.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

/// A `host:port` backend address (IPv4, `[IPv6]` or a DNS name).
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(transparent)]
pub struct EndpointAddress(
    #[schemars(length(min = 3, max = 261))]
    #[schemars(regex(
        pattern = r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):[0-9]{1,5}$"
    ))]
    pub String,
);

/// The balancing algorithm. Each cites the implementation it follows.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Algorithm {
    /// Each endpoint in turn.
    RoundRobin,
    /// Smooth weighted round robin, as nginx does it.
    WeightedRoundRobin,
    /// The endpoint with the fewest open requests.
    LeastConnections,
    /// Power of two choices over active requests (Envoy's LEAST_REQUEST).
    #[default]
    LeastRequest,
    /// Power of two choices over peak EWMA latency × pending requests (linkerd2-proxy).
    PeakEwma,
    /// Weights from CPU utilization: the gRFC A58 client-side weighted round robin form.
    CpuWeighted,
}

impl Algorithm {
    /// The name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "roundRobin",
            Self::WeightedRoundRobin => "weightedRoundRobin",
            Self::LeastConnections => "leastConnections",
            Self::LeastRequest => "leastRequest",
            Self::PeakEwma => "peakEwma",
            Self::CpuWeighted => "cpuWeighted",
        }
    }
}

/// How `cpuWeighted` derives endpoint weights.
///
/// weight = qps / (utilization + errorRate × errorPenalty), the gRFC A58 / Envoy
/// client-side WRR form, smoothed (falls at once, rises by an EWMA), bounded by
/// minWeight..maxWeight, driven down above maxLoad and zeroed above criticalLoad.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.criticalLoad > self.maxLoad").message("criticalLoad must exceed maxLoad"))]
#[x_kube(validation = Rule::new("self.minWeight <= self.maxWeight").message("minWeight must not exceed maxWeight"))]
#[x_kube(validation = Rule::new("self.source != 'prometheus' || has(self.prometheus)").message("source prometheus requires weighting.prometheus.url"))]
pub struct Weighting {
    /// Where utilization comes from: `metricsServer` (metrics.k8s.io, usage ÷ CPU
    /// requests), `prometheus` (an instant query), or `loadReports` (ORCA
    /// `endpoint-load-metrics` response headers seen by the sidecars).
    #[serde(default)]
    pub source: MetricsSource,

    /// The Prometheus server and query, for `source: prometheus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSource>,

    /// How often weights are recomputed and pushed. Shorter reacts faster and costs more
    /// metric queries; metrics-server itself refreshes every 15s by default.
    #[serde(default = "defaults::weighting_interval")]
    pub interval: Duration,

    /// EWMA factor, in (0, 1], for a rise of an endpoint's capacity estimate: 1 follows
    /// every sample, small values trade responsiveness for stability. A fall is
    /// believed at once (peak-EWMA), so an endpoint that lost capacity sheds its
    /// traffic within an interval or two.
    #[serde(default = "defaults::smoothing")]
    #[schemars(range(min = 0.01, max = 1.0))]
    pub smoothing: f64,

    /// How strongly errors count against an endpoint (gRFC A58
    /// `error_utilization_penalty`): utilization is increased by errorRate × this.
    #[serde(default = "defaults::error_penalty")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub error_penalty: f64,

    /// The smallest weight an active endpoint gets, so it keeps receiving the traffic
    /// that measures it.
    #[serde(default = "defaults::min_weight")]
    #[schemars(range(min = 1, max = 10000))]
    pub min_weight: u32,

    /// The largest weight; the ratio maxWeight/minWeight bounds the traffic skew.
    #[serde(default = "defaults::max_weight")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_weight: u32,

    /// Largest relative change of a weight in one interval (0.5 = ±50%), so that one
    /// noisy sample cannot swing traffic.
    #[serde(default = "defaults::max_step_change")]
    #[schemars(range(min = 0.05, max = 10.0))]
    pub max_step_change: f64,

    /// Utilization (0–1) above which an endpoint is Throttled: its weight is driven
    /// down until it falls back under.
    #[serde(default = "defaults::max_load")]
    #[schemars(range(min = 0.05, max = 1.0))]
    pub max_load: f64,

    /// Utilization (0–1) above which an endpoint is Ejected (weight 0) until it falls
    /// below maxLoad again.
    #[serde(default = "defaults::critical_load")]
    #[schemars(range(min = 0.05, max = 1.0))]
    pub critical_load: f64,

    /// Samples older than this are ignored; an endpoint with no fresh sample keeps its
    /// last weight until then, and then falls back to the average weight.
    #[serde(default = "defaults::sample_expiry")]
    pub sample_expiry: Duration,
}

impl Default for Weighting {
    fn default() -> Self {
        Self {
            source: MetricsSource::default(),
            prometheus: None,
            interval: defaults::weighting_interval(),
            smoothing: defaults::smoothing(),
            error_penalty: defaults::error_penalty(),
            min_weight: defaults::min_weight(),
            max_weight: defaults::max_weight(),
            max_step_change: defaults::max_step_change(),
            max_load: defaults::max_load(),
            critical_load: defaults::critical_load(),
            sample_expiry: defaults::sample_expiry(),
        }
    }
}

/// The next capacity estimate of an endpoint, from the last one and a new measurement,
/// under the EWMA `factor` (`smoothing`, or its share for a sample that adds part of
/// an interval): a fall is believed at once, a rise closes `factor` of the gap.
///
/// This is how linkerd2-proxy and Finagle smooth a peak-EWMA cost, seen from the other
/// side. An endpoint that lost capacity is overloaded until its share follows, and an
/// EWMA at `smoothing: 0.3` still carries 0.7³ ≈ 34% of the step three intervals
/// later; one that gained capacity loses nothing by being trusted gradually, and a
/// recovering one is spared a thundering herd. Both the operator's weight controller
/// and the sidecar's live refinement follow capacity this way.
pub fn follow_capacity(last: Option<f64>, measured: f64, factor: f64) -> f64 {
    match last {
        Some(last) if measured >= last => last + factor * (measured - last),
        _ => measured,
    }
}

/// Where CPU utilization comes from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MetricsSource {
    /// metrics.k8s.io PodMetrics; utilization = usage ÷ the pod's CPU requests.
    #[default]
    MetricsServer,
    /// A Prometheus instant query returning CPU cores per pod.
    Prometheus,
    /// ORCA `endpoint-load-metrics` headers the backends return, aggregated by sidecars.
    LoadReports,
}

/// A Prometheus server to query for per-pod CPU.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSource {
    /// Base URL of the Prometheus HTTP API, e.g. `http://prometheus.monitoring:9090`.
    #[schemars(length(min = 1, max = 2048))]
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// An instant query returning CPU cores in use, one series per pod with a `pod`
    /// label; `$namespace` is replaced by the policy's namespace. Utilization is this
    /// divided by the pod's CPU requests.
    #[serde(default = "defaults::prometheus_query")]
    #[schemars(length(min = 1, max = 4096))]
    pub query: String,
}

/// Active HTTP health checking.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.timeout) < duration(self.interval)").message("healthCheck.timeout must be shorter than healthCheck.interval"))]
pub struct HealthCheck {
    /// The path probed with GET; any 2xx or 3xx is healthy.
    #[serde(default = "defaults::health_path")]
    #[schemars(length(min = 1, max = 1024))]
    #[schemars(regex(pattern = "^/"))]
    pub path: String,
    /// Time between probes of one endpoint.
    #[serde(default = "defaults::health_interval")]
    pub interval: Duration,
    /// How long a probe may take before it counts as failed.
    #[serde(default = "defaults::health_timeout")]
    pub timeout: Duration,
    /// Consecutive failed probes before an endpoint is marked Unhealthy.
    #[serde(default = "defaults::unhealthy_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub unhealthy_threshold: u32,
    /// Consecutive passed probes before an Unhealthy endpoint is used again.
    #[serde(default = "defaults::healthy_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub healthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            path: defaults::health_path(),
            interval: defaults::health_interval(),
            timeout: defaults::health_timeout(),
            unhealthy_threshold: defaults::unhealthy_threshold(),
            healthy_threshold: defaults::healthy_threshold(),
        }
    }
}

/// Passive outlier detection, as Envoy's: ejection for baseEjectionTime × the number
/// of times the endpoint was ejected before.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx responses or connection failures that eject an endpoint.
    /// 0 turns outlier detection off.
    #[serde(default = "defaults::consecutive_errors")]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_errors: u32,
    /// How long the first ejection lasts; each further ejection lasts this times the
    /// number of ejections so far.
    #[serde(default = "defaults::base_ejection_time")]
    pub base_ejection_time: Duration,
    /// At most this share of endpoints (percent) is ejected at once.
    #[serde(default = "defaults::max_ejection_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: u32,
    /// When fewer than this percent of endpoints are usable, balance across all of them
    /// rather than overload the few that are left (Envoy's healthy panic threshold).
    #[serde(default = "defaults::panic_threshold_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub panic_threshold_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_errors: defaults::consecutive_errors(),
            base_ejection_time: defaults::base_ejection_time(),
            max_ejection_percent: defaults::max_ejection_percent(),
            panic_threshold_percent: defaults::panic_threshold_percent(),
        }
    }
}

/// Retries of failed requests on another endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Extra attempts after the first; 0 turns retries off.
    #[serde(default = "defaults::retry_attempts")]
    #[schemars(range(min = 0, max = 10))]
    pub attempts: u32,
    /// The failures that are retried: connect-failure, reset, timeout, 5xx,
    /// gateway-error, or a status code such as 503. (Named as Envoy's and Istio's
    /// `retryOn`; a bare `on` key would be read as the boolean `true` by YAML 1.1
    /// parsers such as kubectl's.)
    #[serde(default = "defaults::retry_on")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub retry_on: Vec<RetryOn>,
    /// Retries may add at most this percent to the active requests, so that an outage
    /// cannot turn into a retry storm (Linkerd's retry budget).
    #[serde(default = "defaults::retry_budget_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub budget_percent: u32,
    /// Also retry non-idempotent methods (POST, PATCH). Off by default: a retried POST
    /// may be applied twice.
    #[serde(default)]
    pub non_idempotent: bool,
    /// First backoff before a retry; it doubles each attempt, with full jitter.
    #[serde(default = "defaults::retry_backoff")]
    pub backoff: Duration,
    /// Largest backoff between attempts, also the cap on an honoured `Retry-After`.
    #[serde(default = "defaults::retry_max_backoff")]
    pub max_backoff: Duration,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            attempts: defaults::retry_attempts(),
            retry_on: defaults::retry_on(),
            budget_percent: defaults::retry_budget_percent(),
            non_idempotent: false,
            backoff: defaults::retry_backoff(),
            max_backoff: defaults::retry_max_backoff(),
        }
    }
}

/// Deadlines.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// How long establishing a TCP connection to an endpoint may take.
    #[serde(default = "defaults::connect_timeout")]
    pub connect: Duration,
    /// How long a whole request may take, retries included, until the response
    /// headers arrive. `0s` means no limit (long-lived streams).
    #[serde(default = "defaults::request_timeout")]
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: defaults::connect_timeout(),
            request: defaults::request_timeout(),
        }
    }
}

/// Overload protection per endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Requests in flight to one endpoint above which new requests to it fail fast
    /// with 503 (Envoy's `max_requests` circuit breaker).
    #[serde(default = "defaults::max_concurrent_requests")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_concurrent_requests: u32,
    /// A new endpoint's traffic ramps up linearly over this window (slow start), so
    /// that a cold process is not flooded. `0s` turns it off.
    #[serde(default = "defaults::slow_start")]
    pub slow_start: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_requests: defaults::max_concurrent_requests(),
            slow_start: defaults::slow_start(),
        }
    }
}

/// One LLM provider.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Provider {
    /// A name unique within the policy; it appears in metrics and response headers.
    #[schemars(length(min = 1, max = 63))]
    #[schemars(regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// The API this provider speaks.
    #[serde(rename = "type")]
    pub kind: ProviderKind,
    /// The API base URL, e.g. `https://api.openai.com/v1` or `https://api.anthropic.com`.
    #[schemars(length(min = 1, max = 2048))]
    #[schemars(regex(pattern = r"^https?://"))]
    pub base_url: String,
    /// The model requests are sent to, unless `modelAliases` maps the requested name.
    #[schemars(length(min = 1, max = 256))]
    pub model: String,
    /// Maps model names the application asks for to this provider's model names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub model_aliases: BTreeMap<String, String>,
    /// The model's context window in tokens (input plus output).
    #[schemars(range(min = 1024, max = 100_000_000))]
    pub context_window: u64,
    /// Relative share for `routing.strategy: weighted`.
    #[serde(default = "defaults::provider_weight")]
    #[schemars(range(min = 0, max = 10000))]
    pub weight: u32,
    /// Where the API key comes from. Keys never appear in logs, status or another pod's
    /// config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeySource>,
}

/// The API dialect of a provider.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ProviderKind {
    /// OpenAI Chat Completions.
    Openai,
    /// Anthropic Messages.
    Anthropic,
}

/// Exactly one source of an API key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.secretKeyRef), has(self.file), has(self.env)].filter(x, x).size() == 1").message("apiKey needs exactly one of secretKeyRef, file or env"))]
pub struct ApiKeySource {
    /// A key of a Secret in the policy's namespace (in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
    /// A file holding the key, re-read when it changes (a mounted Secret, or a local run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub file: Option<String>,
    /// An environment variable of the sidecar holding the key (local runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[schemars(regex(pattern = "^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub env: Option<String>,
}

/// A key in a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name, in the policy's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// How a provider is chosen.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Routing {
    /// `lowestLatency` follows the fastest provider, `priority` uses them in list order,
    /// `weighted` splits by `providers[].weight`.
    #[serde(default)]
    pub strategy: RoutingStrategy,
    /// The latency measured: `ttft` (time to first token, for streams) or
    /// `tokenLatency` (total time per output token).
    #[serde(default)]
    pub signal: LatencySignal,
    /// Half-life of the latency EWMA: after this long, a sample weighs half as much.
    #[serde(default = "defaults::half_life")]
    pub half_life: Duration,
    /// Another provider must be this much faster (0.2 = 20%) before traffic moves to
    /// it, so that traffic does not flap between two similar providers.
    #[serde(default = "defaults::switch_margin")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub switch_margin: f64,
    /// Share of requests sent to a provider that is not the current choice, to keep
    /// every estimate fresh.
    #[serde(default = "defaults::exploration")]
    #[schemars(range(min = 0.0, max = 0.5))]
    pub exploration: f64,
}

/// Provider routing strategies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RoutingStrategy {
    /// The provider with the lowest latency estimate, with hysteresis.
    #[default]
    LowestLatency,
    /// The first available provider in list order.
    Priority,
    /// Random split by `providers[].weight`.
    Weighted,
}

/// The latency signal for `lowestLatency`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LatencySignal {
    /// Time to first token.
    #[default]
    Ttft,
    /// Total latency divided by output tokens.
    TokenLatency,
}

/// Failover between LLM providers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failover {
    /// The failures that move a request to the next provider: connect-failure, reset,
    /// timeout, 5xx, gateway-error, or a status code such as 429.
    #[serde(default = "defaults::failover_on")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub failover_on: Vec<RetryOn>,
    /// Providers tried for one request, the first included.
    #[serde(default = "defaults::failover_attempts")]
    #[schemars(range(min = 1, max = 16))]
    pub max_attempts: u32,
    /// How long to wait for the first byte before failing over.
    #[serde(default = "defaults::first_byte_timeout")]
    pub first_byte_timeout: Duration,
    /// Failovers may add at most this percent to the requests a provider receives, so
    /// an outage cannot double the load on the survivor.
    #[serde(default = "defaults::failover_budget_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub budget_percent: u32,
    /// Send a request to the next provider too when its first byte is later than the
    /// route's recent p95 time to first token; keep whichever streams first.
    #[serde(default)]
    pub hedge: bool,
}

/// Fitting a conversation into the context window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContextFitting {
    /// `priorityEviction` removes the least important messages; `reject` refuses the
    /// request with 400.
    #[serde(default)]
    pub strategy: FittingStrategy,
    /// Tokens kept free for the answer.
    #[serde(default = "defaults::reserve_output_tokens")]
    #[schemars(range(min = 0, max = 10_000_000))]
    pub reserve_output_tokens: u64,
    /// The most recent turns that are never evicted.
    #[serde(default = "defaults::keep_last_turns")]
    #[schemars(range(min = 0, max = 1000))]
    pub keep_last_turns: u32,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            strategy: RoutingStrategy::default(),
            signal: LatencySignal::default(),
            half_life: defaults::half_life(),
            switch_margin: defaults::switch_margin(),
            exploration: defaults::exploration(),
        }
    }
}

impl Default for Failover {
    fn default() -> Self {
        Self {
            failover_on: defaults::failover_on(),
            max_attempts: defaults::failover_attempts(),
            first_byte_timeout: defaults::first_byte_timeout(),
            budget_percent: defaults::failover_budget_percent(),
            hedge: false,
        }
    }
}

impl Default for ContextFitting {
    fn default() -> Self {
        Self {
            strategy: FittingStrategy::default(),
            reserve_output_tokens: defaults::reserve_output_tokens(),
            keep_last_turns: defaults::keep_last_turns(),
        }
    }
}

/// Context-fitting strategies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FittingStrategy {
    /// Evict low-priority messages, leaving a marker where they were.
    #[default]
    PriorityEviction,
    /// Refuse with 400 in the application's dialect.
    Reject,
}

/// What the operator observed and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalancerPolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `Degraded`, with reasons such as WeightsApplied, NoEndpoints,
    /// MetricsUnavailable or CpuRequestsMissing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Version of the config pushed to the sidecars; it only increases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<u64>,
    /// Endpoints in state Active or Throttled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_endpoints: Option<u32>,
    /// Per-endpoint utilization, weight and state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointStatus>,
    /// n × Σ fᵢ·pᵢ over endpoints (fᵢ share of traffic, pᵢ share of load); 1.0 is
    /// perfectly even (the mixture-of-experts auxiliary-loss form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance_score: Option<f64>,
    /// Sidecars subscribed to this policy, and how many hold the current configVersion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<SidecarCounts>,
}

/// One endpoint as the weight controller sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// The backing pod, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// `ip:port` of the endpoint.
    pub address: String,
    /// Smoothed CPU utilization, usage ÷ requests (may exceed 1 without limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
    /// The weight sent to the sidecars.
    pub weight: u32,
    /// Active, Throttled, Ejected or Unhealthy.
    pub state: EndpointState,
}

/// The state of one endpoint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum EndpointState {
    /// Receiving traffic by its weight.
    #[default]
    Active,
    /// Above maxLoad: weight driven down.
    Throttled,
    /// Above criticalLoad: no traffic until back under maxLoad.
    Ejected,
    /// Failing health checks or not ready.
    Unhealthy,
}

/// Counts of subscribed sidecars.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarCounts {
    /// Sidecars currently subscribed.
    pub connected: u32,
    /// Of those, the ones holding the current configVersion.
    pub up_to_date: u32,
}

/// Defaults, named once and used by both the schema and `Default` impls.
pub(crate) mod defaults {
    use super::*;

    pub fn weighting_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn smoothing() -> f64 {
        0.3
    }
    pub fn error_penalty() -> f64 {
        1.0
    }
    pub fn min_weight() -> u32 {
        1
    }
    pub fn max_weight() -> u32 {
        100
    }
    pub fn max_step_change() -> f64 {
        0.5
    }
    pub fn max_load() -> f64 {
        0.75
    }
    pub fn critical_load() -> f64 {
        0.95
    }
    pub fn sample_expiry() -> Duration {
        Duration::from_secs(60)
    }
    pub fn prometheus_query() -> String {
        r#"sum by (pod) (rate(container_cpu_usage_seconds_total{container!=""}[1m]))"#.into()
    }
    pub fn health_path() -> String {
        "/healthz".into()
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn unhealthy_threshold() -> u32 {
        3
    }
    pub fn healthy_threshold() -> u32 {
        2
    }
    pub fn consecutive_errors() -> u32 {
        5
    }
    pub fn base_ejection_time() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_ejection_percent() -> u32 {
        50
    }
    pub fn panic_threshold_percent() -> u32 {
        50
    }
    pub fn retry_attempts() -> u32 {
        2
    }
    pub fn retry_on() -> Vec<RetryOn> {
        vec![
            RetryOn::ConnectFailure,
            RetryOn::Reset,
            RetryOn::Status(503),
        ]
    }
    pub fn retry_budget_percent() -> u32 {
        20
    }
    pub fn retry_backoff() -> Duration {
        Duration::from_millis(25)
    }
    pub fn retry_max_backoff() -> Duration {
        Duration::from_millis(250)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_concurrent_requests() -> u32 {
        1024
    }
    pub fn slow_start() -> Duration {
        Duration::from_secs(0)
    }
    pub fn provider_weight() -> u32 {
        1
    }
    pub fn half_life() -> Duration {
        Duration::from_secs(30)
    }
    pub fn switch_margin() -> f64 {
        0.2
    }
    pub fn exploration() -> f64 {
        0.05
    }
    pub fn failover_on() -> Vec<RetryOn> {
        vec![
            RetryOn::Status(429),
            RetryOn::ServerError,
            RetryOn::Timeout,
            RetryOn::ConnectFailure,
        ]
    }
    pub fn failover_attempts() -> u32 {
        3
    }
    pub fn first_byte_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn failover_budget_percent() -> u32 {
        20
    }
    pub fn reserve_output_tokens() -> u64 {
        4096
    }
    pub fn keep_last_turns() -> u32 {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capacity_falls_at_once_and_rises_by_the_smoothing_factor() {
        assert_eq!(follow_capacity(None, 80.0, 0.3), 80.0);
        assert_eq!(follow_capacity(Some(100.0), 50.0, 0.3), 50.0);
        assert_eq!(follow_capacity(Some(50.0), 100.0, 0.3), 65.0);
        assert_eq!(follow_capacity(Some(50.0), 100.0, 1.0), 100.0);
    }
}
