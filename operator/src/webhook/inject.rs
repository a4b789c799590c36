//! The injection decision and the patch, as a pure function of the pod, its namespace
//! and the operator's settings: no I/O, so every case is a unit test.
//!
//! The sidecar goes in as a *native sidecar* (KEP-753: an init container with
//! `restartPolicy: Always`), first among the init containers, so it is started before
//! the other init containers and the application, and stopped after them.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use k8s_openapi::api::core::v1::{Pod, ResourceRequirements};
use serde_json::{Value, json};

use super::overrides::{self, OverrideError};

/// The injected container's name; its presence marks a pod as injected.
pub const SIDECAR_CONTAINER: &str = "trimtab-sidecar";
/// Set on every injected pod, to the operator's version.
pub const INJECTED_ANNOTATION: &str = "trimtab.dev/injected";
/// The opt-in (and, with `"false"`, opt-out) annotation the webhook's match conditions read.
pub const INJECT_ANNOTATION: &str = "trimtab.dev/inject";
/// The projected token volume, mounted only into the sidecar.
pub const TOKEN_VOLUME: &str = "trimtab-token";
/// Where the token volume is mounted (the sidecar's `--token-file` directory).
pub const TOKEN_DIR: &str = "/var/run/secrets/trimtab";
/// The scratch volume where the sidecar keeps its last good config (fail static across
/// a sidecar restart: an emptyDir outlives the container). In memory, as the kubelet
/// mounts Secrets: the config can hold LLM providers' API keys, which must not land on
/// the node's disk.
pub const STATE_VOLUME: &str = "trimtab-state";
/// Where the state volume is mounted (`--state-dir`).
pub const STATE_DIR: &str = "/var/run/trimtab";
/// The environment variable carrying the control plane's CA, as PEM (Linkerd passes its
/// trust anchors the same way: no Secret or ConfigMap to copy into every namespace).
pub const CA_PEM_ENV: &str = "TRIMTAB_CONTROL_PLANE_CA_PEM";
/// Lifetime of the projected token; the kubelet renews it at 80 %.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Namespaces never injected, whatever the webhook's selectors say.
pub const PROTECTED_NAMESPACES: [&str; 1] = ["kube-system"];

/// What the injector puts into pods.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectionSettings {
    /// The sidecar image.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: String,
    /// Default requests and limits.
    pub resources: ResourceRequirements,
    /// Default `TRIMTAB_LOG_LEVEL`.
    pub log_level: String,
    /// The config server's URL as pods reach it (`https://<svc>.<ns>.svc:<port>`).
    pub control_plane_url: String,
    /// The CA that signs the config server's certificate, as PEM.
    pub ca_pem: String,
    /// The audience of the projected token (what the config server's TokenReview asks for).
    pub token_audience: String,
    /// The sidecar's admin port (`/live`, `/ready`, `/metrics`).
    pub admin_port: u16,
    /// Written to [`INJECTED_ANNOTATION`].
    pub version: String,
    /// Namespaces refused besides [`PROTECTED_NAMESPACES`] (the operator's own: it must
    /// never wait for itself).
    pub excluded_namespaces: Vec<String>,
}

/// Why a pod is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// kube-system or the operator's namespace.
    ProtectedNamespace(String),
    /// Host-network pods share the node's network namespace: a sidecar there would bind
    /// the node's ports.
    HostNetwork,
    /// Already carries the sidecar or the injected annotation.
    AlreadyInjected,
    /// Annotated `trimtab.dev/inject: "false"`.
    OptedOut,
}

impl Skip {
    /// A short reason, for logs and the `reason` metric label.
    pub fn reason(&self) -> String {
        match self {
            Self::ProtectedNamespace(ns) => format!("namespace {ns} is never injected"),
            Self::HostNetwork => "host-network pods are never injected".into(),
            Self::AlreadyInjected => format!("already injected ({SIDECAR_CONTAINER} present)"),
            Self::OptedOut => format!("annotated {INJECT_ANNOTATION}: \"false\""),
        }
    }
}

/// The injector's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Admit unchanged.
    Skip(Skip),
    /// Admit with this patch.
    Inject(Patch),
}

/// Why a pod is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// A bad override annotation.
    #[error(transparent)]
    Override(#[from] OverrideError),
    /// The pod already uses a name the sidecar needs.
    #[error("{what} {name:?} already exists in the pod; it is reserved for the Trimtab sidecar")]
    NameTaken {
        /// `volume` and the like.
        what: &'static str,
        /// The name.
        name: &'static str,
    },
}

