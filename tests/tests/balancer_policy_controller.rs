//! The BalancerPolicy controller against a real kube-apiserver: Services, EndpointSlices
//! and Pods created by the test (there is no kubelet), the controller running in-process.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::events::Reporter,
};
use serde_json::json;
use trimtab_api::{
    BalancerPolicy,
    balancer_policy::{BalancerPolicyStatus, EndpointState},
};
use trimtab_operator::{balancer_policy, index::PolicyIndex, leader::Leadership, metrics::Metrics};
use trimtab_tests::{cluster::TestCluster, crds};

const NS: &str = "shop";

async fn create<K>(client: &Client, value: serde_json::Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("valid object");
    Api::<K>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &object)
        .await
        .expect("created")
}

async fn start() -> (TestCluster, Client, PolicyIndex) {
    let cluster = TestCluster::start().await.expect("cluster starts");
    crds::install(&cluster).await.expect("CRDs install");
    cluster.ensure_namespace(NS).await.expect("namespace");
    let client = cluster.client();
    let index = PolicyIndex::default();
    let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
    let reporter = Reporter {
        controller: "trimtab-operator".into(),
        instance: Some("test".into()),
    };
    tokio::spawn(balancer_policy::run(
        client.clone(),
        balancer_policy::Wiring::new(index.clone()),
        metrics.controller("balancerpolicy"),
        reporter,
        Leadership::always(),
    ));
    (cluster, client, index)
}

/// Polls the policy's status until `done` holds, or fails with the last status seen.
async fn wait_for_status(
    client: &Client,
    name: &str,
    done: impl Fn(&BalancerPolicyStatus) -> bool,
) -> BalancerPolicyStatus {
    let api = Api::<BalancerPolicy>::namespaced(client.clone(), NS);
    let mut last = None;
    for _ in 0..300 {
        if let Some(status) = api.get(name).await.expect("policy readable").status {
            if done(&status) {
                return status;
            }
            last = Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("status of {name} never reached the expected state; last: {last:#?}");
}

fn condition<'a>(status: &'a BalancerPolicyStatus, type_: &str) -> Option<(&'a str, &'a str)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

#[tokio::test]
async fn service_policy_publishes_ready_endpoints_and_follows_endpoint_slices() {
    let (_cluster, client, index) = start().await;
    create::<Service>(
        &client,
        json!({
            "metadata": {"name": "inventory"},
            "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": 9090}]},
        }),
    )
    .await;
    for (name, cpu) in [("inv-1", "500m"), ("inv-2", "1"), ("inv-3", "1")] {
        create::<Pod>(&client, json!({
            "metadata": {"name": name, "labels": {"app": "inventory"}},
            "spec": {"containers": [{"name": "app", "image": "inventory", "resources": {"requests": {"cpu": cpu}}}]},
        }))
        .await;
    }
    let slice = |inv3_ready: bool| {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "inventory-abc", "labels": {"kubernetes.io/service-name": "inventory"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "inv-1", "namespace": NS}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "inv-2", "namespace": NS}},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": inv3_ready}, "targetRef": {"kind": "Pod", "name": "inv-3", "namespace": NS}},
            ],
        })
    };
    create::<EndpointSlice>(&client, slice(false)).await;
    create::<BalancerPolicy>(
        &client,
        json!({
            "apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
            "metadata": {"name": "inventory"},
            "spec": {
                "clients": {"podSelector": {"matchLabels": {"app": "storefront"}}},
                "listener": {"port": 15001},
                "service": {"name": "inventory", "port": 8080},
                "algorithm": "cpuWeighted",
            },
        }),
    )
    .await;

    // No metrics-server in the test cluster: the policy is Ready with equal weights and
    // says it is Degraded because metrics are unavailable — it never zeroes the fleet.
    let status = wait_for_status(&client, "inventory", |s| {
        s.observed_generation == Some(1) && s.endpoints.len() == 3
    })
    .await;
    assert_eq!(
        condition(&status, "Ready"),
        Some(("True", "WeightsApplied")),
        "{status:#?}"
    );
    assert_eq!(
        condition(&status, "Degraded"),
        Some(("True", "MetricsUnavailable")),
        "{status:#?}"
    );
    assert_eq!(status.active_endpoints, Some(2));
    let by_address: BTreeMap<_, _> = status
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e))
        .collect();
    assert_eq!(by_address["10.1.0.3:9090"].state, EndpointState::Unhealthy);
    assert_eq!(by_address["10.1.0.3:9090"].weight, 0);
    assert_eq!(by_address["10.1.0.1:9090"].state, EndpointState::Active);
    assert!(by_address["10.1.0.1:9090"].weight > 0);
    assert_eq!(
        by_address["10.1.0.1:9090"].weight,
        by_address["10.1.0.2:9090"].weight
    );
    assert_eq!(by_address["10.1.0.1:9090"].pod.as_deref(), Some("inv-1"));
    let version = status
        .config_version
        .expect("a config version is published");

    // The index serves the route to matching client pods only.
    let storefront = BTreeMap::from([("app".to_owned(), "storefront".to_owned())]);
    let config = index.config_for(NS, &storefront).config;
    assert_eq!(config.routes.len(), 1);
    assert_eq!(config.routes[0].listener.port, 15001);
    assert_eq!(config.routes[0].endpoints.len(), 3);
    let other = BTreeMap::from([("app".to_owned(), "other".to_owned())]);
    assert!(index.config_for(NS, &other).config.routes.is_empty());
    assert!(
        index
            .config_for("elsewhere", &storefront)
            .config
            .routes
            .is_empty()
    );

    // An endpoint becoming ready is picked up from the EndpointSlice watch.
    Api::<EndpointSlice>::namespaced(client.clone(), NS)
        .patch(
            "inventory-abc",
            &PatchParams::apply("test").force(),
            &Patch::Apply(slice(true)),
        )
        .await
        .expect("slice updated");
    let status = wait_for_status(&client, "inventory", |s| s.active_endpoints == Some(3)).await;
    assert!(
        status.config_version.expect("version") > version,
        "config version only increases"
    );
    assert_eq!(
        index.config_for(NS, &storefront).config.routes[0]
            .endpoints
            .iter()
            .filter(|e| e.weight > 0)
            .count(),
        3
    );

    // Deleting the policy withdraws its route.
    Api::<BalancerPolicy>::namespaced(client.clone(), NS)
        .delete("inventory", &DeleteParams::default())
        .await
        .expect("deleted");
    for _ in 0..100 {
        if index.config_for(NS, &storefront).config.routes.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the deleted policy's route is still served");
}

