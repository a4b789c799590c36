//! The LoadTest controller end to end: the real operator process makes the scenario
//! ConfigMap and the Indexed Job, the real Job controller (kube-controller-manager)
//! makes the Pods, the test node agent runs them as `trimtab-bots` processes against the
//! shop example on loopback, and the test's status follows to Succeeded — or to Failed
//! when a runner refuses a broken scenario.

use std::{collections::BTreeMap, process::Stdio, time::Duration};

use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{ConfigMap, Event},
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;
use trimtab_api::load_test::{LoadTest, Phase};
use trimtab_tests::{
    cluster::TestCluster,
    crds,
    node_agent::NodeAgent,
    operator_process::{OperatorProcess, ServingCert, free_addr, workspace_binary},
};

const NAMESPACE: &str = "load";

fn load_test(name: &str, target: &str, check: &str) -> serde_json::Value {
    json!({
        "apiVersion": "trimtab.dev/v1alpha1",
        "kind": "LoadTest",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "target": {"url": target},
            "workload": {"users": 4, "duration": "2s"},
            "runners": {"parallelism": 2, "image": "example.invalid/trimtab-sidecar:test"},
            "scenario": {
                "start": "health",
                "thinkTime": {"distribution": "constant", "mean": "100ms"},
                "states": [{
                    "name": "health",
                    "request": {"method": "GET", "path": "/healthz"},
                    "checks": [check],
                    "next": [{"state": "health", "weight": 1}],
                }],
            },
        },
    })
}

async fn wait_for_phase(tests: &Api<LoadTest>, name: &str, phase: Phase) -> LoadTest {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let test = tests.get(name).await.expect("get load test");
        let now = test.status.as_ref().and_then(|s| s.phase);
        if now == Some(phase) {
            return test;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} not {phase:?} within 120 s: {:?}",
            test.status
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_load_test_runs_its_runners_as_an_indexed_job_to_succeeded_or_failed() {
    let mut cluster = TestCluster::start().await.expect("test cluster");
    crds::install(&cluster).await.expect("CRDs");
    cluster
        .ensure_namespace(NAMESPACE)
        .await
        .expect("namespace");
    cluster
        .ensure_namespace("trimtab")
        .await
        .expect("namespace");
    cluster
        .start_controller_manager(&["job", "garbagecollector"])
        .expect("kube-controller-manager");

    let shop_addr = free_addr();
    let _shop = tokio::process::Command::new(workspace_binary("shop", "shop").expect("shop"))
        .arg(format!("--listen={shop_addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("shop starts");
    let bots = workspace_binary("trimtab-sidecar", "trimtab-bots").expect("trimtab-bots");
    let work = tempfile::tempdir().expect("work dir");
    let agent = NodeAgent::start(
        cluster.client(),
        "node-0",
        BTreeMap::from([("trimtab-bots".to_owned(), bots)]),
        work.path(),
    )
    .await
    .expect("node agent");
    let cert = ServingCert::write(cluster.dir());
    let operator =
        OperatorProcess::start(&cluster, "trimtab", "operator-0", free_addr(), &cert).await;

    let tests = Api::<LoadTest>::namespaced(cluster.client(), NAMESPACE);
    let apply = PatchParams::apply("load-test-e2e");
    let target = format!("http://{shop_addr}");
    tests
        .patch(
            "health",
            &apply,
            &Patch::Apply(&load_test("health", &target, "response.status == 200")),
        )
        .await
        .expect("create load test");
    let done = wait_for_phase(&tests, "health", Phase::Succeeded).await;
    let status = done.status.expect("status");
    let runners = status.runners.expect("runner counts");
    assert_eq!((runners.finished, runners.failed), (2, 0), "{runners:?}");
    assert!(status.start_time.is_some() && status.completion_time.is_some());
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Succeeded" && c.reason == "RunnersSucceeded"),
        "{:?}",
        status.conditions
    );
    // Each runner ran its own shard against the shop: both logs show requests.
    let pods = agent_pods(&agent, work.path(), "health-runners-");
    assert_eq!(pods.len(), 2, "{pods:?}");
    for log in &pods {
        assert!(log.contains("health"), "a runner's output:\n{log}");
    }
    // cleanup: onSuccess (the default) deletes the Job; the scenario stays.
    let jobs = Api::<Job>::namespaced(cluster.client(), NAMESPACE);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while jobs.get_opt("health-runners").await.expect("job").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Job was not cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let scenario = Api::<ConfigMap>::namespaced(cluster.client(), NAMESPACE)
        .get("health-scenario")
        .await
        .expect("the scenario ConfigMap stays");
    assert!(scenario.data.expect("data")["loadtest.yaml"].contains("/healthz"));

    // A scenario the runners refuse (a CEL check that does not compile) fails the test.
    tests
        .patch(
            "broken",
            &apply,
            &Patch::Apply(&load_test("broken", &target, "response.status ==")),
        )
        .await
        .expect("create broken load test");
    let failed = wait_for_phase(&tests, "broken", Phase::Failed).await;
    let status = failed.status.expect("status");
    assert!(status.runners.expect("runners").failed >= 1);
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Failed" && c.reason == "RunnerFailed"),
        "{:?}",
        status.conditions
    );
    // onSuccess keeps a failed test's runners for inspection.
    assert!(jobs.get_opt("broken-runners").await.expect("job").is_some());
    let events = Api::<Event>::namespaced(cluster.client(), NAMESPACE)
        .list(&ListParams::default())
        .await
        .expect("events");
    let reasons: Vec<_> = events
        .items
        .iter()
        .filter(|e| e.involved_object.name.as_deref() == Some("broken"))
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(
        reasons.iter().any(|r| r == "RunnerFailed"),
        "events of broken: {reasons:?}\noperator log:\n{}",
        operator.log_text()
    );
}

/// The runner logs of the Pods whose names start with `prefix`.
fn agent_pods(agent: &NodeAgent, work: &std::path::Path, prefix: &str) -> Vec<String> {
    let mut logs = Vec::new();
    for entry in std::fs::read_dir(work).expect("work dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pod) = name
            .strip_prefix(&format!("{NAMESPACE}_"))
            .and_then(|rest| rest.strip_suffix("_runner.log"))
        else {
            continue;
        };
        if pod.starts_with(prefix) {
            logs.push(agent.log(NAMESPACE, pod, "runner"));
        }
    }
    logs
}