/// Decides whether `pod`, being created in `namespace`, gets the sidecar, and builds the
/// JSON patch that adds it.
pub fn decide(
    pod: &Pod,
    namespace: &str,
    settings: &InjectionSettings,
) -> Result<Decision, Denial> {
    if PROTECTED_NAMESPACES.contains(&namespace)
        || settings.excluded_namespaces.iter().any(|n| n == namespace)
    {
        return Ok(Decision::Skip(Skip::ProtectedNamespace(
            namespace.to_owned(),
        )));
    }
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Ok(Decision::Skip(Skip::HostNetwork));
    }
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let has_sidecar = spec.is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_CONTAINER)
    });
    if has_sidecar || annotations.contains_key(INJECTED_ANNOTATION) {
        return Ok(Decision::Skip(Skip::AlreadyInjected));
    }
    if annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("false") {
        return Ok(Decision::Skip(Skip::OptedOut));
    }
    let effective = overrides::apply(
        annotations,
        &settings.image,
        &settings.resources,
        &settings.log_level,
    )?;
    let volumes = spec.and_then(|s| s.volumes.as_ref());
    for name in [TOKEN_VOLUME, STATE_VOLUME] {
        if volumes.is_some_and(|v| v.iter().any(|v| v.name == name)) {
            return Err(Denial::NameTaken {
                what: "volume",
                name,
            });
        }
    }

    let mut patch = Vec::new();
    let pointer = |tokens: &[&str]| PointerBuf::from_tokens(tokens.iter().copied());
    // An absent map or list is added whole; a present one is added to, so nothing the
    // pod already has is replaced.
    if pod.metadata.annotations.is_none() {
        patch.push(add(
            pointer(&["metadata", "annotations"]),
            json!({ INJECTED_ANNOTATION: settings.version }),
        ));
    } else {
        patch.push(add(
            pointer(&["metadata", "annotations", INJECTED_ANNOTATION]),
            json!(settings.version),
        ));
    }
    let sidecar = sidecar_container(settings, &effective);
    if spec.and_then(|s| s.init_containers.as_ref()).is_none() {
        patch.push(add(pointer(&["spec", "initContainers"]), json!([sidecar])));
    } else {
        // Index 0, not `-`: init containers start in order, the proxy first.
        patch.push(add(pointer(&["spec", "initContainers", "0"]), sidecar));
    }
    let new_volumes = [token_volume(settings), state_volume()];
    if volumes.is_none() {
        patch.push(add(pointer(&["spec", "volumes"]), json!(new_volumes)));
    } else {
        for volume in new_volumes {
            patch.push(add(pointer(&["spec", "volumes", "-"]), volume));
        }
    }
    Ok(Decision::Inject(Patch(patch)))
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

fn sidecar_container(settings: &InjectionSettings, effective: &overrides::Effective) -> Value {
    let port = settings.admin_port;
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": port, "scheme": "HTTP"},
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        })
    };
    json!({
        "name": SIDECAR_CONTAINER,
        "image": effective.image,
        "imagePullPolicy": settings.image_pull_policy,
        // A native sidecar: runs for the pod's lifetime, restarted when it exits.
        "restartPolicy": "Always",
        "args": [
            "--control-plane", settings.control_plane_url,
            "--token-file", format!("{TOKEN_DIR}/token"),
            "--state-dir", STATE_DIR,
            "--admin-port", port.to_string(),
        ],
        "env": [
            {"name": CA_PEM_ENV, "value": settings.ca_pem},
            {"name": "TRIMTAB_LOG_LEVEL", "value": effective.log_level},
        ],
        "ports": [{"name": "trimtab-admin", "containerPort": port, "protocol": "TCP"}],
        // Startup and liveness: the process answers. Readiness: a config is loaded (the
        // application's outbound listeners exist). Startup does not wait for a config,
        // so the application still starts while the operator is unreachable.
        "startupProbe": probe("/live", 1, 30),
        "livenessProbe": probe("/live", 10, 3),
        "readinessProbe": probe("/ready", 5, 3),
        "resources": effective.resources,
        // The `restricted` Pod Security Standard; 65532 is the image's `nonroot` user.
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
        ],
    })
}

fn token_volume(settings: &InjectionSettings) -> Value {
    json!({
        "name": TOKEN_VOLUME,
        "projected": {
            // World-readable inside the volume, which only the sidecar mounts: the
            // sidecar's user then reads it whatever the pod's runAsUser/fsGroup are.
            "defaultMode": 0o444,
            "sources": [{"serviceAccountToken": {
                "audience": settings.token_audience,
                "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                "path": "token",
            }}],
        },
    })
}

