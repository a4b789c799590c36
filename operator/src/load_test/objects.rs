//! What a LoadTest becomes, as pure functions: the scenario ConfigMap, the runner-token
//! Secret and the Indexed Job of runners it owns, and the phase read back from that Job
//! and from what the runners report.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        batch::v1::{Job, JobSpec},
        core::v1::{
            Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource,
            PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile, Secret,
            SecretKeySelector, SecurityContext, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Resource, ResourceExt};
use trimtab_api::{
    guard::GuardState,
    load_test::{LoadTest, Phase, RunnerCounts},
    runner_protocol::{TEST_ENV, TOKEN_ENV, TOKEN_KEY},
};

use super::runs::RunSnapshot;

/// Label on every object made for a LoadTest, with the test's name.
pub const LOAD_TEST_LABEL: &str = "trimtab.dev/loadtest";
/// Where the runner container finds the test, mounted from the scenario ConfigMap.
pub const SCENARIO_DIR: &str = "/etc/trimtab";
/// The key (and file name) of the test in the scenario ConfigMap.
pub const SCENARIO_KEY: &str = "loadtest.yaml";
/// The runner container's name.
pub const RUNNER_CONTAINER: &str = "runner";

/// Names of the objects owned by the LoadTest `name`.
pub fn scenario_name(name: &str) -> String {
    format!("{name}-scenario")
}

/// The Secret holding the runners' token.
pub fn token_name(name: &str) -> String {
    format!("{name}-runner-token")
}

/// The ConfigMap the final report is written to.
pub fn report_name(name: &str) -> String {
    format!("{name}-report")
}

/// The Job's name; its Pods are `<name>-runners-<index>-<suffix>`.
pub fn job_name(name: &str) -> String {
    format!("{name}-runners")
}

fn owned_meta(test: &LoadTest, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: test.namespace(),
        labels: Some(BTreeMap::from([(
            LOAD_TEST_LABEL.to_owned(),
            test.name_any(),
        )])),
        owner_references: test.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

/// An empty ConfigMap named `name`, owned by `test`.
pub fn owned_config_map(test: &LoadTest, name: String) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(test, name),
        ..Default::default()
    }
}

/// The test as the runners read it: the whole spec, as JSON (which YAML readers take).
pub fn scenario(test: &LoadTest) -> Result<ConfigMap, serde_json::Error> {
    let text = serde_json::to_string_pretty(&serde_json::json!({ "spec": test.spec }))?;
    let mut map = owned_config_map(test, scenario_name(&test.name_any()));
    map.data = Some(BTreeMap::from([(SCENARIO_KEY.to_owned(), text)]));
    Ok(map)
}

