//! The test node agent against the real Job controller: kube-controller-manager makes
//! the Pods of an Indexed Job, the agent binds and runs them as local processes with
//! `JOB_COMPLETION_INDEX` resolved, and the Job completes — or fails when a process does.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use trimtab_tests::{cluster::TestCluster, node_agent::NodeAgent};

const NAMESPACE: &str = "jobs";

fn job(name: &str, script: &str, completions: u32) -> serde_json::Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "runner",
                    "image": "example.invalid/not-pulled",
                    "command": ["sh", "-c", script],
                    "env": [{"name": "TOTAL", "value": completions.to_string()}],
                }],
            }},
        },
    })
}

/// Waits until the Job has condition `kind` = True, or panics with its status.
async fn wait_for(jobs: &Api<Job>, name: &str, kind: &str) -> Job {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let job = jobs.get(name).await.expect("get job");
        let done = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"));
        if done {
            return job;
        }
        if tokio::time::Instant::now() >= deadline {
            let pods = Api::<Pod>::namespaced(jobs.clone().into_client(), NAMESPACE)
                .list(&Default::default())
                .await
                .expect("pods");
            let pods: Vec<_> = pods
                .items
                .iter()
                .map(|p| (&p.metadata.name, &p.status))
                .collect();
            panic!(
                "job {name} not {kind} within 90 s: {:?}\npods: {pods:#?}",
                job.status
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn indexed_jobs_run_as_local_processes_and_complete_or_fail() {
    let mut cluster = TestCluster::start().await.expect("test cluster");
    cluster
        .ensure_namespace(NAMESPACE)
        .await
        .expect("namespace");
    cluster
        .start_controller_manager(&["job", "garbagecollector"])
        .expect("kube-controller-manager");
    let work = tempfile::tempdir().expect("work dir");
    let agent = NodeAgent::start(cluster.client(), "node-0", BTreeMap::new(), work.path())
        .await
        .expect("node agent");
    let jobs = Api::<Job>::namespaced(cluster.client(), NAMESPACE);
    let apply = PatchParams::apply("node-agent-test");

    // Kubernetes expands $(TOTAL) in the command line; the shell expands the index.
    let script = "echo \"index=$JOB_COMPLETION_INDEX of $(TOTAL)\"";
    jobs.patch("ok", &apply, &Patch::Apply(&job("ok", script, 3)))
        .await
        .expect("create job ok");
    let done = wait_for(&jobs, "ok", "Complete").await;
    let status = done.status.expect("status");
    assert_eq!(status.succeeded, Some(3), "{status:?}");
    assert_eq!(status.completed_indexes.as_deref(), Some("0-2"));
    let pods = Api::<Pod>::namespaced(cluster.client(), NAMESPACE)
        .list(&Default::default())
        .await
        .expect("pods");
    let mut seen: Vec<String> = pods
        .items
        .iter()
        .filter(|p| {
            p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("ok-"))
        })
        .map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            assert_eq!(
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()),
                Some(agent.node())
            );
            agent.log(NAMESPACE, &name, "runner").trim().to_owned()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, ["index=0 of 3", "index=1 of 3", "index=2 of 3"]);

    // A runner that exits non-zero fails the Job (backoffLimit 0).
    jobs.patch(
        "broken",
        &apply,
        &Patch::Apply(&job("broken", "test \"$JOB_COMPLETION_INDEX\" != 1", 2)),
    )
    .await
    .expect("create job broken");
    let failed = wait_for(&jobs, "broken", "Failed").await;
    let status = failed.status.expect("status");
    assert_eq!(status.failed, Some(1), "{status:?}");
}
