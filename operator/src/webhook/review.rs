//! One AdmissionReview in, one out: reads the API server's request, asks
//! [`inject::decide`] and wraps its answer. No I/O; the HTTP route is in
//! `config_server`.

use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};

use super::inject::{self, Decision, InjectionSettings};

/// How an admission ended, the `outcome` label of the admissions counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Patched with the sidecar.
    Injected,
    /// Admitted unchanged (not a pod creation, or a pod that is not injected).
    Skipped,
    /// Refused: a bad override.
    Denied,
    /// Refused: the request could not be handled.
    Error,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Skipped => "skipped",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

/// A body that is not an AdmissionReview with a request: answered 400, since there is
/// no `uid` to answer with.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// Not JSON, or not the AdmissionReview schema.
    #[error(
        "the body is not an AdmissionReview: at {path} (line {line}, column {column}): {message}"
    )]
    Malformed {
        /// The JSON path of the problem (`request.uid`).
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// An AdmissionReview without `request`.
    #[error("the AdmissionReview has no request")]
    NoRequest,
}

/// Parses `body` and answers it.
pub fn review(
    body: &[u8],
    settings: &InjectionSettings,
) -> Result<(AdmissionReview<DynamicObject>, Outcome), ReviewError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed: AdmissionReview<DynamicObject> =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ReviewError::Malformed {
                path,
                line: inner.line(),
                column: inner.column(),
                message: inner.to_string(),
            }
        })?;
    let request: AdmissionRequest<DynamicObject> =
        parsed.try_into().map_err(|_| ReviewError::NoRequest)?;
    let (response, outcome) = respond(&request, settings);
    Ok((response.into_review(), outcome))
}

fn respond(
    request: &AdmissionRequest<DynamicObject>,
    settings: &InjectionSettings,
) -> (AdmissionResponse, Outcome) {
    let admit = AdmissionResponse::from(request);
    let is_pod = request.kind.group.is_empty()
        && request.kind.kind == "Pod"
        && request.sub_resource.is_none();
    if !is_pod || request.operation != Operation::Create {
        // The webhook's rules send only pod creations; anything else passes unchanged.
        return (admit, Outcome::Skipped);
    }
    let namespace = request.namespace.as_deref().unwrap_or_default();
    let pod: Pod = match request
        .object
        .as_ref()
        .map(|o| serde_json::to_value(o).and_then(serde_json::from_value))
    {
        Some(Ok(pod)) => pod,
        Some(Err(e)) => {
            return (
                admit.deny(format!(
                    "the pod in the AdmissionReview does not parse: {e}"
                )),
                Outcome::Error,
            );
        }
        None => {
            return (
                admit.deny("the AdmissionReview of a pod creation carries no object"),
                Outcome::Error,
            );
        }
    };
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone().map(|g| format!("{g}*")))
        .unwrap_or_default();
    match inject::decide(&pod, namespace, settings) {
        Ok(Decision::Skip(skip)) => {
            tracing::debug!(%namespace, pod = %name, reason = %skip.reason(), "not injected");
            (admit, Outcome::Skipped)
        }
        Ok(Decision::Inject(patch)) => match admit.clone().with_patch(patch) {
            Ok(patched) => {
                tracing::info!(%namespace, pod = %name, "sidecar injected");
                (patched, Outcome::Injected)
            }
            Err(e) => (
                admit.deny(format!("the sidecar patch does not serialize: {e}")),
                Outcome::Error,
            ),
        },
        Err(denial) => {
            tracing::info!(%namespace, pod = %name, reason = %denial, "pod refused");
            (
                admit.deny(format!("Trimtab sidecar injection: {denial}")),
                Outcome::Denied,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn settings() -> InjectionSettings {
        InjectionSettings {
            image: "sidecar:1".into(),
            image_pull_policy: "IfNotPresent".into(),
            resources: Default::default(),
            log_level: "info".into(),
            control_plane_url: "https://op.trimtab-system.svc:8443".into(),
            ca_pem: "PEM".into(),
            token_audience: "trimtab".into(),
            admin_port: 15020,
            version: "0.1.0".into(),
            excluded_namespaces: vec![],
        }
    }

    fn request(operation: &str, object: Value) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": object,
                "dryRun": false
            }
        })
        .to_string()
        .into_bytes()
    }

    fn pod(annotations: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
               "spec": {"containers": [{"name": "app", "image": "shop:1"}]}})
    }

    fn answer(body: &[u8]) -> (Value, Outcome) {
        let (review, outcome) = review(body, &settings()).expect("a review");
        (serde_json::to_value(review).expect("json"), outcome)
    }

    #[test]
    fn a_pod_creation_is_answered_with_a_json_patch_and_the_uid_echoed() {
        let (answer, outcome) = answer(&request(
            "CREATE",
            pod(json!({"trimtab.dev/inject": "true"})),
        ));
        assert_eq!(outcome, Outcome::Injected);
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let response = &answer["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        // kube serializes the patch bytes as a JSON array of numbers, which the API
        // server's decoder reads into its []byte as it reads base64.
        let patch: Vec<u8> =
            serde_json::from_value(response["patch"].clone()).expect("patch bytes");
        let patch: Value = serde_json::from_slice(&patch).expect("a JSON patch");
        assert!(patch.to_string().contains("trimtab-sidecar"), "{patch}");
    }

    #[test]
    fn anything_but_a_pod_creation_is_allowed_unchanged() {
        let (answer, outcome) = answer(&request("UPDATE", pod(json!({}))));
        assert_eq!(outcome, Outcome::Skipped);
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
    }

    #[test]
    fn a_bad_override_is_denied_with_the_annotation_in_the_message() {
        let (answer, outcome) = answer(&request(
            "CREATE",
            pod(json!({"trimtab.dev/sidecar-memory-limit": "lots"})),
        ));
        assert_eq!(outcome, Outcome::Denied);
        assert_eq!(answer["response"]["allowed"], false);
        let message = answer["response"]["status"]["message"]
            .as_str()
            .expect("message");
        assert!(
            message.contains("trimtab.dev/sidecar-memory-limit") && message.contains("\"lots\""),
            "{message}"
        );
    }

    #[test]
    fn malformed_bodies_name_the_path_and_position() {
        let error = review(b"{\"request\": {\"uid\": 7}}", &settings())
            .expect_err("uid is a string")
            .to_string();
        assert!(
            error.contains("request.uid") && error.contains("line 1"),
            "{error}"
        );
        let error = review(
            b"{\"apiVersion\": \"admission.k8s.io/v1\", \"kind\": \"AdmissionReview\"}",
            &settings(),
        )
        .expect_err("no request")
        .to_string();
        assert_eq!(error, "the AdmissionReview has no request");
        assert!(review(b"not json", &settings()).is_err());
    }
}
