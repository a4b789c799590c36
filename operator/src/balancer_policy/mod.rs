//! The BalancerPolicy controller, in the phases every reconcile runs through:
//! validate → resolve (endpoints from EndpointSlices) → compute (weights from CPU) →
//! publish (the index the config server answers from) → status.
//!
//! Watches on Services, EndpointSlices and Pods feed reflector stores that resolve reads,
//! so a reconcile costs one metrics query and one status patch, never a list call.

pub mod provider_keys;
pub mod resolve;
mod written;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    core::Selector,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        predicates,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use trimtab_api::{
    BalancerPolicy, BalancerPolicySpec,
    balancer_policy::{
        Algorithm, BalancerPolicyStatus, EndpointState, EndpointStatus,
        MetricsSource as SourceKind, Weighting,
    },
    sidecar_config::{Endpoint, Route},
};

use crate::{
    conditions::{self, DEGRADED, READY, reason},
    config_server::subscribers::Subscribers,
    index::{PolicyIndex, PolicyKey},
    leader::Leadership,
    load_reports::LoadReports,
    metrics::ControllerMetrics,
    metrics_source::CpuUsage,
    metrics_source::MetricsSource,
    sidecar_counts::{self, Counting, Replica, SidecarTotals},
    weights::{self, Fleet, Observation, Sample, TransitionKind, WeightState},
};

/// The field manager of every status write, so server-side apply knows one owner.
pub const FIELD_MANAGER: &str = "trimtab-operator";

/// How often a policy without dynamic weights is reconciled anyway (a safety net for a
/// missed watch event).
const RESYNC: Duration = Duration::from_secs(300);

/// What can fail in one reconcile. Each variant is a reason in the error metric.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The status could not be written.
    #[error("writing status of {policy}: {source}")]
    Status {
        /// `namespace/name`.
        policy: String,
        /// The API error.
        source: kube::Error,
    },
    /// The policy has no namespace (the CRD is namespaced, so the API never sends one).
    #[error("policy {0} has no namespace")]
    NoNamespace(String),
}

impl ReconcileError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Status { .. } => "status",
            Self::NoNamespace(_) => "no_namespace",
        }
    }
}

/// Everything a reconcile needs, shared behind `Arc` (controller-rs's shape).
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Where published routes go.
    pub index: PolicyIndex,
    /// Reconcile counters and durations.
    pub metrics: ControllerMetrics,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Only the lease holder writes status and Events; every replica keeps its index warm.
    pub leadership: Leadership,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    /// The weight controller's memory per policy (smoothed samples, last weights).
    weights: Mutex<HashMap<PolicyKey, WeightState>>,
    /// The statuses this replica wrote, until the policy store has seen them.
    written: written::WrittenStatuses,
    /// `status.sidecars`: the sidecars of every replica, summed.
    sidecars: SidecarTotals,
    /// Utilization the sidecars report, for `weighting.source: loadReports`.
    load_reports: LoadReports,
}

/// What the controller shares with the config server: the index it publishes to, the
/// pod store both read, and what the sidecars tell the server.
#[derive(Debug)]
pub struct Wiring {
    /// Where published routes go.
    pub index: PolicyIndex,
    /// Filled by the controller's pod watch; the config server reads it.
    pub pods: reflector::store::Writer<Pod>,
    /// Who is subscribed.
    pub subscribers: Subscribers,
    /// Hints that a sidecar's holdings changed, for the sidecar counting task.
    pub sidecar_hints: tokio::sync::mpsc::Receiver<PolicyKey>,
    /// This replica, when it runs beside others: its sidecar counts are published for
    /// the leader to add up. `None` counts only this process's sidecars.
    pub replica: Option<Replica>,
    /// Sidecars' load reports.
    pub load_reports: LoadReports,
    /// Policies whose load reports show a step, to reconcile at once.
    pub load_steps: tokio::sync::mpsc::Receiver<PolicyKey>,
}

impl Wiring {
    /// Fresh wiring around `index`; the pod store is read through `pods.as_reader()`.
    pub fn new(index: PolicyIndex) -> Self {
        let (subscribers, sidecar_hints) = Subscribers::new();
        let (load_reports, load_steps) = LoadReports::with_steps();
        Self {
            index,
            pods: reflector::store::Writer::default(),
            subscribers,
            sidecar_hints,
            replica: None,
            load_reports,
            load_steps,
        }
    }
}

