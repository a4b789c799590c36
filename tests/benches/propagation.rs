//! Weight propagation at scale (the benchmark of issue 5): 1,000 BalancerPolicies × 10
//! static endpoints, 2,000 subscribed sidecars, against a real kube-apiserver and the real
//! `trimtab-operator` process.
//!
//! - 2,000 Pods (objects only: no kubelet), two per policy, and one TokenRequest token
//!   bound to each. Every policy is `cpuWeighted` with `weighting.source: loadReports`
//!   and `interval: 1s`.
//! - 2,000 lightweight in-process subscribers long-poll `GET /v1/config?wait=30` over
//!   HTTPS (HTTP/1.1 keep-alive, a few shared hyper clients), each with its own pod's
//!   token, and note when each config arrives and which weights it holds.
//! - A CPU change: for a sample of policies spread over time, one of its sidecars posts a
//!   load report in which every endpoint is equally idle, and half a second later one in
//!   which endpoint 0 is four times busier than the other nine. Measured:
//!   - (a) from the busy POST to the moment both subscribers of the policy hold a config in
//!     which endpoint 0 weighs less than every other endpoint (a report that steps
//!     the load triggers the policy's reconcile at once, `operator/src/load_reports.rs`;
//!     before that trigger this waited up to one weighting interval);
//!   - (b) from the operator's publish to held: the publish is the `status.configVersion`
//!     the reconcile that published the new weights wrote (the index version, the Unix
//!     millisecond of that change), seen by a watch on the policies.
//! - Reconcile throughput from the operator's `/metrics`, the time until every subscriber
//!   has its first config, and the operator's RSS.
//!
//! Everything talks to 127.0.0.1 only; every loop is bounded in count and time.
//!
//! `bench/propagation.sh [--policies N] [--samples N] [--spacing-ms N]` runs it in release
//! mode. Markdown tables on stdout, progress on stderr.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::client::legacy::{Client as HttpClient, connect::HttpConnector};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Pod, ServiceAccount},
};
use kube::{Api, Client, ResourceExt, api::PostParams};
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinSet};
use trimtab_api::{BalancerPolicy, sidecar_config::SidecarConfig};
use trimtab_tests::{
    cluster::TestCluster,
    crds,
    operator_process::{OperatorProcess, ServingCert, free_addr, https_client},
};

const NS: &str = "bench";
const SERVICE_ACCOUNT: &str = "sidecar";
const ENDPOINTS: usize = 10;
const PODS_PER_POLICY: usize = 2;
/// The endpoint made busy by every load report; its weight must fall below the others'.
const BUSY: &str = "127.0.0.1:9000";
const BUSY_UTILIZATION: f64 = 0.6;
const IDLE_UTILIZATION: f64 = 0.15;
/// How long before its busy report the same sidecar reports every endpoint idle: the
/// busy report is then a step from a report the operator holds (not a sidecar's first
/// report), and comes half an interval after the last sample.
const BASELINE_LEAD: Duration = Duration::from_millis(500);
/// Long-poll `wait` in seconds, as the sidecar uses.
const WAIT_SECONDS: u64 = 30;
/// Hyper clients the subscribers share (each keeps its own connection pool).
const HTTP_CLIENTS: usize = 4;
/// A subscriber whose pod has no policy yet (403) or an operator still listing (503)
/// asks again after this, plus up to 500 ms of jitter.
const RETRY_AFTER: Duration = Duration::from_millis(1000);
/// How long all subscribers may take to get their first config.
const FIRST_CONFIG_TIMEOUT: Duration = Duration::from_secs(300);
/// How long after the last report a sample may take to propagate; later is "not
/// propagated".
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Request timeout of one long-poll: the longest `wait` plus slack.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(WAIT_SECONDS + 40);
/// Targets of issue 5.
const TARGET_P99: Duration = Duration::from_secs(1);
const TARGET_RSS_MB: f64 = 200.0;

/// Command-line settings (`cargo bench` adds `--bench`, which is ignored).
#[derive(Debug, Clone)]
struct Settings {
    policies: usize,
    samples: usize,
    spacing: Duration,
    concurrency: usize,
}