#[tokio::test]
async fn policy_over_a_missing_service_is_not_ready_and_names_it() {
    let (_cluster, client, index) = start().await;
    create::<BalancerPolicy>(&client, json!({
        "apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
        "metadata": {"name": "ghost"},
        "spec": {"clients": {"podSelector": {}}, "listener": {"port": 15002}, "service": {"name": "ghost", "port": 80}},
    }))
    .await;
    let status = wait_for_status(&client, "ghost", |s| s.observed_generation == Some(1)).await;
    assert_eq!(
        condition(&status, "Ready"),
        Some(("False", "ServiceNotFound")),
        "{status:#?}"
    );
    let message = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready")
        .message;
    assert!(
        message.contains("Service shop/ghost not found"),
        "{message}"
    );
    assert!(
        index
            .config_for(NS, &BTreeMap::new())
            .config
            .routes
            .is_empty()
    );
}

#[tokio::test]
async fn cpu_from_a_real_prometheus_sets_the_weights_and_follows_a_change() {
    use trimtab_tests::prometheus_server::{CpuExporter, Prometheus};

    let (exporter, exporter_addr) = CpuExporter::start().await.expect("exporter starts");
    // Two backends with equal CPU requests; inv-b burns four times the CPU of inv-a.
    exporter.set_cores(NS, "inv-a", 0.2);
    exporter.set_cores(NS, "inv-b", 0.8);
    let prometheus = Prometheus::start(exporter_addr)
        .await
        .expect("prometheus starts");

    let (_cluster, client, _index) = start().await;
    create::<Service>(
        &client,
        json!({
            "metadata": {"name": "inventory"},
            "spec": {"ports": [{"name": "http", "port": 8080}]},
        }),
    )
    .await;
    for name in ["inv-a", "inv-b"] {
        create::<Pod>(&client, json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "app", "image": "inventory", "resources": {"requests": {"cpu": "1"}}}]},
        }))
        .await;
    }
    create::<EndpointSlice>(&client, json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "inventory-1", "labels": {"kubernetes.io/service-name": "inventory"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": ["10.1.0.1"], "targetRef": {"kind": "Pod", "name": "inv-a", "namespace": NS}},
            {"addresses": ["10.1.0.2"], "targetRef": {"kind": "Pod", "name": "inv-b", "namespace": NS}},
        ],
    }))
    .await;
    create::<BalancerPolicy>(&client, json!({
        "apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
        "metadata": {"name": "inventory"},
        "spec": {
            "clients": {"podSelector": {}},
            "listener": {"port": 15001},
            "service": {"name": "inventory", "port": 8080},
            "algorithm": "cpuWeighted",
            "weighting": {
                "source": "prometheus",
                "prometheus": {
                    "url": prometheus.url(),
                    "query": "sum by (pod) (rate(container_cpu_usage_seconds_total{namespace=\"$namespace\",container!=\"\"}[5s]))",
                },
                "interval": "1s",
                "smoothing": 1.0,
                "maxStepChange": 10,
                "maxLoad": 0.9,
                "criticalLoad": 0.98,
            },
        },
    }))
    .await;

    let weight = |s: &BalancerPolicyStatus, pod: &str| {
        s.endpoints
            .iter()
            .find(|e| e.pod.as_deref() == Some(pod))
            .map(|e| (e.weight, e.utilization))
    };
    // The busier pod gets the smaller weight, from CPU the controller read through
    // Prometheus (usage ÷ requests).
    let status = wait_for_status(&client, "inventory", |s| {
        matches!((weight(s, "inv-a"), weight(s, "inv-b")), (Some((a, Some(_))), Some((b, Some(_)))) if a > 2 * b)
    })
    .await;
    assert_eq!(
        condition(&status, "Degraded"),
        Some(("False", "AsExpected")),
        "{status:#?}"
    );
    // Utilization is usage ÷ requests (both request 1 core); a 5s rate that has just
    // started is approximate, so compare the two rather than pin values.
    let utilization = |pod| {
        weight(&status, pod)
            .and_then(|(_, u)| u)
            .expect("utilization")
    };
    let (a, b) = (utilization("inv-a"), utilization("inv-b"));
    assert!(b > 2.0 * a && b <= 1.0, "utilizations inv-a {a}, inv-b {b}");

    // inv-b calms down: its weight climbs past inv-a's.
    exporter.set_cores(NS, "inv-b", 0.05);
    let status = wait_for_status(&client, "inventory", |s| {
        matches!((weight(s, "inv-a"), weight(s, "inv-b")), (Some((a, _)), Some((b, _))) if b > a)
    })
    .await;
    assert!(status.balance_score.is_some(), "{status:#?}");
}