/// Policies sent on a channel, as reconcile triggers: those whose sidecar counts
/// changed (the counting task already debounces them) and those whose load stepped.
fn policy_triggers(
    triggers: tokio::sync::mpsc::Receiver<PolicyKey>,
) -> impl futures_util::Stream<Item = ObjectRef<BalancerPolicy>> {
    futures_util::stream::unfold(triggers, |mut triggers| async move {
        let (ns, name) = triggers.recv().await?;
        Some((ObjectRef::new(&name).within(&ns), triggers))
    })
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// Runs the controller until the stream ends (on shutdown signal).
pub async fn run(
    client: Client,
    wiring: Wiring,
    metrics: ControllerMetrics,
    reporter: Reporter,
    leadership: Leadership,
) {
    let Wiring {
        index,
        pods: pods_writer,
        subscribers,
        sidecar_hints,
        replica,
        load_reports,
        load_steps,
    } = wiring;
    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let pods = pods_writer.as_reader();
    let sidecars = SidecarTotals::default();
    let (triggers, triggered) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(sidecar_counts::run(
        client.clone(),
        replica,
        pods.clone(),
        Counting {
            subscribers,
            index: index.clone(),
            hints: sidecar_hints,
            totals: sidecars.clone(),
            triggers,
        },
    ));
    let (policies, policies_writer) = reflector::store::<BalancerPolicy>();

    // Deleted policies leave the index; after a re-list, so do the ones deleted while
    // the watch was down.
    let cleanup_index = index.clone();
    let mut listed: HashSet<PolicyKey> = HashSet::new();
    let policy_stream = watcher(
        Api::<BalancerPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(move |event| {
        match &event {
            Ok(watcher::Event::Delete(p)) => {
                cleanup_index.delete(&key_of(p), &p.uid().unwrap_or_default())
            }
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(p)) => {
                listed.insert(key_of(p));
            }
            Ok(watcher::Event::InitDone) => cleanup_index.retain(|k| listed.contains(k)),
            _ => {}
        }
        event
    })
    .modify(trim)
    .reflect(policies_writer)
    .applied_objects()
    // Our own status writes do not change the generation: they do not retrigger us.
    .predicate_filter(predicates::generation, Default::default());

    let service_stream = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(trim)
    .reflect(services_writer)
    .touched_objects();
    let slice_stream = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(resolve::SERVICE_NAME_LABEL),
    )
    .default_backoff()
    .modify(trim)
    .reflect(slices_writer)
    .touched_objects();
    let pod_stream = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .reflect(pods_writer)
        .touched_objects();

    // A replica that becomes leader writes every policy's status at once.
    let became_leader = futures_util::stream::unfold(leadership.clone(), |mut l| async move {
        loop {
            if l.changed().await {
                return Some(((), l));
            }
        }
    });
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        leadership,
        client,
        index,
        metrics,
        services,
        slices,
        pods,
        weights: Mutex::default(),
        written: written::WrittenStatuses::default(),
        sidecars,
        load_reports,
    });

    let by_service = {
        let policies = policies.clone();
        move |namespace: Option<String>, service: Option<String>| {
            policies
                .state()
                .into_iter()
                .filter(|p| {
                    p.namespace() == namespace
                        && p.spec.service.as_ref().map(|s| &s.name) == service.as_ref()
                        && service.is_some()
                })
                .map(|p| ObjectRef::from_obj(&*p))
                .collect::<Vec<_>>()
        }
    };
    let on_service = by_service.clone();
    let on_slice = by_service.clone();
    let on_pod = {
        let policies = policies.clone();
        move |pod: Pod| {
            // A pod's CPU requests or readiness feed every Service policy of its namespace.
            policies
                .state()
                .into_iter()
                .filter(|p| p.namespace() == pod.namespace() && p.spec.service.is_some())
                .map(|p| ObjectRef::from_obj(&*p))
                .collect::<Vec<_>>()
        }
    };

    Controller::for_stream(policy_stream, policies)
        .watches_stream(service_stream, move |s: Service| {
            on_service(s.namespace(), Some(s.name_any()))
        })
        .watches_stream(slice_stream, move |s: EndpointSlice| {
            let service = s.labels().get(resolve::SERVICE_NAME_LABEL).cloned();
            on_slice(s.namespace(), service)
        })
        .watches_stream(pod_stream, on_pod)
        .reconcile_all_on(became_leader)
        .reconcile_on(policy_triggers(triggered))
        .reconcile_on(policy_triggers(load_steps))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile did not run");
            }
        })
        .await;
}