/// The runners' token, which only they (and the operator, which derives it) know.
pub fn token_secret(test: &LoadTest, token: &str) -> Secret {
    Secret {
        metadata: owned_meta(test, token_name(&test.name_any())),
        string_data: Some(BTreeMap::from([(TOKEN_KEY.to_owned(), token.to_owned())])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// How runner pods are made and where they report.
#[derive(Clone, Debug, Default)]
pub struct RunnerSettings {
    /// The image when a test names none: the operator's sidecar image, which carries
    /// `trimtab-bots`.
    pub image: Option<String>,
    /// Its pull policy.
    pub pull_policy: String,
    /// The operator's HTTPS URL, where runners register and report.
    pub control_plane_url: String,
    /// The CA the runners trust for that URL.
    pub ca_pem: String,
}

/// The runners: an Indexed Job whose completion index is each runner's shard. A runner
/// that fails fails the test (`backoffLimit: 0`): a retried runner would replay its
/// users' journeys from the start and count them twice.
pub fn runners(test: &LoadTest, image: &str, settings: &RunnerSettings) -> Job {
    let name = test.name_any();
    let value = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let parallelism = i32::try_from(test.spec.runners.parallelism).unwrap_or(i32::MAX);
    let mut labels = BTreeMap::from([(LOAD_TEST_LABEL.to_owned(), name.clone())]);
    labels.insert("app.kubernetes.io/name".into(), "trimtab-bots".into());
    let container = Container {
        name: RUNNER_CONTAINER.into(),
        image: Some(image.to_owned()),
        image_pull_policy: Some(settings.pull_policy.clone()),
        command: Some(vec![
            "trimtab-bots".into(),
            "run".into(),
            format!("{SCENARIO_DIR}/{SCENARIO_KEY}"),
        ]),
        env: Some(vec![
            value("TRIMTAB_SHARDS", parallelism.to_string()),
            value(
                TEST_ENV,
                format!("{}/{name}", test.namespace().unwrap_or_default()),
            ),
            value(
                "TRIMTAB_CONTROL_PLANE_URL",
                settings.control_plane_url.clone(),
            ),
            value("TRIMTAB_CONTROL_PLANE_CA_PEM", settings.ca_pem.clone()),
            EnvVar {
                name: TOKEN_ENV.into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: token_name(&name),
                        key: TOKEN_KEY.into(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]),
        resources: test.spec.runners.resources.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: "scenario".into(),
            mount_path: SCENARIO_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        // The restricted Pod Security Standard.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    Job {
        metadata: owned_meta(test, job_name(&name)),
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(parallelism),
            parallelism: Some(parallelism),
            backoff_limit: Some(0),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "scenario".into(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: scenario_name(&name),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Where the runners are, read from their Job and their reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The phase this means.
    pub phase: Phase,
    /// Runner pods by state.
    pub runners: RunnerCounts,
    /// Why, for the condition and the Event.
    pub reason: &'static str,
    /// In words.
    pub message: String,
}

/// The phase of a test now in phase `current`, whose runners are `job` (`None`: not
/// created yet) and report `run` (`None`: not tracked here yet), `waited` after the Job
/// was made; runners that have not all registered within `start_deadline` fail the
/// test. A test that was running when this replica took over (restart, new leader)
/// has an empty board until the runners' next reports: it stays as it was meanwhile.
///
/// A runner that dies fails the test (the Job's `backoffLimit` is 0): its share of the
/// users is gone, so what remains is not the load the test asked for. What every runner
/// reported up to then is still merged into the report.
pub fn progress(
    current: Option<Phase>,
    job: Option<&Job>,
    run: Option<&RunSnapshot>,
    parallelism: u32,
    waited: Duration,
    start_deadline: Duration,
) -> Progress {
    let status = job.and_then(|j| j.status.clone()).unwrap_or_default();
    let count = |n: Option<i32>| u32::try_from(n.unwrap_or(0)).unwrap_or(0);
    let reported = run.cloned().unwrap_or_default();
    let runners = RunnerCounts {
        ready: reported.waiting,
        running: reported.running,
        finished: reported.finished.max(count(status.succeeded)),
        failed: count(status.failed),
    };
    let registered = reported.waiting + reported.running + reported.finished;
    let condition = |kind: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == kind && c.status == "True")
    };
    let (phase, reason, message) = if reported.guard == GuardState::Aborted {
        (
            Phase::Aborted,
            "CriticalLoad",
            reported.guard_reason.clone().unwrap_or_default(),
        )
    } else if condition("Complete").is_some() {
        (
            Phase::Succeeded,
            "RunnersSucceeded",
            format!("all {parallelism} runners finished"),
        )
    } else if let Some(c) = condition("Failed") {
        (
            Phase::Failed,
            "RunnerFailed",
            format!(
                "{} runner(s) failed: {}",
                runners.failed,
                c.message
                    .clone()
                    .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
            ),
        )
    } else if job.is_none() {
        (Phase::Pending, "Creating", "creating the runners".into())
    } else if reported.start_at.is_none() {
        if let Some(phase @ (Phase::Running | Phase::Paused)) = current {
            (
                phase,
                "AwaitingReports",
                "this operator replica restarted or took over: the runners' next reports rebuild the numbers".into(),
            )
        } else if waited > start_deadline {
            (
                Phase::Failed,
                "RunnersNotRegistered",
                format!(
                    "only {registered} of {parallelism} runners registered within {}s",
                    start_deadline.as_secs()
                ),
            )
        } else {
            (
                Phase::Starting,
                "RunnersRegistering",
                format!("{registered} of {parallelism} runners registered"),
            )
        }
    } else if reported.guard == GuardState::Holding {
        (
            Phase::Paused,
            "MaxLoad",
            reported.guard_reason.clone().unwrap_or_default(),
        )
    } else {
        let skew = reported
            .start_skew
            .map(|s| format!(" within {:.1} ms", s.as_secs_f64() * 1e3))
            .unwrap_or_default();
        (
            Phase::Running,
            "RunnersRunning",
            format!("{parallelism} runners started together{skew}"),
        )
    };
    Progress {
        phase,
        runners,
        reason,
        message,
    }
}

/// Whether the Job is suspended (its pods stopped).
pub fn is_suspended(job: &Job) -> bool {
    job.spec.as_ref().and_then(|s| s.suspend) == Some(true)
}

/// Whether `phase` ends the test: nothing is created or changed after it.
pub fn is_final(phase: Phase) -> bool {
    matches!(phase, Phase::Succeeded | Phase::Failed | Phase::Aborted)
}

/// An owner reference check for objects found by label: only ours are touched.
pub fn owned_by(owners: Option<&Vec<OwnerReference>>, test: &LoadTest) -> bool {
    let uid = test.meta().uid.as_deref();
    owners
        .into_iter()
        .flatten()
        .any(|o| Some(o.uid.as_str()) == uid && o.controller == Some(true))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};

    /// A valid LoadTest `load/shop` with 3 runners, for this module's tests and its
    /// neighbours'.
    pub(in crate::load_test) fn test_object() -> LoadTest {
        let mut test: LoadTest = serde_json::from_value(serde_json::json!({
            "apiVersion": "trimtab.dev/v1alpha1",
            "kind": "LoadTest",
            "metadata": {"name": "shop", "namespace": "load", "uid": "u-1"},
            "spec": {
                "target": {"url": "http://127.0.0.1:8080"},
                "workload": {"users": 10, "duration": "5s"},
                "runners": {"parallelism": 3},
                "scenario": {"start": "home", "states": [{"name": "home", "request": {"path": "/"}}]},
            },
        }))
        .expect("a LoadTest");
        test.metadata.generation = Some(1);
        test
    }

    #[test]
    fn the_job_shards_by_completion_index_and_is_owned_by_the_test() {
        let test = test_object();
        let settings = RunnerSettings {
            image: None,
            pull_policy: "IfNotPresent".into(),
            control_plane_url: "https://op.trimtab.svc:8443".into(),
            ca_pem: "PEM".into(),
        };
        let job = runners(&test, "trimtab-sidecar:1", &settings);
        let spec = job.spec.as_ref().expect("spec");
        assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!((spec.completions, spec.parallelism), (Some(3), Some(3)));
        assert_eq!(spec.backoff_limit, Some(0));
        let pod = spec.template.spec.as_ref().expect("pod");
        let container = &pod.containers[0];
        assert_eq!(
            container.command.as_deref().expect("command"),
            ["trimtab-bots", "run", "/etc/trimtab/loadtest.yaml"]
        );
        let env = container.env.as_ref().expect("env");
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(value("TRIMTAB_SHARDS").as_deref(), Some("3"));
        assert_eq!(value(TEST_ENV).as_deref(), Some("load/shop"));
        assert_eq!(
            value("TRIMTAB_CONTROL_PLANE_URL").as_deref(),
            Some("https://op.trimtab.svc:8443")
        );
        let token = env.iter().find(|e| e.name == TOKEN_ENV).expect("token env");
        let secret_ref = token
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("from the Secret");
        assert_eq!(secret_ref.name, token_name("shop"));
        assert!(owned_by(
            token_secret(&test, "t").metadata.owner_references.as_ref(),
            &test
        ));
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert!(owned_by(job.metadata.owner_references.as_ref(), &test));
        let text = &scenario(&test).expect("scenario").data.expect("data")[SCENARIO_KEY];
        let back: serde_json::Value = serde_json::from_str(text).expect("JSON");
        assert_eq!(back["spec"]["runners"]["parallelism"], 3);
    }

    #[test]
    fn the_phase_follows_the_job_and_the_reports() {
        let deadline = Duration::from_secs(300);
        let early = Duration::from_secs(1);
        let mut job = Job::default();
        assert_eq!(
            progress(None, None, None, 3, early, deadline).phase,
            Phase::Pending
        );
        assert_eq!(
            progress(None, Some(&job), None, 3, early, deadline).phase,
            Phase::Starting
        );
        let mut run = RunSnapshot {
            expected: 3,
            waiting: 2,
            ..RunSnapshot::default()
        };
        let p = progress(None, Some(&job), Some(&run), 3, early, deadline);
        assert_eq!((p.phase, p.runners.ready), (Phase::Starting, 2));
        assert_eq!(p.message, "2 of 3 runners registered");
        let late = progress(None, Some(&job), Some(&run), 3, deadline * 2, deadline);
        assert_eq!(
            (late.phase, late.reason),
            (Phase::Failed, "RunnersNotRegistered")
        );
        // A test that was running before this replica took over keeps running while
        // the runners report again, however old its Job.
        for phase in [Phase::Running, Phase::Paused] {
            let fresh = RunSnapshot::default();
            let p = progress(
                Some(phase),
                Some(&job),
                Some(&fresh),
                3,
                deadline * 2,
                deadline,
            );
            assert_eq!((p.phase, p.reason), (phase, "AwaitingReports"));
            let p = progress(Some(phase), Some(&job), None, 3, deadline * 2, deadline);
            assert_eq!(p.phase, phase);
        }
        run.waiting = 0;
        run.running = 3;
        run.start_at = Some(std::time::SystemTime::now());
        run.start_skew = Some(Duration::from_micros(1500));
        let p = progress(None, Some(&job), Some(&run), 3, early, deadline);
        assert_eq!(p.phase, Phase::Running);
        assert_eq!(p.message, "3 runners started together within 1.5 ms");
        run.guard = GuardState::Holding;
        run.guard_reason = Some("maxLoad: p99 3s > 2s".into());
        assert_eq!(
            progress(None, Some(&job), Some(&run), 3, early, deadline).phase,
            Phase::Paused
        );
        run.guard = GuardState::Aborted;
        let p = progress(None, Some(&job), Some(&run), 3, early, deadline);
        assert_eq!((p.phase, p.reason), (Phase::Aborted, "CriticalLoad"));
        run.guard = GuardState::Running;
        let done = |kind: &str| JobCondition {
            type_: kind.into(),
            status: "True".into(),
            message: Some("BackoffLimitExceeded".into()),
            ..Default::default()
        };
        job.status = Some(JobStatus {
            succeeded: Some(3),
            conditions: Some(vec![done("Complete")]),
            ..Default::default()
        });
        let p = progress(None, Some(&job), Some(&run), 3, early, deadline);
        assert_eq!((p.phase, p.runners.finished), (Phase::Succeeded, 3));
        job.status = Some(JobStatus {
            failed: Some(1),
            conditions: Some(vec![done("Failed")]),
            ..Default::default()
        });
        let p = progress(None, Some(&job), Some(&run), 3, early, deadline);
        assert_eq!(p.phase, Phase::Failed);
        assert!(p.message.contains("1 runner(s) failed"), "{}", p.message);
        assert!(is_final(p.phase) && !is_final(Phase::Running));
    }
}
