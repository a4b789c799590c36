//! Everything a LoadTest needs to run for real but a container runtime: a test cluster
//! with the Job and garbage-collector controllers, the test node agent running runner
//! Pods as local `trimtab-bots` processes, and the operator, whose config server the
//! runners report to on loopback. Shared by the LoadTest e2e test and its benchmark.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use trimtab_api::{
    load_test::{LoadTest, Phase},
    runner_protocol::from_unix_micros,
};

use crate::{
    cluster::TestCluster,
    crds,
    node_agent::NodeAgent,
    operator_process::{OperatorProcess, ServingCert, free_addr},
};

/// The environment; dropping it stops everything.
#[derive(Debug)]
pub struct LoadTestEnv {
    /// The operator.
    pub operator: OperatorProcess,
    /// Its certificate (self-signed: also the CA runners trust).
    pub cert: ServingCert,
    /// `https://127.0.0.1:<port>`: where runners report.
    pub control_plane: String,
    /// The stand-in kubelet.
    pub agent: NodeAgent,
    /// The cluster (last: it outlives what talks to it).
    pub cluster: TestCluster,
}

impl LoadTestEnv {
    /// Starts it all, with `namespace` made for the tests; the node agent runs
    /// `trimtab-bots` as `runner` and keeps its directories under `work_dir`; the
    /// operator gets `operator_env` on top of its defaults.
    pub async fn start(
        namespace: &str,
        runner: &Path,
        work_dir: &Path,
        operator_env: &[(&str, &str)],
    ) -> Self {
        let mut cluster = TestCluster::start().await.expect("test cluster");
        crds::install(&cluster).await.expect("CRDs");
        for ns in [namespace, "trimtab"] {
            cluster.ensure_namespace(ns).await.expect("namespace");
        }
        cluster
            .start_controller_manager(&["job", "garbagecollector"])
            .expect("kube-controller-manager");
        let agent = NodeAgent::start(
            cluster.client(),
            "node-0",
            BTreeMap::from([("trimtab-bots".to_owned(), runner.to_path_buf())]),
            work_dir,
        )
        .await
        .expect("node agent");
        let cert = ServingCert::write(cluster.dir());
        let config_addr = free_addr();
        let control_plane = format!("https://127.0.0.1:{}", config_addr.port());
        let operator = OperatorProcess::start_with(
            &cluster,
            "trimtab",
            "operator-0",
            config_addr,
            Some(&cert),
            &[
                &[("TRIMTAB_CONTROL_PLANE_URL", control_plane.as_str())],
                operator_env,
            ]
            .concat(),
        )
        .await;
        Self {
            operator,
            cert,
            control_plane,
            agent,
            cluster,
        }
    }
}

impl LoadTestEnv {
    /// The report of `namespace/test`: `report.json` parsed, and `summary.txt`.
    pub async fn report(&self, namespace: &str, test: &str) -> (Value, String) {
        let map = Api::<ConfigMap>::namespaced(self.cluster.client(), namespace)
            .get(&format!("{test}-report"))
            .await
            .expect("the report ConfigMap");
        let data = map.data.expect("data");
        (
            serde_json::from_str(&data["report.json"]).expect("report.json"),
            data["summary.txt"].clone(),
        )
    }

    /// Creates (or updates) `test`, a LoadTest object, with server-side apply.
    pub async fn apply(&self, test: &Value) {
        let name = test["metadata"]["name"].as_str().expect("metadata.name");
        let namespace = test["metadata"]["namespace"]
            .as_str()
            .expect("metadata.namespace");
        Api::<LoadTest>::namespaced(self.cluster.client(), namespace)
            .patch(
                name,
                &PatchParams::apply("trimtab-tests"),
                &Patch::Apply(test),
            )
            .await
            .unwrap_or_else(|e| panic!("applying LoadTest {namespace}/{name}: {e}"));
    }

    /// Polls `namespace/name` every 250 ms until it is in `phase` (at most `limit`),
    /// calling `each` between polls; returns the test as it then was.
    pub async fn wait_for_phase(
        &self,
        namespace: &str,
        name: &str,
        phase: Phase,
        limit: Duration,
        mut each: impl FnMut(),
    ) -> LoadTest {
        let tests = Api::<LoadTest>::namespaced(self.cluster.client(), namespace);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let test = tests.get(name).await.expect("get load test");
            if test.status.as_ref().and_then(|s| s.phase) == Some(phase) {
                return test;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} not {phase:?} within {limit:?}: {:?}",
                test.status
            );
            each();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A LoadTest object `namespace/name` whose spec is `specs` merged in order (a later
/// top-level field replaces an earlier one): defaults first, then what a case sets.
pub fn load_test(namespace: &str, name: &str, specs: &[Value]) -> Value {
    let mut spec = serde_json::Map::new();
    for part in specs {
        if let Some(fields) = part.as_object() {
            spec.extend(fields.clone());
        }
    }
    json!({
        "apiVersion": "trimtab.dev/v1alpha1",
        "kind": "LoadTest",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// A scenario of one state that GETs `path` again and again, checking `check`, with a
/// constant `think` time.
pub fn looping(path: &str, check: &str, think: &str) -> Value {
    json!({
        "start": "get",
        "thinkTime": {"distribution": "constant", "mean": think},
        "states": [{
            "name": "get",
            "request": {"method": "GET", "path": path},
            "checks": [check],
            "next": [{"state": "get", "weight": 1}],
        }],
    })
}

/// When the guard aborted the test of `report` (`report.json`): the start every runner
/// was given plus the abort event's offset.
pub fn abort_time(report: &Value) -> SystemTime {
    let start = report["startAtUnixMicros"].as_u64().expect("start");
    let at = report["guardEvents"]
        .as_array()
        .and_then(|events| events.iter().find(|e| e["state"] == "aborted"))
        .and_then(|e| e["atSeconds"].as_f64())
        .expect("the abort event");
    from_unix_micros(start) + Duration::from_secs_f64(at)
}
