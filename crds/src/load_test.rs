//! `LoadTest`: stateful bot users run as an Indexed Job against a target, with guards
//! that hold the load at `maxLoad` and abort at `criticalLoad` (the semantics of
//! pt-online-schema-change's `--max-load` and `--critical-load`).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::ResourceRequirements,
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time},
};
use kube::{CustomResource, KubeSchema, core::Rule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    balancer_policy::{MetricsSource, PrometheusSource},
    duration::{self, Duration},
    schema::{
        any_json_object_schema, conditions_schema, resources_schema, selector_schema, time_schema,
    },
};

/// The most states a scenario may declare. Each state costs every runner's results two
/// dense latency histograms (~140 KB each in memory), so the operator's memory grows with
/// states × runners; [`crate::results::Results::check_limits`] holds reports to the same
/// bound.
pub const MAX_STATES: usize = 64;
/// The most transitions (`states[].next`) a state may declare; a state's results count
/// transitions by target, so they have at most this many entries too.
pub const MAX_TRANSITIONS_PER_STATE: usize = 16;
/// The most invariants a test may declare.
pub const MAX_INVARIANTS: usize = 32;
/// The longest state or invariant name, in characters (what the API server's
/// `maxLength` counts): 63, as for a DNS label; names are keys in every report and in
/// the status.
pub const MAX_NAME_CHARS: usize = 63;
/// The longest `guards.window`. The guard keeps one sample per [`crate::guard::Window::tick`]
/// (one a second for windows of 10 s and more) across the window, and each sample holds
/// a dense latency histogram of ~140 KB, so a 5-minute window costs ~42 MB per guarded
/// test, in the operator and in every runner that judges locally; an hour would cost
/// ~500 MB.
pub const MAX_GUARD_WINDOW: Duration = Duration::from_secs(5 * 60);

/// The admission rule on `guards.window`: at most [`MAX_GUARD_WINDOW`]. A rule on the
/// field itself, so the API server names `spec.guards.window` in its refusal. A
/// malformed duration is left to the duration's own pattern rule (one error, not two).
fn guard_window_rule() -> Rule {
    Rule::new(format!(
        "!self.matches('{}') || duration(self) <= duration('{MAX_GUARD_WINDOW}')",
        duration::PATTERN
    ))
    .message(
        format!(
            "guards.window must be at most {MAX_GUARD_WINDOW}: the guard keeps a latency histogram per second of its window"
        )
        .as_str(),
    )
}

/// A load test: who the bots are, what they do, how many, and when to stop.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "trimtab.dev",
    version = "v1alpha1",
    kind = "LoadTest",
    doc = "A LoadTest runs stateful bot users against a target, guarded by maxLoad and criticalLoad.",
    plural = "loadtests",
    shortname = "lt",
    category = "trimtab",
    namespaced,
    status = "LoadTestStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Users","type":"integer","jsonPath":".status.users.active"}"#,
    printcolumn = r#"{"name":"RPS","type":"number","jsonPath":".status.requests.rps"}"#,
    printcolumn = r#"{"name":"P99","type":"string","jsonPath":".status.latency.p99"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.workload.users) || self.runners.parallelism <= self.workload.users"
).message("runners.parallelism must not exceed workload.users: every runner needs at least one user"))]
#[x_kube(validation = Rule::new(
    "has(self.target.podSelector) || !has(self.guards) || [has(self.guards.maxLoad) && has(self.guards.maxLoad.cpu), has(self.guards.criticalLoad) && has(self.guards.criticalLoad.cpu)].all(x, !x)"
).message("cpu guards read the target pods' CPU: set target.podSelector"))]
pub struct LoadTestSpec {
    /// The system under test.
    pub target: Target,
    /// How much load: a closed model (`users`) or an open one (`arrivalRate`).
    pub workload: Workload,
    /// The runner pods that host the bot users.
    #[serde(default)]
    pub runners: Runners,
    /// What each bot user does: a state machine of requests, checks and think times.
    pub scenario: Scenario,
    /// Business rules checked against the target while the test runs and at its end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_INVARIANTS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub invariants: Vec<Invariant>,
    /// When to hold the load and when to abort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guards: Option<Guards>,
    /// Which owned objects are deleted when the test ends. The report always survives.
    #[serde(default)]
    pub cleanup: Cleanup,
}

