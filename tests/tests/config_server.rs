//! The config server of a real `trimtab-operator` process against the real
//! kube-apiserver: sidecars prove their pod with TokenRequest tokens, get exactly their
//! policies, long-poll for changes, and every wrong token gets a clear 401 or 403.

use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode, header};
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Pod, ServiceAccount},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use rustls_pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
use serde_json::{Value, json};
use trimtab_api::{BalancerPolicy, sidecar_config::SidecarConfig};
use trimtab_tests::{
    cluster::{TestCluster, files},
    crds,
    operator_process::{OperatorProcess, ServingCert, free_addr, https_client},
};

const NS: &str = "storefront";

/// A client for the config server that trusts its test certificate.
struct ConfigClient {
    http: HttpClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {:?}", self.status, self.body))
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
}

impl ConfigClient {
    fn new(operator: &OperatorProcess, ca_pem: &str) -> Self {
        Self {
            http: https_client(ca_pem),
            base: format!("https://127.0.0.1:{}", operator.config_addr.port()),
        }
    }

    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        token: Option<&str>,
        headers: &[(header::HeaderName, &str)],
        body: &str,
    ) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.base));
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(70), self.http.request(request))
            .await
            .expect("answered within the longest long-poll")
            .expect("config server reachable");
        let (parts, body) = response.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }

    async fn config(&self, token: Option<&str>, query: &str, etag: Option<&str>) -> Answer {
        let headers: Vec<_> = etag
            .map(|e| (header::IF_NONE_MATCH, e))
            .into_iter()
            .collect();
        self.send(
            Method::GET,
            &format!("/v1/config{query}"),
            token,
            &headers,
            "",
        )
        .await
    }

    async fn report(&self, token: &str, body: &str) -> Answer {
        self.send(Method::POST, "/v1/load-reports", Some(token), &[], body)
            .await
    }
}

async fn apply<K>(client: &Client, namespace: &str, value: Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("valid object");
    Api::<K>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &object)
        .await
        .expect("created")
}

fn pod(name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        },
    })
}

fn policy(name: &str, app: &str, port: u16, endpoints: &[&str]) -> Value {
    json!({
        "apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
        "metadata": {"name": name},
        "spec": {
            "clients": {"podSelector": {"matchLabels": {"app": app}}},
            "listener": {"port": port},
            "endpoints": endpoints,
        },
    })
}

/// A token from the TokenRequest API, bound to `pod` when given.
async fn token(client: &Client, pod: Option<&Pod>, audience: &str) -> String {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_owned()]),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(p.name_any()),
                uid: p.uid(),
            }),
            expiration_seconds: Some(600),
        }),
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .create_token_request("web", &PostParams::default(), &request)
        .await
        .expect("token request")
        .status
        .expect("token status")
        .token
        .expect("a token")
}

/// A pod-bound token signed here with the cluster's service-account key, expiring at
/// `exp` (Unix seconds): the only way to get an expired token without waiting ten
/// minutes. The same code signs a valid one, so a refusal is due to the expiry alone.
fn signed_token(cluster: &TestCluster, sa: &ServiceAccount, pod: &Pod, exp: u64) -> String {
    let key = PrivatePkcs8KeyDer::from_pem_file(cluster.dir().join(files::SERVICE_ACCOUNT_KEY))
        .expect("service-account key");
    let rng = ring::rand::SystemRandom::new();
    let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        key.secret_pkcs8_der(),
        &rng,
    )
    .expect("ECDSA key");
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = json!({
        "iss": cluster.service_account_issuer(),
        "sub": format!("system:serviceaccount:{NS}:web"),
        "aud": ["trimtab"],
        "exp": exp,
        "iat": exp - 600,
        "nbf": exp - 600,
        "jti": "test-token",
        "kubernetes.io": {
            "namespace": NS,
            "pod": {"name": pod.name_any(), "uid": pod.uid()},
            "serviceaccount": {"name": "web", "uid": sa.uid()},
        },
    });
    let signing_input = format!(
        "{}.{}",
        b64(&json!({"alg": "ES256", "typ": "JWT"})),
        b64(&claims)
    );
    let signature = signer
        .sign(&rng, signing_input.as_bytes())
        .expect("signature");
    format!(
        "{signing_input}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature.as_ref())
    )
}