fn state_volume() -> Value {
    json!({"name": STATE_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::overrides;

    fn settings() -> InjectionSettings {
        InjectionSettings {
            image: "ghcr.io/trimtab-dev/trimtab-sidecar:0.1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            resources: serde_json::from_value(json!({
                "requests": {"cpu": "50m", "memory": "64Mi"},
                "limits": {"memory": "256Mi"}
            }))
            .expect("resources"),
            log_level: "info".into(),
            control_plane_url: "https://trimtab-operator.trimtab-system.svc:8443".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            token_audience: "trimtab".into(),
            admin_port: 15020,
            version: "0.1.0".into(),
            excluded_namespaces: vec!["trimtab-system".into()],
        }
    }

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).expect("a pod")
    }

    fn fresh() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web"},
            "spec": {"containers": [{"name": "app", "image": "shop:1"}]}
        })
    }

    /// Decides, applies the patch as the API server would, and reads the result back.
    fn injected(value: Value) -> Pod {
        let Decision::Inject(patch) =
            decide(&pod(value.clone()), "shop", &settings()).expect("admitted")
        else {
            panic!("expected a patch");
        };
        let mut doc = value;
        json_patch::patch(&mut doc, &patch).expect("the patch applies");
        pod(doc)
    }

    #[test]
    fn a_fresh_pod_gets_the_sidecar_as_a_native_sidecar_with_token_and_ca() {
        let pod = injected(fresh());
        let spec = pod.spec.expect("spec");
        let init = spec.init_containers.expect("init containers");
        assert_eq!(init.len(), 1);
        let sidecar = &init[0];
        assert_eq!(sidecar.name, SIDECAR_CONTAINER);
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            sidecar.image.as_deref(),
            Some("ghcr.io/trimtab-dev/trimtab-sidecar:0.1.0")
        );
        let args = sidecar.args.clone().expect("args");
        assert_eq!(
            args,
            [
                "--control-plane",
                "https://trimtab-operator.trimtab-system.svc:8443",
                "--token-file",
                "/var/run/secrets/trimtab/token",
                "--state-dir",
                "/var/run/trimtab",
                "--admin-port",
                "15020"
            ]
        );
        let env = sidecar.env.clone().expect("env");
        assert_eq!(env[0].name, CA_PEM_ENV);
        assert_eq!(env[0].value.as_deref(), Some(settings().ca_pem.as_str()));
        let security = sidecar.security_context.clone().expect("securityContext");
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(
            security.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_owned()])
        );
        assert_eq!(
            security.seccomp_profile.map(|s| s.type_),
            Some("RuntimeDefault".to_owned())
        );
        for (probe, path) in [
            (&sidecar.startup_probe, "/live"),
            (&sidecar.liveness_probe, "/live"),
            (&sidecar.readiness_probe, "/ready"),
        ] {
            let get = probe.clone().and_then(|p| p.http_get).expect("httpGet");
            assert_eq!(get.path.as_deref(), Some(path));
        }
        let resources = serde_json::to_value(&sidecar.resources).expect("json");
        assert_eq!(resources["requests"]["memory"], "64Mi");

        let volumes = spec.volumes.expect("volumes");
        let token = volumes
            .iter()
            .find(|v| v.name == TOKEN_VOLUME)
            .and_then(|v| v.projected.clone())
            .expect("projected token volume");
        let source = token.sources.expect("sources")[0]
            .service_account_token
            .clone()
            .expect("a service account token");
        assert_eq!(source.audience.as_deref(), Some("trimtab"));
        assert_eq!(source.expiration_seconds, Some(3600));
        let mount = sidecar
            .volume_mounts
            .as_ref()
            .and_then(|m| m.iter().find(|m| m.name == TOKEN_VOLUME))
            .expect("token mount");
        assert_eq!(mount.read_only, Some(true));
        // The application's container is untouched and has no access to the token.
        assert_eq!(spec.containers.len(), 1);
        assert!(spec.containers[0].volume_mounts.is_none());
        assert_eq!(
            pod.metadata.annotations.expect("annotations")[INJECTED_ANNOTATION],
            "0.1.0"
        );
    }

    #[test]
    fn existing_init_containers_volumes_and_annotations_are_kept_with_the_sidecar_first() {
        let mut value = fresh();
        value["metadata"]["annotations"] = json!({"trimtab.dev/inject": "true", "team": "shop"});
        value["spec"]["initContainers"] = json!([{"name": "migrate", "image": "shop:1"}]);
        value["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        let pod = injected(value);
        let annotations = pod.metadata.annotations.expect("annotations");
        assert_eq!(annotations["team"], "shop");
        assert_eq!(annotations["trimtab.dev/inject"], "true");
        assert_eq!(annotations[INJECTED_ANNOTATION], "0.1.0");
        let spec = pod.spec.expect("spec");
        let names: Vec<_> = spec
            .init_containers
            .expect("init")
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, [SIDECAR_CONTAINER, "migrate"]);
        let volumes: Vec<_> = spec
            .volumes
            .expect("volumes")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(volumes, ["data", TOKEN_VOLUME, STATE_VOLUME]);
    }

    #[test]
    fn annotation_keys_are_escaped_in_patch_paths() {
        let mut value = fresh();
        value["metadata"]["annotations"] = json!({"a": "b"});
        let Decision::Inject(patch) = decide(&pod(value), "shop", &settings()).expect("ok") else {
            panic!("expected a patch");
        };
        let paths: Vec<String> = patch.0.iter().map(|op| op.path().to_string()).collect();
        assert!(
            paths.contains(&"/metadata/annotations/trimtab.dev~1injected".to_owned()),
            "{paths:?}"
        );
    }

    #[test]
    fn an_injected_pod_comes_back_without_a_patch() {
        let once = injected(fresh());
        let again = decide(&once, "shop", &settings()).expect("ok");
        assert_eq!(again, Decision::Skip(Skip::AlreadyInjected));
        // A pod carrying the container but not the annotation (copied from an injected
        // one, say) is not injected twice either.
        let mut copied = serde_json::to_value(&once).expect("json");
        copied["metadata"]["annotations"] = json!({});
        assert_eq!(
            decide(&pod(copied), "shop", &settings()).expect("ok"),
            Decision::Skip(Skip::AlreadyInjected)
        );
    }

    #[test]
    fn kube_system_the_operators_namespace_and_host_network_pods_are_skipped() {
        for namespace in ["kube-system", "trimtab-system"] {
            assert_eq!(
                decide(&pod(fresh()), namespace, &settings()).expect("ok"),
                Decision::Skip(Skip::ProtectedNamespace(namespace.into()))
            );
        }
        let mut host = fresh();
        host["spec"]["hostNetwork"] = json!(true);
        assert_eq!(
            decide(&pod(host), "shop", &settings()).expect("ok"),
            Decision::Skip(Skip::HostNetwork)
        );
        let mut opted_out = fresh();
        opted_out["metadata"]["annotations"] = json!({"trimtab.dev/inject": "false"});
        assert_eq!(
            decide(&pod(opted_out), "shop", &settings()).expect("ok"),
            Decision::Skip(Skip::OptedOut)
        );
    }

    #[test]
    fn each_bad_override_denies_the_pod_naming_the_annotation_and_value() {
        for annotation in overrides::ALL {
            let mut value = fresh();
            value["metadata"]["annotations"] = json!({ annotation: "" });
            let denial = decide(&pod(value), "shop", &settings())
                .expect_err(annotation)
                .to_string();
            assert!(
                denial.starts_with(&format!("annotation {annotation}: \"\" is not")),
                "{denial}"
            );
        }
    }

    #[test]
    fn overrides_reach_the_sidecar() {
        let mut value = fresh();
        value["metadata"]["annotations"] = json!({
            overrides::IMAGE: "registry.example/sidecar:dev",
            overrides::MEMORY_LIMIT: "1Gi",
            overrides::LOG_LEVEL: "debug",
        });
        let pod = injected(value);
        let sidecar = &pod.spec.expect("spec").init_containers.expect("init")[0];
        assert_eq!(
            sidecar.image.as_deref(),
            Some("registry.example/sidecar:dev")
        );
        let resources = serde_json::to_value(&sidecar.resources).expect("json");
        assert_eq!(resources["limits"]["memory"], "1Gi");
        let env = sidecar.env.clone().expect("env");
        assert!(
            env.iter()
                .any(|e| e.name == "TRIMTAB_LOG_LEVEL" && e.value.as_deref() == Some("debug"))
        );
    }

    #[test]
    fn a_volume_named_like_the_sidecars_is_refused() {
        let mut value = fresh();
        value["spec"]["volumes"] = json!([{"name": TOKEN_VOLUME, "emptyDir": {}}]);
        assert_eq!(
            decide(&pod(value), "shop", &settings()),
            Err(Denial::NameTaken {
                what: "volume",
                name: TOKEN_VOLUME
            })
        );
    }
}
