//! The LoadTest controller: a test becomes a scenario ConfigMap, a runner-token Secret
//! and an Indexed Job of `trimtab-bots` runners, all owned by it (deleting the test
//! deletes them, through the garbage collector).
//!
//! The runners register with the operator and start together ([`runs`]); they report
//! their results every few seconds, which the operator merges into `status` and, when
//! the test ends, into the report ConfigMap ([`report`]). The guards judge the merged
//! results: `maxLoad` pauses the test, `criticalLoad` aborts it and deletes the Job.
//! The phase — Pending, Starting, Running ⇄ Paused, Succeeded | Failed | Aborted —
//! gets a condition and an Event at each transition, and stays put once the test has
//! ended. Only the leader writes; runners that report to another replica are told to
//! retry.

pub mod metrics;
pub mod objects;
pub mod report;
pub mod runs;
pub mod target_cpu;
pub mod token;

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::{
    api::{
        batch::v1::Job,
        core::v1::{ConfigMap, Pod, Secret},
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use trimtab_api::{
    guard::Guard,
    load_test::{Cleanup, LoadTest, LoadTestStatus, Phase, ReportRef},
};

pub use self::objects::RunnerSettings;
use self::runs::{Plan, Runs};
use crate::{
    conditions, leader::Leadership, metrics::ControllerMetrics, metrics_source::MetricsSource,
};

/// The field manager of everything this controller applies.
const FIELD_MANAGER: &str = "trimtab-operator";
/// Re-read while a test runs (Job events trigger reconciles too; this is the floor):
/// also how often the live numbers in status are rewritten.
const WHILE_RUNNING: Duration = Duration::from_secs(2);
/// How long runners may take to all register before the test fails: pulling an image
/// and scheduling pods can take minutes on a busy cluster.
const START_DEADLINE: Duration = Duration::from_secs(300);
/// Re-read of ended tests, which change no more.
const AFTER_END: Duration = Duration::from_secs(300);

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A LoadTest without a namespace (it is a namespaced kind).
    #[error("LoadTest {0} has no namespace")]
    NoNamespace(String),
    /// The scenario could not be encoded.
    #[error("encoding the scenario of {test}: {source}")]
    Encode {
        /// The test.
        test: String,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// An API call failed.
    #[error("{action} for LoadTest {test}: {source}")]
    Api {
        /// What was done.
        action: &'static str,
        /// The test.
        test: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

struct Context {
    client: Client,
    /// Every pod (the BalancerPolicy controller's reflector): the target pods' CPU
    /// requests.
    pods: Store<Pod>,
    leadership: Leadership,
    recorder: Recorder,
    settings: RunnerSettings,
    runs: Runs,
    metrics: ControllerMetrics,
    live: metrics::LoadTestMetrics,
}

/// What the controller shares with the rest of the operator.
#[derive(Debug, Clone)]
pub struct Wiring {
    /// Every pod (the BalancerPolicy controller's reflector): the target pods' CPU
    /// requests.
    pub pods: Store<Pod>,
    /// The runs the config server's runner endpoint feeds.
    pub runs: Runs,
    /// How runner pods are made.
    pub settings: RunnerSettings,
    /// Live numbers on `/metrics`.
    pub live: metrics::LoadTestMetrics,
}

/// Runs the controller until shutdown.
pub async fn run(
    client: Client,
    wiring: Wiring,
    metrics: ControllerMetrics,
    reporter: Reporter,
    leadership: Leadership,
) {
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        pods: wiring.pods,
        leadership: leadership.clone(),
        settings: wiring.settings,
        runs: wiring.runs,
        metrics,
        live: wiring.live,
    });
    let controller = Controller::new(
        Api::<LoadTest>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Job>::all(client),
        watcher::Config::default().labels(objects::LOAD_TEST_LABEL),
    );
    tokio::spawn(follow_leadership(
        leadership,
        ctx.runs.clone(),
        ctx.live.clone(),
    ));
    tokio::spawn(sweep_deleted(
        controller.store(),
        ctx.runs.clone(),
        ctx.live.clone(),
    ));
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "load test reconcile did not run");
            }
        })
        .await;
}

