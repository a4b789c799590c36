//! Two operator replicas against a real kube-apiserver: both keep a warm index, only the
//! Lease holder writes status, and the other takes over when the leader goes away.

use std::{collections::BTreeMap, time::Duration};

use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::events::Reporter,
};
use serde_json::json;
use trimtab_api::BalancerPolicy;
use trimtab_operator::{balancer_policy, index::PolicyIndex, leader::Leadership, metrics::Metrics};
use trimtab_tests::{cluster::TestCluster, crds};

const NS: &str = "trimtab-system";
const LEASE: Duration = Duration::from_secs(2);
const GRACE: Duration = Duration::from_secs(1);

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn the_second_replica_keeps_a_warm_index_and_takes_over_the_lease() {
    let cluster = TestCluster::start().await.expect("cluster starts");
    crds::install(&cluster).await.expect("CRDs install");
    cluster.ensure_namespace(NS).await.expect("namespace");
    let client = cluster.client();

    let replica = |name: &'static str, leadership: Leadership| {
        let index = PolicyIndex::default();
        let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
        let reporter = Reporter {
            controller: "trimtab-operator".into(),
            instance: Some(name.into()),
        };
        let task = tokio::spawn(balancer_policy::run(
            client.clone(),
            balancer_policy::Wiring::new(index.clone()),
            metrics.controller("balancerpolicy"),
            reporter,
            leadership,
        ));
        (index, task)
    };

    let a = Leadership::elect(client.clone(), NS, "replica-a", LEASE, GRACE)
        .await
        .expect("a competes");
    wait_until("replica a leads", async || a.is_leader()).await;
    let b = Leadership::elect(client.clone(), NS, "replica-b", LEASE, GRACE)
        .await
        .expect("b competes");
    let (index_a, task_a) = replica("replica-a", a.clone());
    let (index_b, _task_b) = replica("replica-b", b.clone());
    drop(a);

    let policies: Api<BalancerPolicy> = Api::namespaced(client.clone(), NS);
    let policy = |endpoints: &[&str]| {
        json!({
            "apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {"clients": {"podSelector": {}}, "listener": {"port": 15001}, "endpoints": endpoints},
        })
    };
    let object: BalancerPolicy =
        serde_json::from_value(policy(&["127.0.0.1:8080"])).expect("policy");
    policies
        .create(&PostParams::default(), &object)
        .await
        .expect("created");

    // Both replicas index the policy; the status is written (by the leader).
    let labels = BTreeMap::new();
    wait_until("both indexes hold the route", async || {
        index_a.config_for(NS, &labels).config.routes.len() == 1
            && index_b.config_for(NS, &labels).config.routes.len() == 1
    })
    .await;
    let active_endpoints = async || {
        let policy = policies.get("web").await.ok()?;
        policy.status?.active_endpoints
    };
    wait_until("the leader wrote the status", async || {
        active_endpoints().await == Some(1)
    })
    .await;
    assert!(!b.is_leader(), "only one replica leads");

    // The leader goes away (its task and with it its claim on the Lease).
    task_a.abort();
    wait_until("replica b leads", async || b.is_leader()).await;

    // The new leader writes status for a change made after the takeover.
    policies
        .patch(
            "web",
            &PatchParams::apply("test").force(),
            &Patch::Apply(policy(&["127.0.0.1:8080", "127.0.0.1:8081"])),
        )
        .await
        .expect("policy updated");
    wait_until("replica b wrote the new status", async || {
        active_endpoints().await == Some(2)
    })
    .await;
    assert_eq!(
        index_b.config_for(NS, &labels).config.routes[0]
            .endpoints
            .len(),
        2
    );
}