/// The system under test.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Base URL that scenario paths are appended to, e.g. `http://storefront.shop.svc:8080`.
    #[schemars(length(min = 1, max = 2048))]
    #[schemars(regex(pattern = r"^https?://[^\s/?#]+([/?#]\S*)?$"))]
    pub url: String,
    /// The target's pods, whose CPU the CPU guards read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "selector_schema")]
    pub pod_selector: Option<LabelSelector>,
}

/// The load model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.users) != has(self.arrivalRate)").message("set exactly one of workload.users (closed model) or workload.arrivalRate (open model)"))]
#[x_kube(validation = Rule::new("!has(self.maxUsers) || has(self.arrivalRate)").message("workload.maxUsers caps the open model and needs workload.arrivalRate"))]
pub struct Workload {
    /// Closed model: this many concurrent users, each starting a new session when its
    /// last one ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub users: Option<u64>,
    /// Open model: new sessions per unit of time, with Poisson arrivals, e.g. `500/s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[schemars(regex(pattern = r"^[0-9]+([.][0-9]+)?/(s|m|h)$"))]
    pub arrival_rate: Option<String>,
    /// Open model: at most this many sessions at once; arrivals beyond are counted as
    /// dropped, not queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_users: Option<u64>,
    /// Time over which users (or the arrival rate) grow linearly from zero.
    #[serde(default = "defaults::ramp_up")]
    pub ramp_up: Duration,
    /// How long the test runs after the synchronized start, ramp-up included.
    pub duration: Duration,
}

/// The runner pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Runners {
    /// Runner pods (an Indexed Job's parallelism and completions); users are sharded
    /// over them by completion index.
    #[serde(default = "defaults::parallelism")]
    #[schemars(range(min = 1, max = 1000))]
    pub parallelism: u32,
    /// Requests and limits of each runner's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "resources_schema")]
    pub resources: Option<ResourceRequirements>,
    /// Overrides the runner image (the operator's default sidecar image carries
    /// `trimtab-bots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
}

impl Default for Runners {
    fn default() -> Self {
        Self {
            parallelism: defaults::parallelism(),
            resources: None,
            image: None,
        }
    }
}

/// The bot users' state machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.states.exists(s, s.name == self.start)").message("scenario.start must name one of scenario.states"))]
#[x_kube(validation = Rule::new(
    "self.states.all(s, !has(s.next) || s.next.all(n, self.states.exists(t, t.name == n.state)))"
).message("every states[].next[].state must name one of scenario.states"))]
pub struct Scenario {
    /// The state each session starts in.
    #[schemars(length(min = 1, max = MAX_NAME_CHARS))]
    pub start: String,
    /// Default think time between a response and the user's next request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub think_time: Option<ThinkTime>,
    /// Headers sent with every request of every user (templates allowed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The states. A state without `next` ends the session.
    #[schemars(length(min = 1, max = MAX_STATES))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub states: Vec<State>,
}

/// One step of a user's journey.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// The state's name, unique in the scenario.
    #[schemars(length(min = 1, max = MAX_NAME_CHARS))]
    #[schemars(regex(pattern = "^[A-Za-z_][A-Za-z0-9_-]*$"))]
    pub name: String,
    /// The request this state sends; a state without one only thinks and moves on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Request>,
    /// Variables taken from the response: a JSONPath (RFC 9535) such as `$.token`,
    /// `header:<name>` or `cookie:<name>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extract: BTreeMap<String, String>,
    /// CEL expressions over `response.status`, `response.headers`, `response.json`,
    /// `user.id` and `vars` that must all be true.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub checks: Vec<String>,
    /// Weighted transitions (a Markov chain). None: the session ends here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_TRANSITIONS_PER_STATE))]
    pub next: Option<Vec<Transition>>,
    /// Think time after this state, instead of the scenario's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub think_time: Option<ThinkTime>,
}