/// Keeps the runs board and the live series to the leader: a replica that loses the
/// lease forgets every run, so runners move to the new leader instead of being steered
/// by a replica that no longer writes.
async fn follow_leadership(mut leadership: Leadership, runs: Runs, live: metrics::LoadTestMetrics) {
    let mut leading = leadership.is_leader();
    loop {
        runs.set_leading(leading);
        if !leading {
            live.clear();
        }
        leading = leadership.changed().await;
    }
}

/// How often runs and series of deleted tests are looked for. A deleted test has no
/// reconcile to notice (there is no finalizer: deleting a test must not wait for the
/// operator).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Drops the runs and live series of tests that are gone.
async fn sweep_deleted(tests: Store<LoadTest>, runs: Runs, live: metrics::LoadTestMetrics) {
    if tests.wait_until_ready().await.is_err() {
        return;
    }
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let gone = runs.sweep(|(namespace, name), uid| {
            tests
                .get(&ObjectRef::new(name).within(namespace))
                .is_some_and(|t| t.uid().as_deref() == Some(uid))
        });
        for test in gone {
            tracing::debug!(namespace = %test.0, name = %test.1, "forgot the run of a deleted LoadTest");
            live.remove(&test);
        }
    }
}

fn error_policy(test: Arc<LoadTest>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(match error {
        ReconcileError::NoNamespace(_) => "no-namespace",
        ReconcileError::Encode { .. } => "encode",
        ReconcileError::Api { .. } => "api",
    });
    tracing::warn!(test = %test.name_any(), %error, "load test reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(test: Arc<LoadTest>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    if !ctx.leadership.is_leader() {
        return Ok(Action::requeue(WHILE_RUNNING));
    }
    let name = test.name_any();
    let namespace = test
        .namespace()
        .ok_or_else(|| ReconcileError::NoNamespace(name.clone()))?;
    let id = format!("{namespace}/{name}");
    let api_error = |action| {
        let test = id.clone();
        move |source| ReconcileError::Api {
            action,
            test,
            source,
        }
    };
    let current = test.status.clone().unwrap_or_default();
    if current.phase.is_some_and(objects::is_final) {
        return Ok(Action::requeue(AFTER_END));
    }

    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), &namespace);
    let Some(image) = test
        .spec
        .runners
        .image
        .clone()
        .or_else(|| ctx.settings.image.clone())
    else {
        let progress = objects::Progress {
            phase: Phase::Failed,
            runners: Default::default(),
            reason: "NoRunnerImage",
            message: "spec.runners.image is not set and the operator has no sidecar image (--sidecar-image) to run trimtab-bots from".into(),
        };
        write_status(&ctx, &test, &current, &progress, None).await?;
        return Ok(Action::requeue(AFTER_END));
    };
    let key = (namespace.clone(), name.clone());
    let uid = test.uid().unwrap_or_default();
    ctx.runs.track(
        &key,
        Plan {
            uid: uid.clone(),
            runners: test.spec.runners.parallelism,
            // CPU is judged where it can be read: validation makes cpu limits need a
            // target.podSelector.
            guard: test.spec.guards.as_ref().and_then(|g| {
                let cpu = test.spec.target.pod_selector.is_some();
                Guard::new(g, cpu).map(|guard| (guard, g.window.get()))
            }),
            names: runs::Names {
                states: test
                    .spec
                    .scenario
                    .states
                    .iter()
                    .map(|s| s.name.clone())
                    .collect(),
                invariants: test
                    .spec
                    .invariants
                    .iter()
                    .map(|i| i.name.clone())
                    .collect(),
            },
        },
    );
    let scenario = objects::scenario(&test).map_err(|source| ReconcileError::Encode {
        test: id.clone(),
        source,
    })?;
    Api::<ConfigMap>::namespaced(ctx.client.clone(), &namespace)
        .patch(
            &objects::scenario_name(&name),
            &apply,
            &Patch::Apply(&scenario),
        )
        .await
        .map_err(api_error("applying the scenario ConfigMap"))?;
    // Created, never patched: the operator may create Secrets anywhere but read or
    // change none (see `token`). One that exists already holds the same derived token.
    let secret = objects::token_secret(&test, &ctx.runs.token(&uid));
    match Api::<Secret>::namespaced(ctx.client.clone(), &namespace)
        .create(&PostParams::default(), &secret)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(api_error("creating the runner token Secret")(e)),
    }
    let existing = jobs
        .get_opt(&objects::job_name(&name))
        .await
        .map_err(api_error("reading the runner Job"))?
        .filter(|job| objects::owned_by(job.metadata.owner_references.as_ref(), &test));
    let job = match existing {
        // A Job's template is immutable: once made, it is only read.
        Some(job) => job,
        None => {
            let wanted = objects::runners(&test, &image, &ctx.settings);
            jobs.patch(&objects::job_name(&name), &apply, &Patch::Apply(&wanted))
                .await
                .map_err(api_error("creating the runner Job"))?
        }
    };
    if ctx.runs.started(&key) {
        ctx.runs
            .set_cpu(&key, target_cpu(&ctx, &test, &namespace).await);
    }
    let waited = job
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| Timestamp::now().duration_since(t.0).try_into().ok())
        .unwrap_or_default();
    let run = ctx.runs.snapshot(&key);
    if let Some(run) = &run {
        ctx.live.set(&key, run);
    }
    let progress = objects::progress(
        current.phase,
        Some(&job),
        run.as_ref(),
        test.spec.runners.parallelism,
        waited,
        START_DEADLINE,
    );
    let ended = objects::is_final(progress.phase);
    if ended && progress.phase != Phase::Succeeded && !objects::is_suspended(&job) {
        // An abort reached every runner in the answer to its last report; suspending
        // the Job makes sure (its running pods are deleted) and keeps the finished
        // ones for inspection until the cleanup below decides.
        jobs.patch(
            &objects::job_name(&name),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .map(|_| ())
        .or_else(already_gone)
        .map_err(api_error("suspending the runner Job"))?;
    }
    write_status(&ctx, &test, &current, &progress, run.as_ref()).await?;
    if ended {
        let delete = match test.spec.cleanup {
            Cleanup::Always => true,
            Cleanup::OnSuccess => progress.phase == Phase::Succeeded,
            Cleanup::Never => false,
        };
        if delete {
            // The scenario ConfigMap stays: it is small and says what was run.
            delete_job(&jobs, &name)
                .await
                .map_err(api_error("deleting the runner Job"))?;
        }
        ctx.runs.end(&key);
        ctx.live.remove(&key);
    }
    ctx.metrics.observe_reconcile(started.elapsed());
    Ok(Action::requeue(if ended {
        AFTER_END
    } else {
        WHILE_RUNNING
    }))
}

