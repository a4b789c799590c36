//! The LoadTest controller: a test becomes a scenario ConfigMap and an Indexed Job of
//! `trimtab-bots` runners, both owned by it (deleting the test deletes them, through
//! the garbage collector); its status follows the Job's phases, with a condition and an
//! Event at each transition, and stays put once the test has ended.
//!
//! Only the leader writes. The synchronized start, merged results and guards build on
//! this (issue 7); until then the phase is read from the Job alone.

pub mod objects;

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::{
    api::{batch::v1::Job, core::v1::ConfigMap},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PropagationPolicy},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use serde_json::json;
use trimtab_api::load_test::{Cleanup, LoadTest, LoadTestStatus, Phase};

use crate::{conditions, leader::Leadership, metrics::ControllerMetrics};

/// The field manager of everything this controller applies.
const FIELD_MANAGER: &str = "trimtab-operator";
/// Re-read while a test runs (Job events trigger reconciles too; this is the floor).
const WHILE_RUNNING: Duration = Duration::from_secs(5);
/// Re-read of ended tests, which change no more.
const AFTER_END: Duration = Duration::from_secs(300);

/// The runner image when a test names none.
#[derive(Clone, Debug, Default)]
pub struct RunnerImage {
    /// The operator's sidecar image, which carries `trimtab-bots`.
    pub image: Option<String>,
    /// Its pull policy.
    pub pull_policy: String,
}

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
    leadership: Leadership,
    recorder: Recorder,
    image: RunnerImage,
    metrics: ControllerMetrics,
}

/// Runs the controller until shutdown.
pub async fn run(
    client: Client,
    image: RunnerImage,
    metrics: ControllerMetrics,
    reporter: Reporter,
    leadership: Leadership,
) {
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        leadership,
        image,
        metrics,
    });
    Controller::new(
        Api::<LoadTest>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Job>::all(client),
        watcher::Config::default().labels(objects::LOAD_TEST_LABEL),
    )
    .shutdown_on_signal()
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        if let Err(e) = result {
            tracing::debug!(error = %e, "load test reconcile did not run");
        }
    })
    .await;
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
        .or_else(|| ctx.image.image.clone())
    else {
        let progress = objects::Progress {
            phase: Phase::Failed,
            runners: Default::default(),
            reason: "NoRunnerImage",
            message: "spec.runners.image is not set and the operator has no sidecar image (--sidecar-image) to run trimtab-bots from".into(),
        };
        write_status(&ctx, &test, &current, &progress).await?;
        return Ok(Action::requeue(AFTER_END));
    };
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
    let existing = jobs
        .get_opt(&objects::job_name(&name))
        .await
        .map_err(api_error("reading the runner Job"))?
        .filter(|job| objects::owned_by(job.metadata.owner_references.as_ref(), &test));
    let job = match existing {
        // A Job's template is immutable: once made, it is only read.
        Some(job) => job,
        None => {
            let wanted = objects::runners(&test, &image, &ctx.image.pull_policy);
            jobs.patch(&objects::job_name(&name), &apply, &Patch::Apply(&wanted))
                .await
                .map_err(api_error("creating the runner Job"))?
        }
    };
    let progress = objects::progress(Some(&job), test.spec.runners.parallelism);
    write_status(&ctx, &test, &current, &progress).await?;

    if objects::is_final(progress.phase) {
        let delete = match test.spec.cleanup {
            Cleanup::Always => true,
            Cleanup::OnSuccess => progress.phase == Phase::Succeeded,
            Cleanup::Never => false,
        };
        if delete {
            // The scenario ConfigMap stays: it is small and says what was run.
            jobs.delete(
                &objects::job_name(&name),
                &DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..Default::default()
                },
            )
            .await
            .map(|_| ())
            .or_else(|e| match e {
                kube::Error::Api(s) if s.code == 404 => Ok(()),
                e => Err(e),
            })
            .map_err(api_error("deleting the runner Job"))?;
        }
    }
    ctx.metrics.observe_reconcile(started.elapsed());
    Ok(Action::requeue(if objects::is_final(progress.phase) {
        AFTER_END
    } else {
        WHILE_RUNNING
    }))
}

/// Writes the phase, runner counts, times and condition; an Event when the phase changes.
async fn write_status(
    ctx: &Context,
    test: &LoadTest,
    current: &LoadTestStatus,
    progress: &objects::Progress,
) -> Result<(), ReconcileError> {
    let name = test.name_any();
    let namespace = test.namespace().unwrap_or_default();
    let now = || Time(Timestamp::now());
    let started = matches!(progress.phase, Phase::Running) || objects::is_final(progress.phase);
    let condition = conditions::new(
        phase_name(progress.phase),
        true,
        progress.reason,
        progress.message.clone(),
        test.meta().generation,
    );
    let status = LoadTestStatus {
        observed_generation: test.meta().generation,
        phase: Some(progress.phase),
        start_time: current.start_time.clone().or_else(|| started.then(now)),
        completion_time: current
            .completion_time
            .clone()
            .or_else(|| objects::is_final(progress.phase).then(now)),
        runners: Some(progress.runners.clone()),
        conditions: conditions::merge(&current.conditions, vec![condition]),
        ..current.clone()
    };
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
            type_: if progress.phase == Phase::Failed {
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