/// A plain HTTP/1.1 GET on an admin port (the operator's, a sidecar's); the whole
/// response as text.
async fn admin_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin port");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("request");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("admin answers")
    .expect("response");
    response
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn routes(answer: &Answer) -> Vec<String> {
    let config: SidecarConfig = serde_json::from_slice(&answer.body).expect("a SidecarConfig");
    config.routes.into_iter().map(|r| r.name).collect()
}

#[tokio::test]
async fn sidecars_get_exactly_their_policies_and_wrong_tokens_get_401_or_403() {
    let cluster = TestCluster::start().await.expect("cluster starts");
    crds::install(&cluster).await.expect("CRDs install");
    cluster.ensure_namespace(NS).await.expect("namespace");
    cluster
        .ensure_namespace("elsewhere")
        .await
        .expect("namespace");
    let client = cluster.client();
    let sa: ServiceAccount = apply(
        &client,
        NS,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web"}}),
    )
    .await;
    let web: Pod = apply(&client, NS, pod("web-1", "web")).await;
    let lonely: Pod = apply(&client, NS, pod("lonely-1", "lonely")).await;
    let doomed: Pod = apply(&client, NS, pod("web-2", "web")).await;
    let _: BalancerPolicy = apply(
        &client,
        NS,
        policy("api", "web", 15001, &["127.0.0.1:9001"]),
    )
    .await;
    let _: BalancerPolicy = apply(
        &client,
        NS,
        policy("admin", "other", 15002, &["127.0.0.1:9002"]),
    )
    .await;
    // Same labels, other namespace: must never reach a storefront pod.
    let _: BalancerPolicy = apply(
        &client,
        "elsewhere",
        policy("api", "web", 15003, &["127.0.0.1:9003"]),
    )
    .await;

    let cert = ServingCert::write(cluster.dir());
    let operator = OperatorProcess::start(&cluster, NS, "operator-0", free_addr(), &cert).await;
    let server = ConfigClient::new(&operator, &cert.pem);
    let web_token = token(&client, Some(&web), "trimtab").await;

    // Ready once policies and pods are listed: 503 with Retry-After until then.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let first = loop {
        let answer = server.config(Some(&web_token), "?wait=0", None).await;
        if answer.status != StatusCode::SERVICE_UNAVAILABLE {
            break answer;
        }
        assert!(answer.headers.contains_key(header::RETRY_AFTER));
        assert!(
            tokio::time::Instant::now() < deadline,
            "operator never got ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(first.status, StatusCode::OK, "{}", first.error());
    assert_eq!(routes(&first), ["api"], "exactly the pod's own policies");
    assert!(
        admin_get(operator.admin_addr, "/ready")
            .await
            .starts_with("HTTP/1.1 200"),
        "a replica that serves config is ready"
    );
    let etag = first.headers[header::ETAG]
        .to_str()
        .expect("etag")
        .to_owned();
    let version = first.json()["version"].as_u64().expect("version");

    // Nothing changed: the long poll holds for `wait`, then 304.
    let started = std::time::Instant::now();
    let unchanged = server
        .config(Some(&web_token), "?wait=1", Some(&etag))
        .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "held for wait"
    );

    // A change arrives on the open long poll, within a second of the write.
    let polling = {
        let server = ConfigClient::new(&operator, &cert.pem);
        let (token, etag) = (web_token.clone(), etag.clone());
        tokio::spawn(async move {
            let answer = server.config(Some(&token), "?wait=30", Some(&etag)).await;
            (answer, std::time::Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    Api::<BalancerPolicy>::namespaced(client.clone(), NS)
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"endpoints": ["127.0.0.1:9001", "127.0.0.1:9004"]}})),
        )
        .await
        .expect("patched");
    let written = std::time::Instant::now();
    let (changed, answered) = polling.await.expect("poll");
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.error());
    assert!(answered.duration_since(written) < Duration::from_secs(1));
    let body = changed.json();
    assert_eq!(
        body["routes"][0]["endpoints"].as_array().map(Vec::len),
        Some(2)
    );
    assert!(body["version"].as_u64().expect("version") > version);
    assert_ne!(changed.headers[header::ETAG], etag.as_str());

    // The holder of a config is counted in the policy's status.
    let new_etag = changed.headers[header::ETAG]
        .to_str()
        .expect("etag")
        .to_owned();
    let holding = {
        let server = ConfigClient::new(&operator, &cert.pem);
        let token = web_token.clone();
        tokio::spawn(async move {
            server
                .config(Some(&token), "?wait=20", Some(&new_etag))
                .await
        })
    };
    let policies = Api::<BalancerPolicy>::namespaced(client.clone(), NS);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = policies.get_status("api").await.expect("policy").status;
        let sidecars = status.and_then(|s| s.sidecars);
        if sidecars
            .as_ref()
            .is_some_and(|s| s.connected == 1 && s.up_to_date == 1)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status.sidecars never showed the subscriber: {sidecars:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    holding.abort();

    // Load reports: only for the pod's own policies; malformed ones are named.
    let accepted = server
        .report(
            &web_token,
            r#"{"windowSeconds": 5, "endpoints": [{"policy": "api", "address": "127.0.0.1:9001", "utilization": 0.5, "requests": 40, "errors": 0}]}"#,
        )
        .await;
    assert_eq!(accepted.status, StatusCode::NO_CONTENT);
    let foreign = server
        .report(
            &web_token,
            r#"{"windowSeconds": 5, "endpoints": [{"policy": "admin", "address": "127.0.0.1:9002", "utilization": 0.5, "requests": 40}]}"#,
        )
        .await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    assert!(
        foreign.error().contains("endpoints[0].policy"),
        "{}",
        foreign.error()
    );
    let garbage = server
        .report(&web_token, r#"{"windowSeconds": 5, "endpoints": [}"#)
        .await;
    assert_eq!(garbage.status, StatusCode::BAD_REQUEST);
    assert!(
        garbage.error().contains("line 1, column"),
        "{}",
        garbage.error()
    );
    let oversized = format!(
        r#"{{"windowSeconds": 5, "pad": "{}"}}"#,
        "x".repeat(1 << 20)
    );
    let oversized = server.report(&web_token, &oversized).await;
    assert_eq!(oversized.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        oversized.error().contains("larger than 1048576 bytes"),
        "{}",
        oversized.error()
    );
    let negative = server
        .report(&web_token, r#"{"windowSeconds": -1, "endpoints": []}"#)
        .await;
    assert_eq!(negative.status, StatusCode::BAD_REQUEST);
    assert!(
        negative.error().contains("windowSeconds"),
        "{}",
        negative.error()
    );

    // Every wrong token: a clear refusal, never a config.
    let refusal = async |token: Option<&str>| {
        let answer = server.config(token, "?wait=0", None).await;
        (answer.status, answer.error())
    };
    let (status, error) = refusal(None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error.contains("bearer token"), "{error}");
    let (status, _) = refusal(Some("not-a-token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let wrong_audience = token(&client, Some(&web), cluster.service_account_issuer()).await;
    let (status, error) = refusal(Some(&wrong_audience)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{error}");

    let valid_signed = signed_token(&cluster, &sa, &web, unix_now() + 600);
    let answer = server.config(Some(&valid_signed), "?wait=0", None).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "the test's own signing is right: {}",
        answer.error()
    );
    let expired = signed_token(&cluster, &sa, &web, unix_now() - 60);
    let (status, error) = refusal(Some(&expired)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{error}");
    assert!(error.contains("token rejected"), "{error}");

    let unbound = token(&client, None, "trimtab").await;
    let (status, error) = refusal(Some(&unbound)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{error}");
    assert!(error.contains("not bound to a pod"), "{error}");

    let lonely_token = token(&client, Some(&lonely), "trimtab").await;
    let answer = server.config(Some(&lonely_token), "?wait=0", None).await;
    let error = answer.error();
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{error}");
    assert!(
        error.contains("storefront/lonely-1 matches no BalancerPolicy"),
        "{error}"
    );
    // The sidecar tells this 403 from the others by its reason: it serves no routes
    // and is ready, where an unbound or stale token is a failure.
    assert_eq!(
        answer.json()["reason"],
        trimtab_api::sidecar_config::NO_POLICY_REASON
    );
    let unbound_answer = server.config(Some(&unbound), "?wait=0", None).await;
    assert_eq!(unbound_answer.json().get("reason"), None);

    // A token outlives its pod only until the API server notices the pod is gone.
    let doomed_token = token(&client, Some(&doomed), "trimtab").await;
    assert_eq!(
        server
            .config(Some(&doomed_token), "?wait=0", None)
            .await
            .status,
        StatusCode::OK
    );
    Api::<Pod>::namespaced(client.clone(), NS)
        .delete("web-2", &DeleteParams::default().grace_period(0))
        .await
        .expect("deleted");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (status, error) = refusal(Some(&doomed_token)).await;
        if status != StatusCode::OK {
            assert!(
                status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN,
                "{status}: {error}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a deleted pod's token kept working"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    operator.kill().await;
}

/// A backend that answers every request with its name and counts them.
async fn backend(name: &'static str) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&hits);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(name.as_bytes()),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// Sends `n` requests through the sidecar's listener; the names that answered, and
/// how many requests failed.
async fn spread(port: u16, n: usize) -> (std::collections::BTreeMap<String, usize>, usize) {
    let client: HttpClient<HttpConnector, Full<Bytes>> =
        HttpClient::builder(TokioExecutor::new()).build_http();
    let mut seen = std::collections::BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        let request = Request::get(format!("http://127.0.0.1:{port}/"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        match tokio::time::timeout(Duration::from_secs(5), client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => {
                let body = response.into_body().collect().await.map(|b| b.to_bytes());
                let name = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
                *seen.entry(name).or_default() += 1;
            }
            _ => failed += 1,
        }
    }
    (seen, failed)
}

/// A cluster with the CRDs, the storefront namespace, its `web` service account and one
/// pod `web-1` labelled `app: web`.
async fn storefront_with_web_pod() -> (TestCluster, Client, Pod) {
    let cluster = TestCluster::start().await.expect("cluster starts");
    crds::install(&cluster).await.expect("CRDs install");
    cluster.ensure_namespace(NS).await.expect("namespace");
    let client = cluster.client();
    let _: ServiceAccount = apply(
        &client,
        NS,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web"}}),
    )
    .await;
    let web: Pod = apply(&client, NS, pod("web-1", "web")).await;
    (cluster, client, web)
}

/// A load report that steps an endpoint's load is acted on at once, not at the policy's
/// next interval: with `interval: 300s`, only the step trigger can move the weights
/// within seconds of the report.
#[tokio::test]
async fn a_load_step_moves_the_weights_long_before_the_interval() {
    let (cluster, client, web) = storefront_with_web_pod().await;
    let (a, b) = ("127.0.0.1:9101", "127.0.0.1:9102");
    let mut api = policy("api", "web", free_addr().port(), &[a, b]);
    api["spec"]["algorithm"] = json!("cpuWeighted");
    api["spec"]["weighting"] =
        json!({"source": "loadReports", "interval": "300s", "smoothing": 1.0});
    let _: BalancerPolicy = apply(&client, NS, api).await;
    let cert = ServingCert::write(cluster.dir());
    let operator = OperatorProcess::start(&cluster, NS, "operator-0", free_addr(), &cert).await;
    let policies = Api::<BalancerPolicy>::namespaced(client.clone(), NS);
    let weights = async || -> Vec<(String, u32)> {
        policies
            .get_status("api")
            .await
            .ok()
            .and_then(|p| p.status)
            .map(|s| {
                s.endpoints
                    .into_iter()
                    .map(|e| (e.address, e.weight))
                    .collect()
            })
            .unwrap_or_default()
    };
    // The first reconcile: both endpoints, equal weights (nothing reported yet).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let w = weights().await;
        if w.len() == 2 && w[0].1 == w[1].1 && w[0].1 > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no first status: {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let server = ConfigClient::new(&operator, &cert.pem);
    let web_token = token(&client, Some(&web), "trimtab").await;
    let body = json!({"windowSeconds": 1, "endpoints": [
        {"policy": "api", "address": a, "utilization": 0.2, "requests": 100},
        {"policy": "api", "address": b, "utilization": 0.8, "requests": 100},
    ]})
    .to_string();
    let reported = tokio::time::Instant::now();
    let answer = server.report(&web_token, &body).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.error());
    loop {
        let w = weights().await;
        let of = |address: &str| w.iter().find(|(x, _)| x == address).map(|(_, w)| *w);
        if let (Some(wa), Some(wb)) = (of(a), of(b))
            && wb < wa
        {
            eprintln!("weights {w:?} {:?} after the report", reported.elapsed());
            break;
        }
        assert!(
            reported.elapsed() < Duration::from_secs(15),
            "the step did not reach the weights within 15 s (interval 300 s): {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_real_sidecar_follows_the_weights_survives_the_operator_and_resyncs() {
    let (cluster, client, web) = storefront_with_web_pod().await;
    let (a, _) = backend("a").await;
    let (b, _) = backend("b").await;
    let (c, c_hits) = backend("c").await;
    let listener = free_addr().port();
    let mut api = policy("api", "web", listener, &[&a.to_string(), &b.to_string()]);
    api["spec"]["algorithm"] = json!("cpuWeighted");
    api["spec"]["weighting"] = json!({"source": "loadReports", "interval": "1s", "smoothing": 1.0});
    let _: BalancerPolicy = apply(&client, NS, api).await;
    // An LLM gateway for the same pod: its provider wants the key the operator reads
    // from a Secret of the pod's namespace.
    let provider = mock_llm::MockProvider::start("openai-mock", 0)
        .await
        .expect("mock provider");
    provider.update(|b| b.expected_key = Some("sk-from-secret".into()));
    let _: k8s_openapi::api::core::v1::Secret = apply(
        &client,
        NS,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "llm-keys"},
               "stringData": {"openai": "sk-from-secret"}}),
    )
    .await;
    let llm_listener = free_addr().port();
    let _: BalancerPolicy = apply(
        &client,
        NS,
        json!({"apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
            "metadata": {"name": "llm"},
            "spec": {"clients": {"podSelector": {"matchLabels": {"app": "web"}}},
                     "listener": {"port": llm_listener, "protocol": "openai"},
                     "providers": [{"name": "openai", "type": "openai",
                                    "baseUrl": provider.openai_base_url(), "model": "gpt-test",
                                    "contextWindow": 8192,
                                    "apiKey": {"secretKeyRef": {"name": "llm-keys", "key": "openai"}}}]}}),
    )
    .await;

    let cert = ServingCert::write(cluster.dir());
    let config_addr = free_addr();
    let operator = OperatorProcess::start(&cluster, NS, "operator-0", config_addr, &cert).await;
    let standby = OperatorProcess::start(&cluster, NS, "operator-1", free_addr(), &cert).await;
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), NS);
    let holder = async || {
        leases
            .get_opt(trimtab_operator::leader::LEASE_NAME)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while holder().await.as_deref() != Some("operator-0") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "operator-0 never led: {:?}",
            holder().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The sidecar, as the injected container runs it: projected token, CA, state dir.
    let dir = tempfile::tempdir().expect("dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token(&client, Some(&web), "trimtab").await).expect("token");
    let admin_port = free_addr().port();
    let sidecar_log = cluster.dir().join("sidecar.log");
    let log_file = std::fs::File::create(&sidecar_log).expect("log");
    let binary =
        trimtab_tests::operator_process::workspace_binary("trimtab-sidecar", "trimtab-sidecar")
            .expect("sidecar binary");
    let mut sidecar = tokio::process::Command::new(binary)
        .arg(format!(
            "--control-plane=https://127.0.0.1:{}",
            config_addr.port()
        ))
        .arg(format!("--control-plane-ca={}", cert.cert.display()))
        .arg(format!("--token-file={}", token_file.display()))
        .arg(format!(
            "--state-dir={}",
            dir.path().join("state").display()
        ))
        .args([
            "--admin-address",
            "127.0.0.1",
            "--admin-port",
            &admin_port.to_string(),
        ])
        .env("TRIMTAB_LOG_LEVEL", "info")
        // The log goes to stdout; errors before it starts, to stderr.
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("sidecar starts");
    let sidecar_log_text = || std::fs::read_to_string(&sidecar_log).unwrap_or_default();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (seen, _) = spread(listener, 4).await;
        if seen.values().sum::<usize>() == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sidecar never served the operator's route; its log:\n{}",
            sidecar_log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The app speaks OpenAI to its LLM listener; the sidecar sends the request on with
    // the key from the Secret, which the mock provider demands.
    let chat = |port: u16| async move {
        let client: HttpClient<HttpConnector, Full<Bytes>> =
            HttpClient::builder(TokioExecutor::new()).build_http();
        let request = Request::post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
                    .to_string(),
            )))
            .expect("request");
        match client.request(request).await {
            Ok(response) => {
                let status = response.status();
                let body = response.into_body().collect().await.map(|b| b.to_bytes());
                Some((status, body.unwrap_or_default()))
            }
            Err(_) => None,
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        if let Some(answer) = chat(llm_listener).await {
            break answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sidecar never served the LLM route; its log:\n{}",
            sidecar_log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(provider.requests(), 1);
    let seen = provider
        .last_request()
        .expect("the provider saw the request");
    assert_eq!(
        seen.headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
        Some("Bearer sk-from-secret")
    );
    let shown = admin_get(([127, 0, 0, 1], admin_port).into(), "/config").await;
    assert!(
        shown.contains(trimtab_api::sidecar_config::REDACTED) && !shown.contains("sk-from-secret"),
        "the sidecar's /config redacts the key: {shown}"
    );

    // Backend b reports four times a's utilization: the weights, and with them the
    // sidecar's split, move towards a.
    let reporter = {
        let server = ConfigClient::new(&operator, &cert.pem);
        let token = token(&client, Some(&web), "trimtab").await;
        let body = json!({"windowSeconds": 1, "endpoints": [
            {"policy": "api", "address": a.to_string(), "utilization": 0.2, "requests": 100},
            {"policy": "api", "address": b.to_string(), "utilization": 0.8, "requests": 100},
        ]})
        .to_string();
        tokio::spawn(async move {
            for _ in 0..20 {
                let answer = server.report(&token, &body).await;
                assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.error());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let share_a = loop {
        let (seen, failed) = spread(listener, 100).await;
        assert_eq!(failed, 0);
        let share = seen.get("a").copied().unwrap_or_default() as f64 / 100.0;
        if share >= 0.7 {
            break share;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the split never followed the weights: {seen:?}; status: {:?}",
            Api::<BalancerPolicy>::namespaced(client.clone(), NS)
                .get_status("api")
                .await
                .ok()
                .and_then(|p| p.status)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    reporter.await.expect("reports");
    eprintln!("share of a after load reports: {share_a}");

    // Kill the leader: the sidecar keeps routing, the standby takes the Lease.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let (mut total, mut failed) = (0, 0);
            let until = tokio::time::Instant::now() + Duration::from_secs(150);
            while tokio::time::Instant::now() < until
                && total < 100_000
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                let (seen, f) = spread(listener, 20).await;
                total += seen.values().sum::<usize>() + f;
                failed += f;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (total, failed)
        })
    };
    operator.kill().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    while holder().await.as_deref() != Some("operator-1") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby never took the Lease"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Restart on the same address, change the policy: the sidecar resyncs.
    let restarted = OperatorProcess::start(&cluster, NS, "operator-0", config_addr, &cert).await;
    Api::<BalancerPolicy>::namespaced(client.clone(), NS)
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"endpoints": [a.to_string(), b.to_string(), c.to_string()]}}),
            ),
        )
        .await
        .expect("patched");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while c_hits.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sidecar never resynced with the restarted operator; its log:\n{}",
            sidecar_log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (total, failed) = traffic.await.expect("traffic");
    assert!(total > 1000, "enough traffic through the outage: {total}");
    assert_eq!(
        failed, 0,
        "{failed} of {total} requests failed while the operator was away"
    );
    assert!(
        sidecar.try_wait().expect("status").is_none(),
        "the sidecar stayed up"
    );

    // operator-1 leads, the sidecar long-polls the restarted operator-0: the leader
    // learns of it only from operator-0's published counts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let sidecars = Api::<BalancerPolicy>::namespaced(client.clone(), NS)
            .get_status("api")
            .await
            .ok()
            .and_then(|p| p.status)
            .and_then(|s| s.sidecars);
        if sidecars.as_ref().map(|s| (s.connected, s.up_to_date)) == Some((1, 1)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never counted the other replica's sidecar: {sidecars:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let published = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), NS)
        .get("trimtab-sidecars-operator-0")
        .await
        .expect("operator-0 publishes its sidecar counts");
    assert_eq!(
        published
            .labels()
            .get(trimtab_operator::sidecar_counts::LABEL)
            .map(String::as_str),
        Some("operator-0")
    );
    restarted.kill().await;
    standby.kill().await;
}