/// The target pods' mean CPU utilization when the guards have a cpu limit; `None` when
/// it cannot be read (then only error rate and p99 are judged, and the failure is
/// logged).
async fn target_cpu(ctx: &Context, test: &LoadTest, namespace: &str) -> Option<f64> {
    let guards = test.spec.guards.as_ref()?;
    let has_cpu = [&guards.max_load, &guards.critical_load]
        .into_iter()
        .flatten()
        .any(|l| l.cpu.is_some());
    let selector = test.spec.target.pod_selector.clone()?;
    if !has_cpu {
        return None;
    }
    let selector = match kube::core::Selector::try_from(selector) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(test = %test.name_any(), error = %e, "target.podSelector is not a selector");
            return None;
        }
    };
    let source = MetricsSource::new(guards.cpu_source, guards.prometheus.as_ref(), &ctx.client);
    match source.cpu_usage(namespace).await {
        Ok(usage) => target_cpu::utilization(&ctx.pods.state(), namespace, &selector, &usage),
        Err(e) => {
            ctx.metrics
                .metrics_source_error(&format!("LoadTest {}: {e}", test.name_any()));
            None
        }
    }
}

/// Deletes the test's Job and its pods; a Job already gone is fine.
async fn delete_job(jobs: &Api<Job>, test: &str) -> Result<(), kube::Error> {
    jobs.delete(
        &objects::job_name(test),
        &DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..Default::default()
        },
    )
    .await
    .map(|_| ())
    .or_else(already_gone)
}