impl Settings {
    fn parse() -> Self {
        let mut s = Self {
            policies: 1000,
            samples: 200,
            spacing: Duration::from_millis(300),
            concurrency: 16,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |name: &str| -> u64 {
                args.next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{name} needs a whole number"))
            };
            match arg.as_str() {
                "--policies" => s.policies = value("--policies") as usize,
                "--samples" => s.samples = value("--samples") as usize,
                "--spacing-ms" => s.spacing = Duration::from_millis(value("--spacing-ms")),
                "--concurrency" => s.concurrency = value("--concurrency").max(1) as usize,
                "--bench" => {}
                "--help" | "-h" => {
                    eprintln!(
                        "propagation [--policies 1000] [--samples 200] [--spacing-ms 300] [--concurrency 16]"
                    );
                    std::process::exit(0);
                }
                other => panic!("unknown argument {other:?}; see --help"),
            }
        }
        s.samples = s.samples.min(s.policies);
        s
    }

    fn pods(&self) -> usize {
        self.policies * PODS_PER_POLICY
    }
}

fn policy_name(i: usize) -> String {
    format!("p-{i:04}")
}

fn pod_name(i: usize) -> String {
    format!("sidecar-{i:04}")
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

/// Runs `f(0..count)` with at most `concurrency` in flight; results in index order.
async fn bounded<T, F, Fut>(count: usize, concurrency: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = T> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.min(count.max(1)) {
        let (f, next) = (f.clone(), Arc::clone(&next));
        workers.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break done;
                }
                done.push((i, f(i).await));
            }
        });
    }
    let mut all = Vec::with_capacity(count);
    while let Some(done) = workers.join_next().await {
        all.extend(done.expect("worker task"));
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, t)| t).collect()
}

// --- the config server client --------------------------------------------------------

type Https = HttpClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

struct Answer {
    status: StatusCode,
    etag: Option<String>,
    body: Bytes,
}

async fn send(
    http: &Https,
    method: Method,
    uri: &str,
    token: &str,
    etag: Option<&str>,
    body: Bytes,
) -> Result<Answer, String> {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    if let Some(etag) = etag {
        request = request.header(header::IF_NONE_MATCH, etag);
    }
    let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(REQUEST_TIMEOUT, http.request(request))
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
        .map_err(|e| format!("request failed: {e}"))?;
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, body.collect())
        .await
        .map_err(|_| "body timed out".to_owned())?
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        etag: parts
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
    })
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Tally {
    first_config: Option<SystemTime>,
    /// When it first held a config in which [`BUSY`] weighs less than every other
    /// endpoint of its policy, and that config's version.
    lighter_busy: Option<(SystemTime, u64)>,
    configs: u64,
    not_modified: u64,
    refusals: u64,
    errors: u64,
    last_error: Option<String>,
}

/// Whether `policy`'s route in `config` gives [`BUSY`] less weight than every other
/// endpoint; `None` when the route or its endpoints are missing.
fn busy_is_lighter<'a>(
    endpoints: impl Iterator<Item = (&'a str, u64)> + Clone,
    expected: usize,
) -> Option<bool> {
    let busy = endpoints.clone().find(|(a, _)| *a == BUSY)?.1;
    let others: Vec<u64> = endpoints
        .filter(|(a, _)| *a != BUSY)
        .map(|(_, w)| w)
        .collect();
    (others.len() + 1 == expected).then(|| others.iter().all(|w| busy < *w))
}

struct Subscriber {
    index: usize,
    policy: String,
    token: String,
    http: Https,
    base: Arc<str>,
    tally: Arc<Mutex<Tally>>,
}