/// An HTTP request template (minijinja): `{{ user.id }}`, `{{ vars.token }}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.json), has(self.form), has(self.body)].filter(x, x).size() <= 1").message("a request has at most one of json, form or body"))]
pub struct Request {
    /// The HTTP method.
    #[serde(default)]
    pub method: Method,
    /// The path (and query) appended to target.url; must start with `/`.
    #[schemars(length(min = 1, max = 4096))]
    #[schemars(regex(pattern = "^/"))]
    pub path: String,
    /// Request headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// A JSON object body; string values are templates. (A body that is not an object
    /// goes in `body`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json_object_schema")]
    pub json: Option<serde_json::Map<String, serde_json::Value>>,
    /// A form body (application/x-www-form-urlencoded); values are templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub form: Option<BTreeMap<String, String>>,
    /// A raw body template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// HTTP methods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs)]
pub enum Method {
    #[default]
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

/// A weighted transition to another state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    /// The next state's name.
    #[schemars(length(min = 1, max = MAX_NAME_CHARS))]
    pub state: String,
    /// Relative probability among this state's transitions.
    #[serde(default = "defaults::transition_weight")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub weight: u32,
}

/// A think-time distribution, bounded by min and max.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.distribution != 'uniform' || (has(self.min) && has(self.max))").message("a uniform think time needs min and max"))]
#[x_kube(validation = Rule::new("self.distribution == 'uniform' || has(self.mean)").message("constant, exponential and normal think times need mean"))]
#[x_kube(validation = Rule::new("self.distribution != 'normal' || has(self.stddev)").message("a normal think time needs stddev"))]
#[x_kube(validation = Rule::new("!has(self.min) || !has(self.max) || duration(self.min) <= duration(self.max)").message("thinkTime.min must not exceed thinkTime.max"))]
pub struct ThinkTime {
    /// constant, uniform, exponential or normal.
    #[serde(default)]
    pub distribution: Distribution,
    /// The mean (the value itself for constant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<Duration>,
    /// Standard deviation, for normal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stddev: Option<Duration>,
    /// Lower bound (uniform: the lower end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Duration>,
    /// Upper bound (uniform: the upper end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Duration>,
}

/// Think-time distributions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Distribution {
    /// Always the mean.
    Constant,
    /// Uniform between min and max.
    Uniform,
    /// Exponential with the mean: what real users' pauses look like.
    #[default]
    Exponential,
    /// Normal with mean and stddev, clamped to min and max.
    Normal,
}

/// A business rule checked against the target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Invariant {
    /// A name unique in the test; violations are reported under it.
    #[schemars(length(min = 1, max = MAX_NAME_CHARS))]
    pub name: String,
    /// The request that reads the state to check.
    pub request: Request,
    /// A CEL expression over `response` that must be true.
    #[schemars(length(min = 1, max = 4096))]
    pub expect: String,
    /// How often the invariant is checked (it is always checked once at the end).
    #[serde(default = "defaults::invariant_every")]
    pub every: Duration,
}