/// A call on an object that is not there (any more) did what it meant to.
fn already_gone(e: kube::Error) -> Result<(), kube::Error> {
    match e {
        kube::Error::Api(s) if s.code == 404 => Ok(()),
        e => Err(e),
    }
}

/// Writes the phase, runner counts, times, live numbers and condition; when the test
/// ends, the report ConfigMap first; an Event when the phase changes.
async fn write_status(
    ctx: &Context,
    test: &LoadTest,
    current: &LoadTestStatus,
    progress: &objects::Progress,
    run: Option<&runs::RunSnapshot>,
) -> Result<(), ReconcileError> {
    let name = test.name_any();
    let namespace = test.namespace().unwrap_or_default();
    let now = || Time(Timestamp::now());
    let ended = objects::is_final(progress.phase);
    let started = matches!(progress.phase, Phase::Running | Phase::Paused) || ended;
    let condition = conditions::new(
        phase_name(progress.phase),
        true,
        progress.reason,
        progress.message.clone(),
        test.meta().generation,
    );
    let start_at = run
        .and_then(|r| r.start_at)
        .and_then(|at| Timestamp::try_from(at).ok())
        .map(Time);
    let mut status = LoadTestStatus {
        observed_generation: test.meta().generation,
        phase: Some(progress.phase),
        start_time: current
            .start_time
            .clone()
            .or(start_at)
            .or_else(|| started.then(now)),
        completion_time: current.completion_time.clone().or_else(|| ended.then(now)),
        runners: Some(progress.runners.clone()),
        conditions: conditions::merge(&current.conditions, vec![condition]),
        ..current.clone()
    };
    if let Some(run) = run {
        report::fill_status(&mut status, run);
    }
    if ended {
        let run = run.cloned().unwrap_or_default();
        let map = report::config_map(test, progress, &run, &status).map_err(|source| {
            ReconcileError::Encode {
                test: format!("{namespace}/{name}"),
                source,
            }
        })?;
        match Api::<ConfigMap>::namespaced(ctx.client.clone(), &namespace)
            .patch(
                &objects::report_name(&name),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&map),
            )
            .await
        {
            Ok(_) => {
                status.report = Some(ReportRef {
                    config_map: objects::report_name(&name),
                });
            }
            // Refused for good (a quota, a policy): the test has ended all the same,
            // and its status keeps the numbers. Retrying would leave it Running forever.
            Err(kube::Error::Api(s)) if (400..500).contains(&s.code) && s.code != 429 => {
                tracing::warn!(test = %name, %namespace, code = s.code, error = %s.message, "the report ConfigMap was refused; the test ends without it");
                if let Some(c) = status.conditions.last_mut() {
                    c.message = format!(
                        "{} (the report ConfigMap was refused: {})",
                        c.message, s.message
                    );
                }
            }
            Err(source) => {
                return Err(ReconcileError::Api {
                    action: "writing the report ConfigMap",
                    test: format!("{namespace}/{name}"),
                    source,
                });
            }
        }
    }
    if &status == current {
        return Ok(());
    }
    Api::<LoadTest>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&json!({
                "apiVersion": "trimtab.dev/v1alpha1",
                "kind": "LoadTest",
                "status": status,
            })),
        )
        .await
        .map_err(|source| ReconcileError::Api {
            action: "writing status",
            test: format!("{namespace}/{name}"),
            source,
        })?;
    if current.phase != Some(progress.phase) {
        let event = Event {
            type_: if matches!(
                progress.phase,
                Phase::Failed | Phase::Aborted | Phase::Paused
            ) {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: progress.reason.into(),
            note: Some(progress.message.clone()),
            action: phase_name(progress.phase).into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &test.object_ref(&())).await {
            tracing::warn!(test = %name, error = %e, "could not publish event");
        }
    }
    Ok(())
}

/// The phase's name, also the type of the condition that marks it.
fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "Pending",
        Phase::Starting => "Starting",
        Phase::Running => "Running",
        Phase::Paused => "Paused",
        Phase::Succeeded => "Succeeded",
        Phase::Failed => "Failed",
        Phase::Aborted => "Aborted",
    }
}