impl Subscriber {
    /// Long-polls until `stop` or `deadline`, as a sidecar does.
    async fn run(self, mut stop: watch::Receiver<bool>, deadline: tokio::time::Instant) {
        let mut held: Option<(String, u64)> = None;
        let jitter = Duration::from_millis((self.index as u64 * 37) % 500);
        while !*stop.borrow() && tokio::time::Instant::now() < deadline {
            let uri = match &held {
                Some((_, version)) => format!(
                    "{}/v1/config?wait={WAIT_SECONDS}&version={version}",
                    self.base
                ),
                None => format!("{}/v1/config?wait={WAIT_SECONDS}", self.base),
            };
            let etag = held.as_ref().map(|(e, _)| e.as_str());
            let answer = tokio::select! {
                a = send(&self.http, Method::GET, &uri, &self.token, etag, Bytes::new()) => a,
                _ = stop.changed() => break,
            };
            let pause = match answer {
                Ok(a) if a.status == StatusCode::OK => {
                    let received = SystemTime::now();
                    match serde_json::from_slice::<SidecarConfig>(&a.body) {
                        Ok(config) => {
                            let lighter = config
                                .routes
                                .iter()
                                .find(|r| r.name == self.policy)
                                .and_then(|r| {
                                    busy_is_lighter(
                                        r.endpoints
                                            .iter()
                                            .map(|e| (e.address.as_str(), u64::from(e.weight))),
                                        ENDPOINTS,
                                    )
                                });
                            let mut t = self.tally.lock().expect("tally");
                            t.configs += 1;
                            t.first_config.get_or_insert(received);
                            if lighter == Some(true) && t.lighter_busy.is_none() {
                                t.lighter_busy = Some((received, config.version));
                            }
                            held = a.etag.map(|e| (e, config.version));
                            None
                        }
                        Err(e) => Some(format!("200 with a body that is no SidecarConfig: {e}")),
                    }
                    .map(|problem| {
                        let mut t = self.tally.lock().expect("tally");
                        t.errors += 1;
                        t.last_error = Some(problem);
                        Duration::from_secs(1)
                    })
                }
                Ok(a) if a.status == StatusCode::NOT_MODIFIED => {
                    self.tally.lock().expect("tally").not_modified += 1;
                    None
                }
                Ok(a)
                    if held.is_none()
                        && matches!(
                            a.status,
                            StatusCode::FORBIDDEN | StatusCode::SERVICE_UNAVAILABLE
                        ) =>
                {
                    self.tally.lock().expect("tally").refusals += 1;
                    Some(RETRY_AFTER + jitter)
                }
                Ok(a) => {
                    let mut t = self.tally.lock().expect("tally");
                    t.errors += 1;
                    t.last_error = Some(format!(
                        "{}: {}",
                        a.status,
                        String::from_utf8_lossy(&a.body)
                    ));
                    Some(Duration::from_secs(1))
                }
                Err(e) => {
                    let mut t = self.tally.lock().expect("tally");
                    t.errors += 1;
                    t.last_error = Some(e);
                    Some(Duration::from_secs(1))
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
}

// --- the policies' statuses: when the operator published ------------------------------

/// What a watch on the policies saw.
#[derive(Debug, Default)]
struct StatusLog {
    /// Watch events of type MODIFIED (status writes that changed something).
    modified: u64,
    /// Per policy: `status.configVersion` of the first status in which [`BUSY`] weighs
    /// less than every other endpoint — the Unix millisecond of that publish.
    published: HashMap<String, u64>,
}

impl StatusLog {
    fn absorb(&mut self, event: &Value) {
        if event["type"] == "MODIFIED" {
            self.modified += 1;
        }
        let object = &event["object"];
        let Some(name) = object["metadata"]["name"].as_str() else {
            return;
        };
        let status = &object["status"];
        let (Some(version), Some(endpoints)) = (
            status["configVersion"].as_u64(),
            status["endpoints"].as_array(),
        ) else {
            return;
        };
        let lighter = busy_is_lighter(
            endpoints
                .iter()
                .filter_map(|e| Some((e["address"].as_str()?, e["weight"].as_u64().unwrap_or(0)))),
            ENDPOINTS,
        );
        if lighter == Some(true) {
            self.published.entry(name.to_owned()).or_insert(version);
        }
    }
}

/// Watches the namespace's BalancerPolicies until `stop`, re-watching from the last
/// resourceVersion when the server ends a watch. Reads the raw event stream so that this
/// needs no stream combinators.
async fn watch_statuses(
    client: Client,
    log: Arc<Mutex<StatusLog>>,
    mut stop: watch::Receiver<bool>,
    deadline: tokio::time::Instant,
) {
    let mut resource_version: Option<String> = None;
    while !*stop.borrow() && tokio::time::Instant::now() < deadline {
        let uri = format!(
            "/apis/trimtab.dev/v1alpha1/namespaces/{NS}/balancerpolicies?watch=true&timeoutSeconds=240{}",
            resource_version
                .as_ref()
                .map(|v| format!("&resourceVersion={v}"))
                .unwrap_or_default()
        );
        let request = Request::get(uri)
            .body(kube::client::Body::from(Vec::new()))
            .expect("watch request");
        let response = tokio::select! {
            r = client.send(request) => r,
            _ = stop.changed() => return,
        };
        let Ok(response) = response else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut body = Box::pin(response.into_body());
        let mut buffer: Vec<u8> = Vec::new();
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = stop.changed() => return,
            };
            let Some(Ok(frame)) = frame else { break };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if event["type"] == "ERROR" {
                    // Most likely 410 Gone: start over from a fresh list.
                    resource_version = None;
                    continue;
                }
                if let Some(v) = event["object"]["metadata"]["resourceVersion"].as_str() {
                    resource_version = Some(v.to_owned());
                }
                log.lock().expect("status log").absorb(&event);
            }
        }
    }
}

// --- the operator's metrics and memory ------------------------------------------------

/// A plain HTTP/1.1 GET on the operator's admin port: the status line and the body.
async fn admin_get(operator: &OperatorProcess, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(operator.admin_addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    match tokio::time::timeout(Duration::from_secs(10), fetch).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: no answer within 10 s".into(),
    }
}

/// The operator's counters at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Scrape {
    at: Option<Instant>,
    reconciles: f64,
    reconcile_errors: f64,
    duration_sum: f64,
    duration_count: f64,
    write_sum: f64,
    write_count: f64,
    cpu_seconds: f64,
}

fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape(operator: &OperatorProcess) -> Scrape {
    let text = admin_get(operator, "/metrics").await;
    Scrape {
        at: Some(Instant::now()),
        reconciles: metric_sum(&text, "trimtab_operator_reconciles_total"),
        reconcile_errors: metric_sum(&text, "trimtab_operator_reconcile_errors_total"),
        duration_sum: metric_sum(&text, "trimtab_operator_reconcile_duration_seconds_sum"),
        duration_count: metric_sum(&text, "trimtab_operator_reconcile_duration_seconds_count"),
        write_sum: metric_sum(&text, "trimtab_operator_status_write_duration_seconds_sum"),
        write_count: metric_sum(
            &text,
            "trimtab_operator_status_write_duration_seconds_count",
        ),
        cpu_seconds: operator.cpu_seconds(),
    }
}

/// The soft limit on open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

// --- statistics -----------------------------------------------------------------------

/// Nearest-rank percentile of `values` (milliseconds; `None` = never happened, sorted
/// last); "> timeout" when the rank falls on a missing one.
fn percentile(values: &[Option<f64>], p: f64) -> String {
    if values.is_empty() {
        return "–".into();
    }
    let mut sorted: Vec<f64> = values.iter().map(|v| v.unwrap_or(f64::INFINITY)).collect();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    let v = sorted[rank - 1];
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "never".into()
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**NOT MET**" }
}

// --- setup ----------------------------------------------------------------------------

fn pod_object(i: usize) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name(i), "labels": {"policy": policy_name(i / PODS_PER_POLICY)}},
        "spec": {
            "serviceAccountName": SERVICE_ACCOUNT,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        },
    }))
    .expect("pod object")
}

fn policy_object(i: usize) -> BalancerPolicy {
    let endpoints: Vec<String> = (0..ENDPOINTS)
        .map(|j| format!("127.0.0.1:{}", 9000 + j))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "trimtab.dev/v1alpha1", "kind": "BalancerPolicy",
        "metadata": {"name": policy_name(i)},
        "spec": {
            "clients": {"podSelector": {"matchLabels": {"policy": policy_name(i)}}},
            "listener": {"port": 15001},
            "endpoints": endpoints,
            "algorithm": "cpuWeighted",
            "weighting": {"source": "loadReports", "interval": "1s"},
        },
    }))
    .expect("policy object")
}

