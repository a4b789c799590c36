//! Sidecar injection end to end: the real kube-apiserver calls the real
//! `trimtab-operator`'s webhook over TLS, with a certificate the operator made itself
//! (its own CA, in the TLS Secret) and a caBundle it wrote into the webhook
//! configuration. An opted-in pod comes back with the sidecar, its token and the CA;
//! a second admission changes nothing; other pods are untouched; a bad override is
//! refused by name; with the operator gone, `Ignore` admits pods and `Fail` refuses
//! them naming the webhook. A second replica serves the same certificate.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Pod, Secret},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use trimtab_tests::{
    cluster::TestCluster,
    crds,
    operator_process::{OperatorProcess, free_addr},
};

/// The operator's namespace (its Lease and TLS Secret).
const OPERATOR_NS: &str = "trimtab-system";
/// Where the test's pods go.
const APP_NS: &str = "shop";
const TLS_SECRET: &str = "trimtab-operator-tls";
const CONFIGURATION: &str = "trimtab-sidecar-injector";
const WEBHOOK: &str = "pods.inject.trimtab.dev";
const SIDECAR_IMAGE: &str = "registry.example/trimtab-sidecar:test";
const WAIT: Duration = Duration::from_secs(60);

/// A `trimtab-operator` started as the chart starts it, but on loopback: its certificate
/// from the TLS Secret, with 127.0.0.1 among its names for the `url:` webhook.
async fn start_operator(cluster: &TestCluster, instance: &str) -> OperatorProcess {
    OperatorProcess::start_with(
        cluster,
        OPERATOR_NS,
        instance,
        free_addr(),
        None,
        &[
            ("TRIMTAB_TLS_SECRET", TLS_SECRET),
            ("TRIMTAB_TLS_EXTRA_SANS", "127.0.0.1,localhost"),
            ("TRIMTAB_WEBHOOK_CONFIGURATION", CONFIGURATION),
            ("TRIMTAB_CA_BUNDLE_CHECK_INTERVAL", "1s"),
            ("TRIMTAB_SIDECAR_IMAGE", SIDECAR_IMAGE),
            ("TRIMTAB_SIDECAR_IMAGE_PULL_POLICY", "Never"),
            (
                "TRIMTAB_SIDECAR_RESOURCES",
                r#"{"requests":{"cpu":"50m","memory":"64Mi"},"limits":{"memory":"256Mi"}}"#,
            ),
            ("TRIMTAB_SIDECAR_LOG", "info"),
        ],
    )
    .await
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, mut done: F) {
    let deadline = Instant::now() + WAIT;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leaf certificate `addr` presents, after verifying it for 127.0.0.1 against
/// `ca_pem` as the API server does.
async fn served_certificate(addr: SocketAddr, ca_pem: String) -> Vec<u8> {
    tokio::task::spawn_blocking(move || {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(certificate.expect("CA PEM")).expect("CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let mut connection =
            rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
        let mut socket = std::net::TcpStream::connect(addr).expect("connect");
        while connection.is_handshaking() {
            connection
                .complete_io(&mut socket)
                .expect("the served certificate verifies against the Secret's CA");
        }
        connection.peer_certificates().expect("certificates")[0].to_vec()
    })
    .await
    .expect("handshake task")
}

fn pem_der(pem: &[u8]) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem)
        .expect("a PEM certificate")
        .to_vec()
}

fn webhook_configuration(port: u16, failure_policy: &str) -> MutatingWebhookConfiguration {
    // The chart's first webhook, with a `url:` client config on loopback and no caBundle:
    // the operator must write it.
    serde_json::from_value(json!({
        "metadata": {"name": CONFIGURATION},
        "webhooks": [{
            "name": WEBHOOK,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure_policy,
            "timeoutSeconds": 10,
            "reinvocationPolicy": "Never",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate-pods")},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name",
                "operator": "NotIn", "values": ["kube-system", OPERATOR_NS]}]},
            "matchConditions": [{
                "name": "annotated-inject-true",
                "expression": "has(object.metadata.annotations) && 'trimtab.dev/inject' in object.metadata.annotations && object.metadata.annotations['trimtab.dev/inject'] == 'true'"
            }]
        }]
    }))
    .expect("webhook configuration")
}

fn pod(name: &str, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "shop:1"}]}
    }))
    .expect("pod")
}

fn api_message(result: Result<Pod, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) => status.message,
        other => panic!("expected the API server to refuse the pod, got {other:?}"),
    }
}