/// The API key of provider `name` in the config a pod of `namespace` with `labels` gets.
fn provider_key(index: &PolicyIndex, namespace: &str, name: &str) -> Option<String> {
    let labels = BTreeMap::from([("app".to_owned(), "assistant".to_owned())]);
    index
        .config_for(namespace, &labels)
        .config
        .routes
        .iter()
        .filter_map(|r| r.llm.as_ref())
        .flat_map(|l| &l.providers)
        .find(|p| p.provider.name == name)
        .and_then(|p| p.secret_key.as_ref().map(|k| k.expose().to_owned()))
}

#[tokio::test]
async fn llm_provider_policies_carry_keys_from_their_own_namespace_and_follow_rotation() {
    let (cluster, client, index) = start().await;
    cluster
        .ensure_namespace("elsewhere")
        .await
        .expect("namespace");
    let secret = |namespace: &str, openai: &str| {
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
            "metadata": {"name": "llm-keys", "namespace": namespace},
            "stringData": {"openai": format!("{openai}\n")},
        }))
        .expect("a Secret");
        secret
    };
    let secrets = |namespace: &str| {
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), namespace)
    };
    secrets(NS)
        .create(&PostParams::default(), &secret(NS, "sk-shop-1"))
        .await
        .expect("Secret");
    // Another namespace's Secret of the same name is never what a policy reads.
    secrets("elsewhere")
        .create(&PostParams::default(), &secret("elsewhere", "sk-elsewhere"))
        .await
        .expect("Secret");
    let provider = |name: &str, kind: &str, secret: &str| {
        json!({"name": name, "type": kind, "baseUrl": "http://127.0.0.1:9", "model": "m",
               "contextWindow": 8192, "apiKey": {"secretKeyRef": {"name": secret, "key": name}}})
    };
    create::<BalancerPolicy>(
        &client,
        json!({
            "apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
            "metadata": {"name": "llm"},
            "spec": {
                "clients": {"podSelector": {"matchLabels": {"app": "assistant"}}},
                "listener": {"port": 15100, "protocol": "openai"},
                "providers": [provider("openai", "openai", "llm-keys"),
                              provider("anthropic", "anthropic", "no-such-secret")],
            },
        }),
    )
    .await;
    let status = wait_for_status(&client, "llm", |s| s.observed_generation == Some(1)).await;
    assert_eq!(
        condition(&status, "Ready"),
        Some(("True", "ProvidersPublished")),
        "{status:#?}"
    );
    assert_eq!(
        condition(&status, "Degraded"),
        Some(("True", "SecretUnavailable"))
    );
    let degraded = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded")
        .message;
    assert_eq!(
        degraded,
        "spec.providers[1].apiKey.secretKeyRef: Secret shop/no-such-secret not found"
    );
    assert!(!format!("{status:?}").contains("sk-"), "no key in status");
    assert_eq!(
        provider_key(&index, NS, "openai").as_deref(),
        Some("sk-shop-1")
    );
    assert_eq!(provider_key(&index, NS, "anthropic"), None);
    assert_eq!(provider_key(&index, "elsewhere", "openai"), None);

    // A rotated key reaches the published route within one recheck.
    secrets(NS)
        .replace("llm-keys", &PostParams::default(), &secret(NS, "sk-shop-2"))
        .await
        .expect("rotated");
    let rotated = tokio::time::Instant::now();
    let limit = balancer_policy::provider_keys::RECHECK + Duration::from_secs(5);
    while provider_key(&index, NS, "openai").as_deref() != Some("sk-shop-2") {
        assert!(
            rotated.elapsed() < limit,
            "the rotated key was not published"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("rotated key published after {:?}", rotated.elapsed());
}