async fn token_for(client: Client, pod: &Pod) -> String {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["trimtab".to_owned()]),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
            expiration_seconds: Some(3600),
        }),
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(client, NS)
        .create_token_request(SERVICE_ACCOUNT, &PostParams::default(), &request)
        .await
        .expect("token request")
        .status
        .expect("token status")
        .token
        .expect("a token")
}

fn progress(started: Instant, message: &str) {
    eprintln!("[{:>6.1} s] {message}", started.elapsed().as_secs_f64());
}

#[tokio::main]
async fn main() {
    let settings = Settings::parse();
    let started = Instant::now();
    let pods_total = settings.pods();
    let needed_files = (2 * pods_total + 512) as u64;
    if let Some(limit) = open_files_limit()
        && limit < needed_files
    {
        eprintln!(
            "the open-files limit is {limit}; {pods_total} subscribers need about {needed_files} (the bench and the operator each hold one socket per subscriber): raise it with `ulimit -n {needed_files}` (bench/propagation.sh does)"
        );
        std::process::exit(2);
    }

    let cluster = TestCluster::start().await.expect("cluster starts");
    crds::install(&cluster).await.expect("CRDs install");
    cluster.ensure_namespace(NS).await.expect("namespace");
    let client = cluster.client();
    let service_account: ServiceAccount = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT}}),
    )
    .expect("service account");
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &service_account)
        .await
        .expect("service account created");
    progress(started, "cluster up");

    let t = Instant::now();
    let pods: Vec<Pod> = bounded(pods_total, settings.concurrency, {
        let client = client.clone();
        move |i| {
            let api = Api::<Pod>::namespaced(client.clone(), NS);
            async move {
                api.create(&PostParams::default(), &pod_object(i))
                    .await
                    .unwrap_or_else(|e| panic!("creating pod {}: {e}", pod_name(i)))
            }
        }
    })
    .await;
    let pods_created = t.elapsed();
    progress(
        started,
        &format!("{pods_total} pods in {:.1} s", pods_created.as_secs_f64()),
    );
    let pods = Arc::new(pods);
    let tokens: Vec<String> = bounded(pods_total, settings.concurrency, {
        let (client, pods) = (client.clone(), Arc::clone(&pods));
        move |i| {
            let (client, pods) = (client.clone(), Arc::clone(&pods));
            async move { token_for(client, &pods[i]).await }
        }
    })
    .await;
    progress(started, &format!("{pods_total} pod-bound tokens"));

    let cert = ServingCert::write(cluster.dir());
    let operator = OperatorProcess::start(&cluster, NS, "operator-0", free_addr(), &cert).await;
    let ready_by = Instant::now() + Duration::from_secs(60);
    while !admin_get(&operator, "/ready")
        .await
        .starts_with("HTTP/1.1 200")
    {
        assert!(
            Instant::now() < ready_by,
            "operator not ready within 60 s; log:\n{}",
            std::fs::read_to_string(&operator.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress(started, "operator ready (no policies yet)");

    // Subscribers first, as sidecars already running when the policies are applied.
    let base: Arc<str> = format!("https://127.0.0.1:{}", operator.config_addr.port()).into();
    let clients: Vec<Https> = (0..HTTP_CLIENTS).map(|_| https_client(&cert.pem)).collect();
    let (stop_tx, stop) = watch::channel(false);
    let run_deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    let tallies: Vec<Arc<Mutex<Tally>>> = (0..pods_total).map(|_| Arc::default()).collect();
    let mut subscribers = JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let subscriber = Subscriber {
            index: i,
            policy: policy_name(i / PODS_PER_POLICY),
            token: token.clone(),
            http: clients[i % HTTP_CLIENTS].clone(),
            base: Arc::clone(&base),
            tally: Arc::clone(&tallies[i]),
        };
        subscribers.spawn(subscriber.run(stop.clone(), run_deadline));
    }
    let status_log = Arc::new(Mutex::new(StatusLog::default()));
    let status_watch = tokio::spawn(watch_statuses(
        client.clone(),
        Arc::clone(&status_log),
        stop.clone(),
        run_deadline,
    ));

    // The policies, with bounded concurrency.
    let at_create = scrape(&operator).await;
    let first_create = SystemTime::now();
    let create_started = Instant::now();
    bounded(settings.policies, settings.concurrency, {
        let client = client.clone();
        move |i| {
            let api = Api::<BalancerPolicy>::namespaced(client.clone(), NS);
            async move {
                api.create(&PostParams::default(), &policy_object(i))
                    .await
                    .unwrap_or_else(|e| panic!("creating policy {}: {e}", policy_name(i)));
            }
        }
    })
    .await;
    let all_created = SystemTime::now();
    let policies_created = create_started.elapsed();
    progress(
        started,
        &format!(
            "{} policies in {:.1} s",
            settings.policies,
            policies_created.as_secs_f64()
        ),
    );

    // Every subscriber's first config.
    let first_by = Instant::now() + FIRST_CONFIG_TIMEOUT;
    let firsts = loop {
        let firsts: Vec<Option<SystemTime>> = tallies
            .iter()
            .map(|t| t.lock().expect("tally").first_config)
            .collect();
        let have = firsts.iter().filter(|f| f.is_some()).count();
        if have == pods_total || Instant::now() > first_by {
            break firsts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let at_first_configs = scrape(&operator).await;
    let have_first = firsts.iter().filter(|f| f.is_some()).count();
    let last_first = firsts.iter().flatten().max().copied();
    let first_after_all_created = last_first
        .and_then(|l| l.duration_since(all_created).ok())
        .unwrap_or_default();
    let first_after_first_create = last_first
        .and_then(|l| l.duration_since(first_create).ok())
        .unwrap_or_default();
    progress(
        started,
        &format!(
            "{have_first}/{pods_total} subscribers have their first config, the last {:.1} s after the last policy was created",
            first_after_all_created.as_secs_f64()
        ),
    );

    // Settle: a few intervals in the steady state, measured for reconcile throughput.
    let steady_from = scrape(&operator).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let steady_to = scrape(&operator).await;

    // CPU changes: one load report per sampled policy, spread over time.
    let sampled: Vec<usize> = (0..settings.samples)
        .map(|k| k * settings.policies / settings.samples.max(1))
        .collect();
    progress(
        started,
        &format!(
            "posting {} load reports, one every {} ms",
            sampled.len(),
            settings.spacing.as_millis()
        ),
    );
    let reporter = https_client(&cert.pem);
    let sampling_from = scrape(&operator).await;
    let writes_before = status_log.lock().expect("status log").modified;
    let t0 = tokio::time::Instant::now() + BASELINE_LEAD;
    let mut posts = JoinSet::new();
    for (k, &policy) in sampled.iter().enumerate() {
        let (http, base) = (reporter.clone(), Arc::clone(&base));
        let token = tokens[policy * PODS_PER_POLICY].clone();
        let at = t0 + settings.spacing * k as u32;
        posts.spawn(async move {
            let post = |busy: bool| {
                let endpoints: Vec<Value> = (0..ENDPOINTS)
                    .map(|j| {
                        let address = format!("127.0.0.1:{}", 9000 + j);
                        let utilization = if busy && address == BUSY {
                            BUSY_UTILIZATION
                        } else {
                            IDLE_UTILIZATION
                        };
                        json!({"policy": policy_name(policy), "address": address,
                               "utilization": utilization, "requests": 100, "errors": 0})
                    })
                    .collect();
                let body = json!({"windowSeconds": 1, "endpoints": endpoints}).to_string();
                let (http, base, token) = (http.clone(), Arc::clone(&base), token.clone());
                async move {
                    let answer = send(
                        &http,
                        Method::POST,
                        &format!("{base}/v1/load-reports"),
                        &token,
                        None,
                        Bytes::from(body),
                    )
                    .await;
                    let accepted = matches!(&answer, Ok(a) if a.status == StatusCode::NO_CONTENT);
                    if !accepted {
                        eprintln!(
                            "load report for {} refused: {:?}",
                            policy_name(policy),
                            answer
                                .map(|a| (a.status, String::from_utf8_lossy(&a.body).into_owned()))
                        );
                    }
                    accepted
                }
            };
            tokio::time::sleep_until(at - BASELINE_LEAD).await;
            let baseline = post(false).await;
            tokio::time::sleep_until(at).await;
            let posted = SystemTime::now();
            let accepted = post(true).await;
            (policy, posted, baseline && accepted)
        });
    }
    let mut reports = Vec::new();
    while let Some(r) = posts.join_next().await {
        reports.push(r.expect("report task"));
    }
    reports.sort_by_key(|(p, _, _)| *p);
    progress(started, "all load reports posted; waiting for propagation");

    let held_at = |policy: usize| -> Option<(SystemTime, u64)> {
        let times: Vec<Option<(SystemTime, u64)>> = (0..PODS_PER_POLICY)
            .map(|k| {
                tallies[policy * PODS_PER_POLICY + k]
                    .lock()
                    .expect("tally")
                    .lighter_busy
            })
            .collect();
        times
            .into_iter()
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max_by_key(|(t, _)| *t)
    };
    let propagation_by = Instant::now() + PROPAGATION_TIMEOUT;
    while Instant::now() < propagation_by && !reports.iter().all(|(p, _, _)| held_at(*p).is_some())
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sampling_to = scrape(&operator).await;
    // Give the watch a moment for the last statuses.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_mb, hwm_mb) = operator.memory_mb();
    let status_writes = status_log.lock().expect("status log").modified - writes_before;

    let _ = stop_tx.send(true);
    let stopped_by = Instant::now() + Duration::from_secs(10);
    while subscribers.join_next().await.is_some() && Instant::now() < stopped_by {}
    subscribers.abort_all();
    status_watch.abort();

    // --- results ------------------------------------------------------------------------
    let published = status_log.lock().expect("status log").published.clone();
    let mut post_to_held = Vec::new();
    let mut publish_to_held = Vec::new();
    let mut post_to_publish = Vec::new();
    for &(policy, posted, accepted) in &reports {
        if !accepted {
            post_to_held.push(None);
            continue;
        }
        let held = held_at(policy);
        post_to_held.push(
            held.and_then(|(t, _)| t.duration_since(posted).ok())
                .map(|d| d.as_secs_f64() * 1000.0),
        );
        if let (Some((t, _)), Some(&publish_ms)) = (held, published.get(&policy_name(policy))) {
            publish_to_held.push(Some(unix_ms(t) - publish_ms as f64));
            post_to_publish.push(Some(publish_ms as f64 - unix_ms(posted)));
        }
    }
    let propagated = post_to_held.iter().filter(|v| v.is_some()).count();

    let totals = tallies.iter().fold(Tally::default(), |mut acc, t| {
        let t = t.lock().expect("tally");
        acc.configs += t.configs;
        acc.not_modified += t.not_modified;
        acc.refusals += t.refusals;
        acc.errors += t.errors;
        if acc.last_error.is_none() {
            acc.last_error.clone_from(&t.last_error);
        }
        acc
    });

    let mean_ms = |sum: f64, count: f64| {
        if count > 0.0 {
            sum / count * 1000.0
        } else {
            f64::NAN
        }
    };
    let rate = |a: &Scrape, b: &Scrape| {
        let secs = match (a.at, b.at) {
            (Some(x), Some(y)) => y.duration_since(x).as_secs_f64(),
            _ => 0.0,
        };
        let n = b.reconciles - a.reconciles;
        let mean_ms = mean_ms(
            b.duration_sum - a.duration_sum,
            b.duration_count - a.duration_count,
        );
        let cpu = if secs > 0.0 {
            (b.cpu_seconds - a.cpu_seconds) / secs
        } else {
            f64::NAN
        };
        (
            secs,
            n,
            if secs > 0.0 { n / secs } else { f64::NAN },
            mean_ms,
            b.reconcile_errors - a.reconcile_errors,
            cpu,
        )
    };

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "# bench/propagation.sh — {} policies × {ENDPOINTS} endpoints, {pods_total} subscribers, {} samples every {} ms; load average at the end {}",
        settings.policies,
        sampled.len(),
        settings.spacing.as_millis(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!(
        "Setup: {pods_total} pods in {:.1} s, {} policies in {:.1} s (concurrency {}).",
        pods_created.as_secs_f64(),
        settings.policies,
        policies_created.as_secs_f64(),
        settings.concurrency
    );
    println!();
    println!("## Propagation of a CPU change (ms)");
    println!();
    println!("| measure | samples | p50 | p99 | max |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let row = |name: &str, v: &[Option<f64>]| {
        let max = if v.iter().any(Option::is_none) {
            "never".to_owned()
        } else {
            format!(
                "{:.0}",
                v.iter().flatten().copied().fold(f64::NAN, f64::max)
            )
        };
        println!(
            "| {name} | {} | {} | {} | {max} |",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99)
        );
    };
    row(
        "(a) busy load report POST → both subscribers hold the new weights",
        &post_to_held,
    );
    row(
        "(b) operator publish (status.configVersion) → both subscribers hold it",
        &publish_to_held,
    );
    row(
        "POST → publish (the reconcile the report triggered)",
        &post_to_publish,
    );
    println!();
    println!(
        "{propagated}/{} samples propagated within {} s of the last report; {} publishes seen by the status watch.",
        reports.len(),
        PROPAGATION_TIMEOUT.as_secs(),
        publish_to_held.len()
    );
    println!();

    println!("## Reconciles (operator /metrics)");
    println!();
    println!(
        "| span | seconds | reconciles | per second | mean reconcile ms | errors | status writes sent | mean write ms | operator CPU (cores) |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, a, b) in [
        (
            "policies created → every subscriber's first config",
            &at_create,
            &at_first_configs,
        ),
        ("steady state, 10 s", &steady_from, &steady_to),
        ("load reports and propagation", &sampling_from, &sampling_to),
    ] {
        let (secs, n, per_s, mean_reconcile_ms, errors, cpu) = rate(a, b);
        let writes = b.write_count - a.write_count;
        let mean_write_ms = mean_ms(b.write_sum - a.write_sum, writes);
        println!(
            "| {name} | {secs:.1} | {n:.0} | {per_s:.0} | {mean_reconcile_ms:.1} | {errors:.0} | {writes:.0} | {mean_write_ms:.1} | {cpu:.2} |"
        );
    }
    let (_, _, steady_rate, ..) = rate(&steady_from, &steady_to);
    println!();
    println!(
        "Wanted by `interval: 1s`: {} reconciles/s; effective interval in the steady state: {:.1} s. Status writes that changed an object (watch MODIFIED events) from the first load report to the end: {status_writes} ({:.0}/s).",
        settings.policies,
        settings.policies as f64 / steady_rate,
        status_writes as f64 / rate(&sampling_from, &sampling_to).0
    );
    println!();
    println!("## First config");
    println!();
    println!(
        "{have_first}/{pods_total} subscribers got their first config; the last {:.1} s after the last policy was created ({:.1} s after the first).",
        first_after_all_created.as_secs_f64(),
        first_after_first_create.as_secs_f64()
    );
    println!(
        "Subscriber totals: {} configs, {} not-modified, {} refusals while their policy did not exist yet, {} errors{}.",
        totals.configs,
        totals.not_modified,
        totals.refusals,
        totals.errors,
        totals
            .last_error
            .map(|e| format!(" (e.g. {e})"))
            .unwrap_or_default()
    );
    println!();
    println!("## Operator memory");
    println!();
    println!("VmRSS {rss_mb:.1} MB, VmHWM (peak) {hwm_mb:.1} MB at the end.");
    println!();
    println!("## Targets (issue 5)");
    println!();
    let p99_ms = {
        let mut v: Vec<f64> = post_to_held
            .iter()
            .map(|v| v.unwrap_or(f64::INFINITY))
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(((0.99 * v.len() as f64).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::INFINITY)
    };
    println!(
        "- p99 propagation ≤ {} ms: {} ((a) p99 = {})",
        TARGET_P99.as_millis(),
        verdict(p99_ms <= TARGET_P99.as_secs_f64() * 1000.0),
        percentile(&post_to_held, 0.99)
    );
    println!(
        "- operator RSS ≤ {TARGET_RSS_MB:.0} MB: {} (VmHWM {hwm_mb:.1} MB)",
        verdict(hwm_mb <= TARGET_RSS_MB)
    );
    drop(operator);
    drop(cluster);
}