/// The pt-online-schema-change style guards.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.maxLoad) || !has(self.criticalLoad) || !has(self.maxLoad.cpu) || !has(self.criticalLoad.cpu) || self.criticalLoad.cpu > self.maxLoad.cpu").message("guards.criticalLoad.cpu must exceed guards.maxLoad.cpu"))]
#[x_kube(validation = Rule::new("!has(self.maxLoad) || !has(self.criticalLoad) || !has(self.maxLoad.errorRate) || !has(self.criticalLoad.errorRate) || self.criticalLoad.errorRate > self.maxLoad.errorRate").message("guards.criticalLoad.errorRate must exceed guards.maxLoad.errorRate"))]
#[x_kube(validation = Rule::new("!has(self.maxLoad) || !has(self.criticalLoad) || !has(self.maxLoad.p99) || !has(self.criticalLoad.p99) || duration(self.criticalLoad.p99) > duration(self.maxLoad.p99)").message("guards.criticalLoad.p99 must exceed guards.maxLoad.p99"))]
#[x_kube(validation = Rule::new("!has(self.cpuSource) || self.cpuSource != 'loadReports'").message("guards.cpuSource is metricsServer or prometheus (load reports come from sidecars, which a load test's target need not have)"))]
#[x_kube(validation = Rule::new("!has(self.cpuSource) || self.cpuSource != 'prometheus' || has(self.prometheus)").message("guards.cpuSource prometheus requires guards.prometheus.url"))]
pub struct Guards {
    /// Above any of these, the test holds: runners stop ramping and shed users back to
    /// the last level that was under the limits, then resume with hysteresis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_load: Option<LoadLimits>,
    /// Above any of these, the test aborts: every runner stops sending within seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_load: Option<LoadLimits>,
    /// The window over which CPU, error rate and p99 are measured; at most 5m, because
    /// the guard keeps a latency histogram for every second of it.
    #[serde(default = "defaults::guard_window")]
    #[x_kube(validation = guard_window_rule())]
    pub window: Duration,
    /// Where the target pods' CPU comes from for `cpu` limits: `metricsServer`
    /// (metrics.k8s.io) or `prometheus`; utilization is usage ÷ the pods' CPU requests,
    /// averaged over the pods `target.podSelector` picks.
    #[serde(default)]
    pub cpu_source: MetricsSource,
    /// The Prometheus server and query, for `cpuSource: prometheus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSource>,
}

/// Load limits; any one exceeded trips the guard.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.cpu) || has(self.errorRate) || has(self.p99)").message("a load limit needs at least one of cpu, errorRate or p99"))]
pub struct LoadLimits {
    /// Target pods' CPU utilization (usage ÷ requests), 0–1, averaged over the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 10.0))]
    pub cpu: Option<f64>,
    /// Failed requests ÷ all requests over the window, 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub error_rate: Option<f64>,
    /// 99th percentile latency over the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99: Option<Duration>,
}

/// What is deleted when a test ends.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Cleanup {
    /// Delete the runners after a successful test; keep them for inspection otherwise.
    #[default]
    OnSuccess,
    /// Always delete the runners.
    Always,
    /// Keep everything.
    Never,
}

/// Progress and results, merged exactly from every runner.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadTestStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Starting, Running, Paused, Succeeded, Failed or Aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// When all runners started together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub start_time: Option<Time>,
    /// When the test ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub completion_time: Option<Time>,
    /// Runner pods by state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runners: Option<RunnerCounts>,
    /// Users now and the goal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<UserCounts>,
    /// Request totals and the current rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<RequestCounts>,
    /// Latency percentiles from the merged histograms (never averaged percentiles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySummary>,
    /// Check results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<CheckCounts>,
    /// Violations per invariant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invariants: Vec<InvariantStatus>,
    /// The guards' verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardStatus>,
    /// Where the final report is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportRef>,
    /// Conditions with reasons for each phase transition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// The phase of a load test.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[allow(missing_docs)]
pub enum Phase {
    #[default]
    Pending,
    Starting,
    Running,
    Paused,
    Succeeded,
    Failed,
    Aborted,
}

/// Runner pods by state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunnerCounts {
    /// Registered and waiting for the start.
    pub ready: u32,
    /// Sending load.
    pub running: u32,
    /// Done.
    pub finished: u32,
    /// Exited with an error or disappeared.
    #[serde(default)]
    pub failed: u32,
}

/// Users now and the goal.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserCounts {
    /// Sessions in progress across all runners.
    pub active: u64,
    /// The goal: workload.users, or the open model's current concurrency.
    pub target: u64,
}