#[tokio::test]
async fn the_api_server_injects_through_the_operators_webhook_and_its_own_certificates() {
    let cluster = TestCluster::start().await.expect("test cluster starts");
    let client = cluster.client();
    crds::install(&cluster).await.expect("Trimtab CRDs");
    for ns in [OPERATOR_NS, APP_NS] {
        cluster.ensure_namespace(ns).await.expect("namespace");
    }
    let secrets = Api::<Secret>::namespaced(client.clone(), OPERATOR_NS);
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let pods = Api::<Pod>::namespaced(client.clone(), APP_NS);

    // The port is known before the operator starts, so the configuration can exist first,
    // without a caBundle: until the operator writes one, the API server cannot trust it.
    let first = start_operator(&cluster, "operator-0").await;
    configurations
        .create(
            &PostParams::default(),
            &webhook_configuration(first.config_addr.port(), "Fail"),
        )
        .await
        .expect("webhook configuration");

    // The operator made its Secret: a CA and a serving certificate it signs.
    let secret = secrets
        .get(TLS_SECRET)
        .await
        .expect("the operator created its TLS Secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.clone().expect("data");
    for key in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        assert!(data.get(key).is_some_and(|v| !v.0.is_empty()), "{key}");
    }
    let ca_pem = String::from_utf8(data["ca.crt"].0.clone()).expect("PEM");
    assert_eq!(
        served_certificate(first.config_addr, ca_pem.clone()).await,
        pem_der(&data["tls.crt"].0),
        "the operator serves the certificate of its Secret"
    );

    // The leader writes the CA into the caBundle.
    wait_until("the operator writes the webhook's caBundle", async || {
        configurations
            .get(CONFIGURATION)
            .await
            .ok()
            .and_then(|c| c.webhooks)
            .is_some_and(|hooks| {
                hooks.iter().all(|h| {
                    h.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice())
                        == Some(ca_pem.as_bytes())
                })
            })
    })
    .await;

    // An opted-in pod comes back with the sidecar, its token and the CA.
    let created = pods
        .create(
            &PostParams::default(),
            &pod("web", json!({"trimtab.dev/inject": "true"})),
        )
        .await
        .unwrap_or_else(|e| panic!("pod created: {e}; log:\n{}", first.log_text()));
    let spec = created.spec.clone().expect("spec");
    let init = spec
        .init_containers
        .clone()
        .expect("the sidecar was injected");
    assert_eq!(init.len(), 1);
    let sidecar = &init[0];
    assert_eq!(sidecar.name, "trimtab-sidecar");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(sidecar.image.as_deref(), Some(SIDECAR_IMAGE));
    assert_eq!(sidecar.image_pull_policy.as_deref(), Some("Never"));
    let env = sidecar.env.clone().expect("env");
    assert!(
        env.iter().any(|e| e.name == "TRIMTAB_CONTROL_PLANE_CA_PEM"
            && e.value.as_deref() == Some(ca_pem.as_str())),
        "the sidecar trusts the operator's CA: {env:?}"
    );
    let args = sidecar.args.clone().expect("args");
    assert_eq!(
        args[..2],
        [
            "--control-plane".to_owned(),
            format!(
                "https://trimtab-operator.{OPERATOR_NS}.svc:{}",
                first.config_addr.port()
            )
        ]
    );
    let token = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "trimtab-token")
        .and_then(|v| v.projected.clone())
        .and_then(|p| p.sources)
        .and_then(|s| s.into_iter().find_map(|s| s.service_account_token))
        .expect("a projected service-account token volume");
    assert_eq!(token.audience.as_deref(), Some("trimtab"));
    assert_eq!(token.expiration_seconds, Some(3600));
    assert_eq!(
        created.metadata.annotations.as_ref().expect("annotations")["trimtab.dev/injected"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(spec.containers.len(), 1, "the application is untouched");

    // A second admission of that pod (a server-side dry run of the object the API server
    // returned, under another name) changes nothing.
    let mut again = created.clone();
    again.metadata = kube::api::ObjectMeta {
        name: Some("web-again".into()),
        annotations: created.metadata.annotations.clone(),
        ..Default::default()
    };
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let readmitted = pods.create(&dry_run, &again).await.expect("dry run");
    assert_eq!(
        readmitted
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.clone()),
        Some(init.clone()),
        "no second sidecar"
    );
    assert_eq!(
        readmitted.spec.as_ref().and_then(|s| s.volumes.clone()),
        spec.volumes,
        "no second token volume"
    );

    // A pod that did not ask is untouched.
    let plain = pods
        .create(&PostParams::default(), &pod("plain", json!({})))
        .await
        .expect("plain pod");
    assert!(plain.spec.expect("spec").init_containers.is_none());
    assert!(
        !plain
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("trimtab.dev/injected")
    );

    // A bad override is refused, naming the annotation and the value.
    let message = api_message(
        pods.create(
            &PostParams::default(),
            &pod(
                "greedy",
                json!({"trimtab.dev/inject": "true", "trimtab.dev/sidecar-memory-limit": "lots"}),
            ),
        )
        .await,
    );
    assert!(
        message.contains("trimtab.dev/sidecar-memory-limit") && message.contains("\"lots\""),
        "{message}"
    );

    // A second replica started later reads the Secret and serves the same certificate.
    let second = start_operator(&cluster, "operator-1").await;
    assert_eq!(
        served_certificate(second.config_addr, ca_pem.clone()).await,
        pem_der(&data["tls.crt"].0),
        "both replicas serve one certificate; log:\n{}",
        second.log_text()
    );
    assert_eq!(
        secrets
            .get(TLS_SECRET)
            .await
            .expect("secret")
            .data
            .expect("data")["ca.crt"],
        data["ca.crt"],
        "the second replica kept the CA"
    );

    // With the operator gone, failurePolicy decides.
    first.kill().await;
    second.kill().await;
    let message = api_message(
        pods.create(
            &PostParams::default(),
            &pod("while-down", json!({"trimtab.dev/inject": "true"})),
        )
        .await,
    );
    assert!(
        message.contains(WEBHOOK),
        "failurePolicy Fail refuses the pod naming the webhook: {message}"
    );
    configurations
        .patch(
            CONFIGURATION,
            &PatchParams::default(),
            &Patch::Strategic(json!({"webhooks": [{"name": WEBHOOK, "failurePolicy": "Ignore"}]})),
        )
        .await
        .expect("failurePolicy Ignore");
    let admitted = pods
        .create(
            &PostParams::default(),
            &pod("while-down", json!({"trimtab.dev/inject": "true"})),
        )
        .await
        .expect("failurePolicy Ignore admits the pod");
    assert!(
        admitted.spec.expect("spec").init_containers.is_none(),
        "admitted without the sidecar"
    );
}