/// kubectl's copy of the last applied object, in an annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What the stores keep of an object: neither its managedFields nor kubectl's copy of
/// what was last applied, which no reconcile reads and which can double a small object
/// (with thousands of pods and policies, megabytes of the operator's memory).
fn trim<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
    if let Some(annotations) = object.meta_mut().annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

fn key_of(policy: &BalancerPolicy) -> PolicyKey {
    (policy.namespace().unwrap_or_default(), policy.name_any())
}

/// One pass through the phases for one policy.
pub async fn reconcile(
    policy: Arc<BalancerPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let key = key_of(&policy);
    let namespace = policy
        .namespace()
        .ok_or_else(|| ReconcileError::NoNamespace(policy.name_any()))?;
    let outcome = plan(&policy, &namespace, &ctx).await;

    // publish
    let config_version = match &outcome.route {
        Some((selector, route)) => {
            let uid = policy.uid().unwrap_or_default();
            ctx.index
                .upsert(key.clone(), &uid, selector.clone(), route.clone())
        }
        None => {
            ctx.index.remove(&key);
            None
        }
    };

    if !ctx.leadership.is_leader() {
        ctx.metrics.observe_reconcile(started.elapsed());
        return Ok(Action::requeue(outcome.requeue));
    }

    // events for endpoints that changed state
    for transition in &outcome.transitions {
        let event = Event {
            type_: if transition.kind == TransitionKind::Restored {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: transition.kind.reason().into(),
            note: Some(transition.message.clone()),
            action: "Reweight".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
            tracing::warn!(policy = %format!("{}/{}", key.0, key.1), error = %e, "could not publish event");
        }
    }

    // status, built on the newest we know of: the store may not have seen our last write
    let current = ctx
        .written
        .known(&key, policy.status.as_ref(), std::time::Instant::now());
    let sidecars = outcome.route.as_ref().map(|_| ctx.sidecars.get(&key));
    let status = BalancerPolicyStatus {
        observed_generation: policy.metadata.generation,
        conditions: conditions::merge(&current.conditions, outcome.conditions),
        config_version: config_version.or(current.config_version),
        active_endpoints: Some(
            outcome
                .endpoints
                .iter()
                .filter(|e| matches!(e.state, EndpointState::Active | EndpointState::Throttled))
                .count()
                .try_into()
                .unwrap_or(u32::MAX),
        ),
        endpoints: outcome.endpoints,
        balance_score: outcome.balance_score,
        sidecars: Some(sidecars.unwrap_or_default()),
    };
    // An unchanged status is not written: at a 1 s interval over a thousand policies the
    // no-op applies alone would keep the API server busy.
    if status != current {
        let apply = json!({
            "apiVersion": "trimtab.dev/v1alpha1",
            "kind": "BalancerPolicy",
            "status": status,
        });
        let writing = std::time::Instant::now();
        let result = Api::<BalancerPolicy>::namespaced(ctx.client.clone(), &namespace)
            .patch_status(
                &key.1,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&apply),
            )
            .await;
        ctx.metrics.observe_status_write(writing.elapsed());
        match result {
            Ok(_) => ctx
                .written
                .remember(key.clone(), status, std::time::Instant::now()),
            Err(source) => {
                ctx.written.forget(&key);
                return Err(ReconcileError::Status {
                    policy: format!("{}/{}", key.0, key.1),
                    source,
                });
            }
        }
    }

    ctx.metrics.observe_reconcile(started.elapsed());
    Ok(Action::requeue(outcome.requeue))
}

/// What the pure phases decided for one policy.
#[derive(Debug)]
struct Outcome {
    /// The route and the client pods it applies to; `None` withdraws it.
    route: Option<(Selector, Route)>,
    endpoints: Vec<EndpointStatus>,
    conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    transitions: Vec<weights::Transition>,
    balance_score: Option<f64>,
    requeue: Duration,
}