/// Request totals.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestCounts {
    /// Requests sent.
    pub total: u64,
    /// Requests that failed (transport error or failed check).
    pub failed: u64,
    /// Requests per second over the last reporting interval.
    pub rps: f64,
}

/// Latency percentiles as durations (`12.5ms`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[allow(missing_docs)]
pub struct LatencySummary {
    pub p50: String,
    pub p90: String,
    pub p99: String,
    pub p999: String,
    pub max: String,
}

/// Check results.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[allow(missing_docs)]
pub struct CheckCounts {
    pub passed: u64,
    pub failed: u64,
}

/// Violations of one invariant.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InvariantStatus {
    /// The invariant's name.
    pub name: String,
    /// Times the expectation was false.
    pub violations: u64,
}

/// The guards' verdict.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuardStatus {
    /// Ok, Holding or Aborted.
    pub state: GuardState,
    /// What tripped, e.g. `cpu 0.83 > maxLoad 0.80`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Guard states.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[allow(missing_docs)]
pub enum GuardState {
    #[default]
    Ok,
    Holding,
    Aborted,
}

/// Where the final report is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportRef {
    /// The ConfigMap holding `report.json` and `summary.txt`.
    pub config_map: String,
}

pub(crate) mod defaults {
    use super::Duration;

    pub fn ramp_up() -> Duration {
        Duration::from_secs(0)
    }
    pub fn parallelism() -> u32 {
        1
    }
    pub fn transition_weight() -> u32 {
        1
    }
    pub fn invariant_every() -> Duration {
        Duration::from_secs(10)
    }
    pub fn guard_window() -> Duration {
        Duration::from_secs(30)
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    /// The schema of `spec.<path>` in the generated CRD.
    fn spec_schema(path: &[&str]) -> serde_json::Value {
        let crd = serde_json::to_value(LoadTest::crd()).expect("the CRD serializes");
        let mut schema =
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        for field in path {
            schema = &schema["properties"][field];
        }
        schema.clone()
    }

    #[test]
    fn guards_window_is_limited_to_the_maximum_by_a_rule_on_the_field() {
        let window = spec_schema(&["guards", "window"]);
        let rules = window["x-kubernetes-validations"]
            .as_array()
            .expect("window has rules");
        let rule = rules
            .iter()
            .find(|r| {
                r["rule"]
                    .as_str()
                    .is_some_and(|r| r.contains("duration(self)"))
            })
            .expect("a rule bounds the window");
        assert_eq!(MAX_GUARD_WINDOW.to_string(), "5m");
        assert_eq!(
            rule["rule"],
            format!(
                "!self.matches('{}') || duration(self) <= duration('5m')",
                duration::PATTERN
            )
        );
        assert!(
            rule["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("guards.window must be at most 5m")),
            "{rule}"
        );
        // A rule on the field itself, without a fieldPath: the API server reports it at
        // `spec.guards.window`.
        assert!(rule.get("fieldPath").is_none(), "{rule}");
        // `kubectl explain` states the same maximum.
        assert!(
            window["description"]
                .as_str()
                .is_some_and(|d| d.contains(&format!("at most {MAX_GUARD_WINDOW},"))),
            "{window}"
        );
        assert!(defaults::guard_window() <= MAX_GUARD_WINDOW);
    }

    #[test]
    fn scenario_schema_limits_are_the_ones_results_are_checked_against() {
        let states = spec_schema(&["scenario", "states"]);
        assert_eq!(states["maxItems"], MAX_STATES);
        assert_eq!(
            states["items"]["properties"]["name"]["maxLength"],
            MAX_NAME_CHARS
        );
        assert_eq!(
            states["items"]["properties"]["next"]["maxItems"],
            MAX_TRANSITIONS_PER_STATE
        );
        let invariants = spec_schema(&["invariants"]);
        assert_eq!(invariants["maxItems"], MAX_INVARIANTS);
        assert_eq!(
            invariants["items"]["properties"]["name"]["maxLength"],
            MAX_NAME_CHARS
        );
    }
}
