//! What a LoadTest becomes, as pure functions: the scenario ConfigMap and the Indexed
//! Job of runners it owns, and the phase read back from that Job.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        batch::v1::{Job, JobSpec},
        core::v1::{
            Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EnvVar, PodSecurityContext,
            PodSpec, PodTemplateSpec, SeccompProfile, SecurityContext, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Resource, ResourceExt};
use trimtab_api::load_test::{LoadTest, Phase, RunnerCounts};

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

/// The test as the runners read it: the whole spec, as JSON (which YAML readers take).
pub fn scenario(test: &LoadTest) -> Result<ConfigMap, serde_json::Error> {
    let text = serde_json::to_string_pretty(&serde_json::json!({ "spec": test.spec }))?;
    Ok(ConfigMap {
        metadata: owned_meta(test, scenario_name(&test.name_any())),
        data: Some(BTreeMap::from([(SCENARIO_KEY.to_owned(), text)])),
        ..Default::default()
    })
}

/// The runners: an Indexed Job whose completion index is each runner's shard. A runner
/// that fails fails the test (`backoffLimit: 0`): a retried runner would replay its
/// users' journeys from the start and count them twice.
pub fn runners(test: &LoadTest, image: &str, pull_policy: &str) -> Job {
    let name = test.name_any();
    let parallelism = i32::try_from(test.spec.runners.parallelism).unwrap_or(i32::MAX);
    let mut labels = BTreeMap::from([(LOAD_TEST_LABEL.to_owned(), name.clone())]);
    labels.insert("app.kubernetes.io/name".into(), "trimtab-bots".into());
    let container = Container {
        name: RUNNER_CONTAINER.into(),
        image: Some(image.to_owned()),
        image_pull_policy: Some(pull_policy.to_owned()),
        command: Some(vec![
            "trimtab-bots".into(),
            "run".into(),
            format!("{SCENARIO_DIR}/{SCENARIO_KEY}"),
        ]),
        env: Some(vec![EnvVar {
            name: "TRIMTAB_SHARDS".into(),
            value: Some(parallelism.to_string()),
            ..Default::default()
        }]),
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

/// Where the runners are, read from their Job.
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

/// The phase of a test whose runners are `job` (`None`: not created yet).
pub fn progress(job: Option<&Job>, parallelism: u32) -> Progress {
    let status = job.and_then(|j| j.status.clone()).unwrap_or_default();
    let count = |n: Option<i32>| u32::try_from(n.unwrap_or(0)).unwrap_or(0);
    let runners = RunnerCounts {
        ready: count(status.ready),
        running: count(status.active),
        finished: count(status.succeeded),
        failed: count(status.failed),
    };
    let condition = |kind: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == kind && c.status == "True")
    };
    let (phase, reason, message) = if condition("Complete").is_some() {
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
    } else if runners.ready >= parallelism {
        (
            Phase::Running,
            "RunnersRunning",
            format!("{} of {parallelism} runners running", runners.ready),
        )
    } else {
        (
            Phase::Starting,
            "RunnersStarting",
            format!("{} of {parallelism} runners ready", runners.ready),
        )
    };
    Progress {
        phase,
        runners,
        reason,
        message,
    }
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
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};

    fn test_object() -> LoadTest {
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
        let job = runners(&test, "trimtab-sidecar:1", "IfNotPresent");
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
        assert!(
            env.iter()
                .any(|e| e.name == "TRIMTAB_SHARDS" && e.value.as_deref() == Some("3"))
        );
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert!(owned_by(job.metadata.owner_references.as_ref(), &test));
        let text = &scenario(&test).expect("scenario").data.expect("data")[SCENARIO_KEY];
        let back: serde_json::Value = serde_json::from_str(text).expect("JSON");
        assert_eq!(back["spec"]["runners"]["parallelism"], 3);
    }

    #[test]
    fn the_phase_follows_the_job() {
        let mut job = Job::default();
        assert_eq!(progress(None, 3).phase, Phase::Pending);
        assert_eq!(progress(Some(&job), 3).phase, Phase::Starting);
        job.status = Some(JobStatus {
            active: Some(3),
            ready: Some(3),
            ..Default::default()
        });
        assert_eq!(progress(Some(&job), 3).phase, Phase::Running);
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
        let p = progress(Some(&job), 3);
        assert_eq!((p.phase, p.runners.finished), (Phase::Succeeded, 3));
        job.status = Some(JobStatus {
            failed: Some(1),
            conditions: Some(vec![done("Failed")]),
            ..Default::default()
        });
        let p = progress(Some(&job), 3);
        assert_eq!(p.phase, Phase::Failed);
        assert!(p.message.contains("1 runner(s) failed"), "{}", p.message);
        assert!(is_final(p.phase) && !is_final(Phase::Running));
    }
}