/// The route of an LLM provider policy: no endpoints to resolve or weigh (the sidecars
/// measure the providers themselves), only the API keys to read from Secrets.
async fn providers(
    policy: &BalancerPolicy,
    namespace: &str,
    selector: Selector,
    ctx: &Context,
) -> Outcome {
    let generation = policy.metadata.generation;
    let mut route = route_for(policy, namespace, Vec::new());
    let problems = match &mut route.llm {
        Some(llm) => provider_keys::fill(&ctx.client, namespace, llm).await,
        None => Vec::new(),
    };
    let count = route.llm.as_ref().map_or(0, |l| l.providers.len());
    let degraded = if problems.is_empty() {
        conditions::new(DEGRADED, false, reason::AS_EXPECTED, "", generation)
    } else {
        let message = problems
            .iter()
            .map(|(field, e)| format!("{field}: {e}"))
            .collect::<Vec<_>>()
            .join("; ");
        tracing::warn!(policy = %format!("{namespace}/{}", policy.name_any()), %message, "provider keys unavailable");
        conditions::new(
            DEGRADED,
            true,
            reason::SECRET_UNAVAILABLE,
            message,
            generation,
        )
    };
    Outcome {
        route: Some((selector, route)),
        endpoints: Vec::new(),
        conditions: vec![
            conditions::new(
                READY,
                true,
                reason::PROVIDERS_PUBLISHED,
                format!("{count} LLM providers published"),
                generation,
            ),
            degraded,
        ],
        transitions: Vec::new(),
        balance_score: None,
        requeue: provider_keys::RECHECK,
    }
}

