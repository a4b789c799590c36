//! Everything a LoadTest needs to run for real but a container runtime: a test cluster
//! with the Job and garbage-collector controllers, the test node agent running runner
//! Pods as local `trimtab-bots` processes, and the operator, whose config server the
//! runners report to on loopback. Shared by the LoadTest e2e test and its benchmark.

use std::{collections::BTreeMap, path::Path};

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