/// validate → resolve → compute, reading only the stores and the metrics source.
async fn plan(policy: &BalancerPolicy, namespace: &str, ctx: &Context) -> Outcome {
    let spec = &policy.spec;
    let generation = policy.metadata.generation;
    let key = key_of(policy);
    let not_ready = |reason: &str, message: String| Outcome {
        route: None,
        endpoints: Vec::new(),
        conditions: vec![
            conditions::new(READY, false, reason, message.clone(), generation),
            conditions::new(DEGRADED, true, reason, message, generation),
        ],
        transitions: Vec::new(),
        balance_score: None,
        requeue: RESYNC,
    };

    // validate: the API server already enforced the schema; what is left is what this
    // controller serves.
    let selector = match Selector::try_from(spec.clients.pod_selector.clone()) {
        Ok(s) => s,
        Err(e) => {
            return not_ready(
                reason::INVALID_SELECTOR,
                format!("spec.clients.podSelector: {e}"),
            );
        }
    };
    if spec.providers.is_some() {
        return providers(policy, namespace, selector, ctx).await;
    }

    // resolve
    let service = spec
        .service
        .as_ref()
        .and_then(|s| ctx.services.get(&ObjectRef::new(&s.name).within(namespace)));
    let slices = ctx.slices.state();
    let pod = |name: &str| ctx.pods.get(&ObjectRef::new(name).within(namespace));
    let resolved = match resolve::endpoints(
        spec,
        namespace,
        service.as_deref(),
        slices
            .iter()
            .map(|s| &**s)
            .filter(|s| s.namespace().as_deref() == Some(namespace)),
        pod,
    ) {
        Ok(r) => r,
        Err(e) => return not_ready(reason::SERVICE_NOT_FOUND, e.to_string()),
    };
    if !resolved.iter().any(|e| e.ready) {
        let mut outcome = not_ready(
            reason::NO_ENDPOINTS,
            format!("{} has no ready endpoints", backend_name(spec)),
        );
        // Publish the empty route anyway: sidecars answer 503 with a clear body rather
        // than refusing connections on the listener.
        outcome.route = Some((selector, route_for(policy, namespace, Vec::new())));
        return outcome;
    }

    // compute: cpuWeighted from CPU samples; every other algorithm gets equal weights,
    // which is what the weight controller gives endpoints without samples.
    let now = SystemTime::now();
    let (weighting, mut degraded, requeue, usage, reported) = if spec.algorithm
        == Algorithm::CpuWeighted
    {
        let weighting = spec.weighting.clone().unwrap_or_default();
        if weighting.source == SourceKind::LoadReports {
            // Until traffic flows there is nothing to report: no problem, equal weights.
            let interval = weighting.interval.get();
            let reported = ctx.load_reports.samples(&key, now);
            (weighting, None, interval, CpuUsage::default(), reported)
        } else {
            let source =
                MetricsSource::new(weighting.source, weighting.prometheus.as_ref(), &ctx.client);
            let (usage, problem) = match source.cpu_usage(namespace).await {
                Ok(u) => (u, None),
                Err(e) => {
                    ctx.metrics.metrics_source_error(&e.to_string());
                    let message = format!("{e}; keeping the last weights until they expire");
                    (
                        CpuUsage::default(),
                        Some((reason::METRICS_UNAVAILABLE, message)),
                    )
                }
            };
            let missing: Vec<_> = resolved
                .iter()
                .filter(|e| e.cpu_request_millis.is_none())
                .filter_map(|e| e.pod.clone())
                .collect();
            let problem = problem.or_else(|| {
                (!missing.is_empty()).then(|| {
                    let message = format!(
                        "pods without CPU requests, so their utilization is unknown: {}",
                        missing.join(", ")
                    );
                    (reason::CPU_REQUESTS_MISSING, message)
                })
            });
            let interval = weighting.interval.get();
            (weighting, problem, interval, usage, HashMap::new())
        }
    } else {
        (
            Weighting::default(),
            None,
            RESYNC,
            CpuUsage::default(),
            HashMap::new(),
        )
    };
    let observations: Vec<Observation> = resolved
        .iter()
        .map(|e| Observation {
            address: e.address.clone(),
            pod: e.pod.clone(),
            ready: e.ready,
            sample: reported.get(&e.address).cloned().or_else(|| {
                e.pod
                    .as_ref()
                    .and_then(|p| usage.cores.get(p))
                    .zip(e.cpu_request_millis)
                    .map(|(cores, millis)| Sample {
                        window: usage.window,
                        ..Sample::cpu(cores * 1000.0 / millis as f64, now)
                    })
            }),
        })
        .collect();
    let computed = {
        let mut memory = ctx.weights.lock().unwrap_or_else(|p| p.into_inner());
        let previous = memory.get(&key).cloned().unwrap_or_default();
        match weights::compute(&previous, &observations, now, &weighting) {
            Ok(w) => {
                memory.insert(key.clone(), w.state.clone());
                w
            }
            Err(e) => return not_ready(reason::INVALID_SAMPLE, e.to_string()),
        }
    };
    match computed.fleet {
        Fleet::AllEjected => {
            degraded = Some((
                reason::ALL_EJECTED,
                "every endpoint is above criticalLoad; sidecars balance across all of them".into(),
            ));
        }
        Fleet::OutOfCapacity => {
            degraded = Some((
                reason::OUT_OF_CAPACITY,
                "endpoints are above criticalLoad but the others cannot absorb their traffic under maxLoad; they stay Throttled".into(),
            ));
        }
        Fleet::Serving | Fleet::NoReadyEndpoints => {}
    }
    let route_endpoints = computed
        .endpoints
        .iter()
        .map(|e| Endpoint {
            address: e.address.clone(),
            weight: e.weight,
            state: e.state,
            pod: e.pod.clone(),
        })
        .collect();
    let balance_score = computed.balance_score();
    let endpoints = computed.endpoints;

    let ready_message = format!(
        "{} endpoints of {} published",
        endpoints.iter().filter(|e| e.weight > 0).count(),
        backend_name(spec)
    );
    let ready_reason = if spec.algorithm == Algorithm::CpuWeighted {
        reason::WEIGHTS_APPLIED
    } else {
        reason::CONFIG_PUBLISHED
    };
    let conditions = vec![
        conditions::new(READY, true, ready_reason, ready_message, generation),
        match &degraded {
            Some((r, m)) => conditions::new(DEGRADED, true, r, m.clone(), generation),
            None => conditions::new(DEGRADED, false, reason::AS_EXPECTED, "", generation),
        },
    ];
    Outcome {
        balance_score,
        route: Some((selector, route_for(policy, namespace, route_endpoints))),
        endpoints,
        conditions,
        transitions: computed.transitions,
        requeue,
    }
}

fn backend_name(spec: &BalancerPolicySpec) -> String {
    match &spec.service {
        Some(s) => format!("Service {}:{}", s.name, s.port),
        None => "the static endpoint list".into(),
    }
}

fn route_for(policy: &BalancerPolicy, namespace: &str, endpoints: Vec<Endpoint>) -> Route {
    Route::resolved(policy, namespace, endpoints)
}

/// Counts the failure and retries with backoff-free requeue; one bad object never stops
/// the controller.
pub fn error_policy(
    policy: Arc<BalancerPolicy>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    tracing::warn!(policy = %policy.name_any(), %error, "reconcile failed");
    ctx.metrics.reconcile_failed(error.reason());
    Action::requeue(Duration::from_secs(5))
}
