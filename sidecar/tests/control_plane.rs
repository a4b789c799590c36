//! The control-plane config source against a stand-in for the operator's config server:
//! a real HTTPS server on 127.0.0.1 (hyper + tokio-rustls, an rcgen CA and certificate)
//! playing the server side of `docs/config-server.md` — long polls with ETags, bearer
//! tokens, refusals and load reports. Every loop is bounded in count and time.
#![allow(clippy::unwrap_used)]

mod support;

use std::{
    collections::VecDeque,
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use support::*;
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};
use tokio_util::sync::CancellationToken;
use trimtab_api::{
    Duration as ApiDuration,
    balancer_policy::{Algorithm, MetricsSource},
    sidecar_config::{LoadReport, Route, SidecarConfig},
};
use trimtab_sidecar::{
    config_source::StateDir,
    control_plane::{ControlPlane, Timing},
    metrics::Metrics,
    sidecar::{Options, Sidecar},
};

// ---------------------------------------------------------------------------------
// The stand-in config server.

/// A CA and a certificate for 127.0.0.1 signed by it, as PEM and DER.
struct Pki {
    ca_pem: String,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

fn pki() -> Pki {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "trimtab test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert: cert.der().clone(),
        key: key.serialize_der(),
    }
}

/// What the stand-in serves and what it saw.
#[derive(Default)]
struct StubState {
    /// The pod's config; `None` answers 403 as for a pod that matches no policy.
    config: Option<SidecarConfig>,
    /// A body to send instead of the config's JSON (malformed on purpose).
    raw_body: Option<String>,
    /// Statuses to answer the next config requests with, before serving normally.
    refusals: VecDeque<StatusCode>,
    /// The Authorization header of every request, in order.
    authorizations: Vec<String>,
    /// The If-None-Match header of every config request, in order.
    if_none_match: Vec<Option<String>>,
    /// The `version` query parameter of every config request, in order.
    versions: Vec<Option<u64>>,
    /// Every load report received.
    reports: Vec<LoadReport>,
}

impl StubState {
    fn etag(&self) -> Option<String> {
        if let Some(raw) = &self.raw_body {
            return Some(format!("\"raw-{}\"", raw.len()));
        }
        self.config.as_ref().map(|c| format!("\"v{}\"", c.version))
    }
}

/// The operator's config server, as far as one pod's sidecar can tell.
struct Stub {
    addr: SocketAddr,
    state: Arc<Mutex<StubState>>,
    /// Bumped on every change, to answer held polls.
    changed: watch::Sender<u64>,
    tls: TlsAcceptor,
    ca_file: PathBuf,
    /// Stops the running server and drops its connections.
    running: Option<CancellationToken>,
    config_requests: Arc<AtomicUsize>,
}

impl Stub {
    async fn start(dir: &Path, config: Option<SidecarConfig>) -> Self {
        let pki = pki();
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.cert],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key)),
            )
            .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut stub = Self {
            addr: listener.local_addr().unwrap(),
            state: Arc::new(Mutex::new(StubState {
                config,
                ..StubState::default()
            })),
            changed: watch::channel(0).0,
            tls: TlsAcceptor::from(Arc::new(server)),
            ca_file,
            running: None,
            config_requests: Arc::default(),
        };
        stub.serve(listener);
        stub
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        let stop = CancellationToken::new();
        self.running = Some(stop.clone());
        let tls = self.tls.clone();
        let state = Arc::clone(&self.state);
        let changed = self.changed.clone();
        let config_requests = Arc::clone(&self.config_requests);
        tokio::spawn(async move {
            let http = Arc::new(auto::Builder::new(TokioExecutor::new()));
            loop {
                let stream = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let (tls, http, stop) = (tls.clone(), Arc::clone(&http), stop.clone());
                let (state, changed, config_requests) = (
                    Arc::clone(&state),
                    changed.clone(),
                    Arc::clone(&config_requests),
                );
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        answer(
                            Arc::clone(&state),
                            changed.subscribe(),
                            Arc::clone(&config_requests),
                            req,
                        )
                    });
                    // Dropping the connection when stopped is the point: the server is gone.
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = http.serve_connection(TokioIo::new(stream), service) => {}
                    }
                });
            }
        });
    }

    /// The server goes away: no listener, every connection dropped.
    fn stop(&mut self) {
        if let Some(stop) = self.running.take() {
            stop.cancel();
        }
    }

    /// The server comes back on the same address.
    async fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot rebind {}: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(listener);
    }

    fn update(&self, change: impl FnOnce(&mut StubState)) {
        change(&mut self.state.lock().unwrap());
        self.changed.send_modify(|generation| *generation += 1);
    }

    fn publish(&self, config: SidecarConfig) {
        self.update(|s| {
            s.raw_body = None;
            s.config = Some(config);
        });
    }

    fn authorizations(&self) -> Vec<String> {
        self.state.lock().unwrap().authorizations.clone()
    }

    fn reports(&self) -> Vec<LoadReport> {
        self.state.lock().unwrap().reports.clone()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn refusal(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": message }).to_string())
}

async fn answer(
    state: Arc<Mutex<StubState>>,
    mut changed: watch::Receiver<u64>,
    config_requests: Arc<AtomicUsize>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    state
        .lock()
        .unwrap()
        .authorizations
        .push(authorization.clone());
    if !authorization.starts_with("Bearer ") {
        return Ok(refusal(StatusCode::UNAUTHORIZED, "no bearer token"));
    }
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/v1/config") => {
            config_requests.fetch_add(1, Ordering::SeqCst);
            let held = req
                .headers()
                .get(header::IF_NONE_MATCH)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let query = |name: &str| {
                req.uri().query().and_then(|q| {
                    q.split('&')
                        .filter_map(|pair| pair.split_once('='))
                        .find(|(n, _)| *n == name)
                        .and_then(|(_, v)| v.parse::<u64>().ok())
                })
            };
            let wait = query("wait").unwrap_or(30);
            let version = query("version");
            {
                let mut s = state.lock().unwrap();
                s.if_none_match.push(held.clone());
                s.versions.push(version);
                if let Some(status) = s.refusals.pop_front() {
                    return Ok(refusal(status, "refused by the test"));
                }
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
            loop {
                changed.borrow_and_update();
                let (etag, body) = {
                    let s = state.lock().unwrap();
                    if s.config.is_none() && s.raw_body.is_none() {
                        // As the operator answers a pod no policy selects.
                        return Ok(json(
                            StatusCode::FORBIDDEN,
                            serde_json::json!({
                                "error": "pod test/client matches no BalancerPolicy",
                                "reason": "NoPolicy",
                            })
                            .to_string(),
                        ));
                    }
                    let body = s
                        .raw_body
                        .clone()
                        .unwrap_or_else(|| serde_json::to_string(&s.config).unwrap());
                    (s.etag().unwrap(), body)
                };
                if held.as_deref() != Some(etag.as_str()) {
                    let mut response = json(StatusCode::OK, body);
                    response
                        .headers_mut()
                        .insert(header::ETAG, etag.parse().unwrap());
                    return Ok(response);
                }
                if tokio::time::timeout_at(deadline, changed.changed())
                    .await
                    .is_err()
                {
                    return Ok(Response::builder()
                        .status(StatusCode::NOT_MODIFIED)
                        .body(Full::default())
                        .unwrap());
                }
            }
        }
        ("POST", "/v1/load-reports") => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            match serde_json::from_slice::<LoadReport>(&body) {
                Ok(report) => {
                    state.lock().unwrap().reports.push(report);
                    Ok(Response::builder()
                        .status(StatusCode::NO_CONTENT)
                        .body(Full::default())
                        .unwrap())
                }
                Err(e) => Ok(refusal(StatusCode::BAD_REQUEST, &e.to_string())),
            }
        }
        _ => Ok(refusal(StatusCode::NOT_FOUND, "no such path")),
    }
}

// ---------------------------------------------------------------------------------
// The sidecar side.

/// Fast enough for tests: polls held 2 s, retries from 50 ms up to 500 ms.
fn timing() -> Timing {
    Timing {
        wait: Duration::from_secs(2),
        grace: Duration::from_secs(3),
        start_deadline: Duration::from_secs(2),
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(1),
        min_poll_interval: Duration::from_millis(100),
    }
}

fn config(version: u64, routes: Vec<Route>) -> SidecarConfig {
    SidecarConfig { version, routes }
}

/// Replaces a file the way the kubelet swaps a projected token: write aside, rename over.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Following {
    sidecar: Arc<Sidecar>,
    cancel: CancellationToken,
    /// The poll loop and the load reporter.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Following {
    fn metric(&self, read: impl Fn(&Metrics) -> u64) -> u64 {
        read(&self.sidecar.shared().metrics)
    }

    fn errors(&self, kind: &str) -> u64 {
        self.metric(|m| m.control_plane_errors.with_label_values(&[kind]).get())
    }

    fn updates(&self, result: &str) -> u64 {
        self.metric(|m| m.control_plane_updates.with_label_values(&[result]).get())
    }
}

/// A sidecar following `stub` the way `main` wires it: start (first config or the kept
/// one), then the poll loop and the load reporter until dropped.
async fn follow(stub: &Stub, token_file: &Path, state_dir: Option<&Path>) -> Following {
    follow_with(stub, token_file, state_dir, timing()).await
}

async fn follow_with(
    stub: &Stub,
    token_file: &Path,
    state_dir: Option<&Path>,
    timing: Timing,
) -> Following {
    let sidecar = Sidecar::new(
        Options {
            state_dir: state_dir.map(Path::to_owned),
            ..options()
        },
        Metrics::new().unwrap(),
    );
    let control_plane = Arc::new(
        ControlPlane::new(
            &stub.url(),
            &stub.ca_file,
            token_file.to_owned(),
            timing,
            sidecar.shared().metrics.clone(),
        )
        .unwrap(),
    );
    let cancel = CancellationToken::new();
    let following = control_plane.start(&sidecar).await;
    let tasks = vec![
        tokio::spawn(Arc::clone(&control_plane).follow(
            Arc::clone(&sidecar),
            following,
            cancel.clone(),
        )),
        tokio::spawn(control_plane.report_loads(Arc::clone(sidecar.shared()), cancel.clone())),
    ];
    Following {
        sidecar,
        cancel,
        tasks,
    }
}

fn token_file(dir: &Path, token: &str) -> PathBuf {
    let file = dir.join("token");
    replace(&file, token);
    file
}

async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_version(sidecar: &Sidecar, version: u64, within: Duration) {
    eventually(&format!("version {version} applied"), within, || {
        sidecar.version() >= version
    })
    .await;
}

// ---------------------------------------------------------------------------------
// The specification.

#[tokio::test]
async fn first_config_arrives_and_traffic_flows_to_its_endpoints() {
    let a = backend("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::start(
        dir.path(),
        Some(config(
            1,
            vec![route("r", port, Algorithm::RoundRobin, &[&a])],
        )),
    )
    .await;
    let token = token_file(dir.path(), "token-1\n");
    let state = dir.path().join("state");
    let f = follow(&stub, &token, Some(&state)).await;

    // Ready as soon as start returns: the first config came with the first answer.
    assert!(f.sidecar.shared().is_ready());
    assert_eq!(f.sidecar.version(), 1);
    let (status, backend, _) = get(&client(), port, "/").await;
    assert_eq!((status, backend.as_str()), (200, "a"));
    assert_eq!(stub.authorizations()[0], "Bearer token-1");
    assert_eq!(f.updates("applied"), 1);
    assert_eq!(
        f.metric(|m| m.control_plane_connected.get() as u64),
        1,
        "connected gauge"
    );
    // Kept for a fail-static restart.
    let kept = StateDir::new(state).load().unwrap().unwrap();
    assert_eq!(kept.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_no_policy_selects_is_ready_with_no_routes_and_takes_a_later_policy() {
    let a = backend("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::start(dir.path(), None).await;
    let f = follow(&stub, &token_file(dir.path(), "t"), None).await;

    // An injected pod whose namespace has no policy for it yet must still start.
    assert!(f.sidecar.shared().is_ready(), "ready with no routes");
    assert!(f.sidecar.shared().snapshot().routes.is_empty());
    assert_eq!(f.errors("forbidden"), 0, "not a control-plane failure");
    assert_eq!(f.metric(|m| m.control_plane_connected.get() as u64), 1);

    stub.publish(config(
        5,
        vec![route("r", port, Algorithm::RoundRobin, &[&a])],
    ));
    wait_for_version(&f.sidecar, 5, Duration::from_secs(10)).await;
    let (status, backend, _) = get(&client(), port, "/").await;
    assert_eq!((status, backend.as_str()), (200, "a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_update_moves_traffic_to_the_new_endpoints_and_weights() {
    let a = backend("a").await;
    let b = backend("b").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::start(
        dir.path(),
        Some(config(
            1,
            vec![route("r", port, Algorithm::RoundRobin, &[&a])],
        )),
    )
    .await;
    // Polls held for 10 s: an update within that time can only come from a held poll
    // answered on the change.
    let long_wait = Timing {
        wait: Duration::from_secs(10),
        ..timing()
    };
    let f = follow_with(&stub, &token_file(dir.path(), "t"), None, long_wait).await;
    assert_eq!(f.sidecar.version(), 1);
    // Let the follower's poll be held with the ETag of version 1.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut next = route("r", port, Algorithm::WeightedRoundRobin, &[&a, &b]);
    next.endpoints[1].weight = 3;
    let published = Instant::now();
    stub.publish(config(2, vec![next]));
    wait_for_version(&f.sidecar, 2, Duration::from_secs(5)).await;
    assert!(
        published.elapsed() < Duration::from_secs(3),
        "the update took {:?}",
        published.elapsed()
    );
    assert!(
        stub.state
            .lock()
            .unwrap()
            .if_none_match
            .contains(&Some("\"v1\"".into())),
        "the poll did not carry the ETag it holds"
    );
    {
        let s = stub.state.lock().unwrap();
        assert_eq!(s.versions[0], None, "the first request holds nothing");
        assert!(s.versions[1..].iter().all(|v| v.is_some_and(|v| v >= 1)));
    }
    let (by_backend, failures) = spread(&client(), port, 40, Duration::from_secs(5)).await;
    assert_eq!(failures, 0);
    assert_eq!(
        (by_backend.get("a"), by_backend.get("b")),
        (Some(&10), Some(&30)),
        "weights 1:3 over 40 requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_routing_while_the_control_plane_is_away_and_resyncs_when_it_returns() {
    let a = backend("a").await;
    let b = backend("b").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut stub = Stub::start(
        dir.path(),
        Some(config(
            1,
            vec![route("r", port, Algorithm::RoundRobin, &[&a])],
        )),
    )
    .await;
    let f = follow(&stub, &token_file(dir.path(), "t"), None).await;
    assert_eq!(f.sidecar.version(), 1);

    // Two clients send a request every 2 ms until the sidecar has resynced (at most
    // 15 s / 5000 requests each), counting successes as they go.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (done, served) = (Arc::clone(&done), Arc::clone(&served));
            tokio::spawn(async move {
                let c = client();
                let deadline = Instant::now() + Duration::from_secs(15);
                let (mut ok, mut failed) = (0, Vec::new());
                for _ in 0..5000 {
                    if done.load(Ordering::SeqCst) || Instant::now() > deadline {
                        break;
                    }
                    let (status, _, body) = get(&c, port, "/").await;
                    if status == 200 {
                        ok += 1;
                        served.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failed.push((status, body));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (ok, failed)
            })
        })
        .collect();

    // Gone: nothing listens for a second.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stub.stop();
    let served_before_outage = served.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    eventually("connected gauge down", Duration::from_secs(3), || {
        f.metric(|m| m.control_plane_connected.get() as u64) == 0
    })
    .await;
    // Then something that accepts connections and closes them before TLS: count the
    // sidecar's attempts to see its backoff.
    let attempts = Arc::new(AtomicU64::new(0));
    let broken = TcpListener::bind(stub.addr).await.unwrap();
    let counting = {
        let attempts = Arc::clone(&attempts);
        tokio::spawn(async move {
            while let Ok((stream, _)) = broken.accept().await {
                attempts.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    counting.abort();
    let _ = counting.await;
    let attempts = attempts.load(Ordering::SeqCst);
    // 2 s at a 50 ms → 500 ms full-jitter backoff is about 8 attempts; without backoff it
    // would be thousands.
    assert!((2..=30).contains(&attempts), "{attempts} attempts in 2 s");
    assert_eq!(
        f.sidecar.version(),
        1,
        "the running config changed while away"
    );
    let served_in_outage = served.load(Ordering::SeqCst) - served_before_outage;
    assert!(
        served_in_outage > 100,
        "only {served_in_outage} requests during the outage"
    );

    // Back, with a changed config: the sidecar resyncs within the backoff cap.
    stub.publish(config(
        2,
        vec![route("r", port, Algorithm::RoundRobin, &[&b])],
    ));
    stub.restart().await;
    wait_for_version(&f.sidecar, 2, Duration::from_secs(5)).await;
    // Some traffic on the resynced config too, then stop the load.
    tokio::time::sleep(Duration::from_millis(200)).await;
    done.store(true, Ordering::SeqCst);
    let (ok, failed) = {
        let (mut ok, mut failed) = (0, Vec::new());
        for task in load {
            let (o, f) = task.await.unwrap();
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    };
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 100, "only {ok} requests ran");
    assert_eq!(get(&client(), port, "/").await.1, "b");
    assert!(f.errors("connect") + f.errors("transport") + f.errors("tls") >= 2);
    assert_eq!(f.metric(|m| m.control_plane_connected.get() as u64), 1);
}

#[tokio::test]
async fn refuses_an_invalid_or_malformed_config_and_keeps_serving_the_old_one() {
    let a = backend("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::start(
        dir.path(),
        Some(config(
            1,
            vec![route("r", port, Algorithm::RoundRobin, &[&a])],
        )),
    )
    .await;
    let f = follow(&stub, &token_file(dir.path(), "t"), None).await;

    let mut bad = route("r", port, Algorithm::RoundRobin, &[&a]);
    bad.endpoints[0].address = "not-an-address".into();
    stub.publish(config(2, vec![bad]));
    eventually("the invalid config refused", Duration::from_secs(5), || {
        f.updates("refused") == 1
    })
    .await;
    assert_eq!(f.sidecar.version(), 1, "the invalid config was applied");
    assert_eq!(get(&client(), port, "/").await.0, 200);
    // The refused config's ETag is sent back, so the server holds the poll: no hot loop.
    let before = stub.config_requests.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let polls = stub.config_requests.load(Ordering::SeqCst) - before;
    assert!(polls <= 2, "{polls} polls in 1 s after a refusal");
    assert_eq!(f.updates("refused"), 1);

    stub.update(|s| s.raw_body = Some("{\"version\": 3,\n \"routes\": [}".into()));
    eventually("malformed JSON counted", Duration::from_secs(5), || {
        f.errors("malformed") >= 1
    })
    .await;
    assert_eq!(f.sidecar.version(), 1);
    assert_eq!(get(&client(), port, "/").await.0, 200);

    // Refusal is not sticky: the next good config is applied.
    stub.publish(config(
        4,
        vec![route("r2", port, Algorithm::RoundRobin, &[&a])],
    ));
    wait_for_version(&f.sidecar, 4, Duration::from_secs(5)).await;
    assert_eq!(get(&client(), port, "/").await.0, 200);
}

/// Log lines, captured for one current-thread test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// Current-thread: the capturing subscriber is this thread's default, and every task of
// the test (the poll loop included) runs on it.
#[tokio::test]
async fn unauthorized_and_forbidden_answers_are_logged_without_the_token_and_retried() {
    let logs = Captured::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish(),
    );
    let a = backend("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::start(
        dir.path(),
        Some(config(
            1,
            vec![route("r", port, Algorithm::RoundRobin, &[&a])],
        )),
    )
    .await;
    stub.update(|s| {
        s.refusals = [
            StatusCode::UNAUTHORIZED,
            StatusCode::FORBIDDEN,
            StatusCode::UNAUTHORIZED,
        ]
        .into()
    });
    let secret = "s3cr3t-projected-token";
    let f = follow(&stub, &token_file(dir.path(), secret), None).await;
    assert!(!f.sidecar.shared().is_ready(), "ready without a config");
    wait_for_version(&f.sidecar, 1, Duration::from_secs(5)).await;
    assert!(f.sidecar.shared().is_ready());
    assert_eq!(get(&client(), port, "/").await.1, "a");
    assert_eq!((f.errors("unauthorized"), f.errors("forbidden")), (2, 1));

    let text = logs.text();
    assert!(
        text.contains("401 Unauthorized: refused by the test"),
        "{text}"
    );
    assert!(
        text.contains("403 Forbidden: refused by the test"),
        "{text}"
    );
    assert!(!text.contains(secret), "the token was logged:\n{text}");
    assert!(
        stub.authorizations()
            .iter()
            .all(|a| a == &format!("Bearer {secret}"))
    );
}

#[tokio::test]
async fn picks_up_a_rotated_token() {
    let a = backend("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::start(
        dir.path(),
        Some(config(
            1,
            vec![route("r", port, Algorithm::RoundRobin, &[&a])],
        )),
    )
    .await;
    let token = token_file(dir.path(), "token-1");
    let f = follow(&stub, &token, None).await;
    assert_eq!(f.sidecar.version(), 1);
    replace(&token, "token-2\n");
    // The held poll returns within its 2 s wait; the next one reads the file again.
    eventually("the rotated token used", Duration::from_secs(6), || {
        stub.authorizations().last().map(String::as_str) == Some("Bearer token-2")
    })
    .await;
    let seen = stub.authorizations();
    assert_eq!(seen[0], "Bearer token-1");
    assert!(
        seen.iter()
            .all(|a| a == "Bearer token-1" || a == "Bearer token-2")
    );
}

#[tokio::test]
async fn stops_polling_at_once_when_cancelled_and_keeps_serving() {
    let a = backend("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::start(
        dir.path(),
        Some(config(
            1,
            vec![route("r", port, Algorithm::RoundRobin, &[&a])],
        )),
    )
    .await;
    let mut f = follow(&stub, &token_file(dir.path(), "t"), None).await;
    // A poll is held by the server when the cancel comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.cancel.cancel();
    for task in f.tasks.drain(..) {
        tokio::time::timeout(Duration::from_millis(500), task)
            .await
            .expect("a task outlived its cancel")
            .unwrap();
    }
    let polls = stub.config_requests.load(Ordering::SeqCst);
    // Longer than the 2 s wait: a poll loop still running would have polled again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(stub.config_requests.load(Ordering::SeqCst), polls);
    assert_eq!(get(&client(), port, "/").await.1, "a");
}

#[tokio::test]
async fn start_gives_up_on_a_silent_control_plane_and_serves_the_kept_config() {
    let a = backend("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    StateDir::new(state.clone())
        .save(&config(
            5,
            vec![route("r", port, Algorithm::RoundRobin, &[&a])],
        ))
        .unwrap();
    // Accepts connections and never says a word (a hung operator).
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
            if held.len() > 100 {
                break;
            }
        }
    });
    std::fs::write(dir.path().join("ca.crt"), pki().ca_pem).unwrap();
    let sidecar = Sidecar::new(
        Options {
            state_dir: Some(state),
            ..options()
        },
        Metrics::new().unwrap(),
    );
    let control_plane = ControlPlane::new(
        &format!("https://{silent_addr}"),
        &dir.path().join("ca.crt"),
        token_file(dir.path(), "t"),
        Timing {
            start_deadline: Duration::from_millis(500),
            ..timing()
        },
        sidecar.shared().metrics.clone(),
    )
    .unwrap();
    let started = Instant::now();
    let following = control_plane.start(&sidecar).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(sidecar.shared().is_ready());
    assert_eq!(sidecar.version(), 5);
    assert_eq!(get(&client(), port, "/").await.1, "a");
    assert_eq!(following.failures, 1, "the next poll backs off first");
    assert_eq!(
        sidecar
            .shared()
            .metrics
            .control_plane_errors
            .with_label_values(&["timeout"])
            .get(),
        1
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_a_tls_error_and_nothing_is_served() {
    let a = backend("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::start(
        dir.path(),
        Some(config(
            1,
            vec![route("r", port, Algorithm::RoundRobin, &[&a])],
        )),
    )
    .await;
    let other_ca = dir.path().join("other-ca.crt");
    std::fs::write(&other_ca, pki().ca_pem).unwrap();
    let sidecar = Sidecar::new(options(), Metrics::new().unwrap());
    let control_plane = ControlPlane::new(
        &stub.url(),
        &other_ca,
        token_file(dir.path(), "t"),
        timing(),
        sidecar.shared().metrics.clone(),
    )
    .unwrap();
    control_plane.start(&sidecar).await;
    assert!(!sidecar.shared().is_ready());
    let metrics = &sidecar.shared().metrics;
    assert_eq!(
        metrics
            .control_plane_errors
            .with_label_values(&["tls"])
            .get(),
        1
    );
    assert!(
        stub.authorizations().is_empty(),
        "the token went to an untrusted server"
    );
}

/// The sidecar binary following the stub, keeping its config in `state_dir`.
fn start_binary(stub: &Stub, token: &Path, state_dir: &Path) -> SidecarProcess {
    let url = stub.url();
    SidecarProcess::start(&[
        "--control-plane".as_ref(),
        url.as_ref(),
        "--control-plane-ca".as_ref(),
        stub.ca_file.as_os_str(),
        "--token-file".as_ref(),
        token.as_os_str(),
        "--state-dir".as_ref(),
        state_dir.as_os_str(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_fail_static_from_the_state_dir_while_the_control_plane_is_down() {
    let a = backend("a").await;
    let b = backend("b").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut stub = Stub::start(
        dir.path(),
        Some(config(
            1,
            vec![route("r", port, Algorithm::RoundRobin, &[&a])],
        )),
    )
    .await;
    let token = token_file(dir.path(), "t");
    let state = dir.path().join("state");
    let mut first = start_binary(&stub, &token, &state);
    first.ready().await;
    assert_eq!(get(&client(), port, "/").await.1, "a");
    wait_until_kept(&state, 1).await;
    drop(first);

    // The control plane is down: the restarted sidecar serves the kept config.
    stub.stop();
    let mut second = start_binary(&stub, &token, &state);
    second.ready().await;
    let (status, backend, _) = get(&client(), port, "/").await;
    assert_eq!((status, backend.as_str()), (200, "a"));
    let (_, _, metrics) = get(&client(), second.admin_port, "/metrics").await;
    assert!(
        metrics.contains("trimtab_control_plane_connected 0"),
        "{metrics}"
    );

    // It comes back with a new config: the sidecar resyncs, saying it holds one.
    let before = stub.state.lock().unwrap().if_none_match.len();
    stub.publish(config(
        2,
        vec![route("r", port, Algorithm::RoundRobin, &[&b])],
    ));
    stub.restart().await;
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&c, port, "/").await.1 != "b" {
        assert!(Instant::now() < deadline, "never resynced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The resync says the sidecar holds version 1, whose ETag it never learnt.
    let (resync, held) = {
        let s = stub.state.lock().unwrap();
        (s.if_none_match[before].clone(), s.versions[before])
    };
    assert_eq!(resync.as_deref(), Some("\"trimtab-kept-v1\""));
    assert_eq!(held, Some(1));
    // The update is counted once its apply returns, after the config is kept on disk:
    // a moment after it serves.
    let expected = [
        "trimtab_control_plane_connected 1",
        "trimtab_control_plane_config_updates_total{result=\"applied\"} 1",
        "trimtab_config_version 2",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, metrics) = get(&c, second.admin_port, "/metrics").await;
        let missing: Vec<_> = expected.iter().filter(|e| !metrics.contains(*e)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing {missing:?} in\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_load_reports_with_the_orca_numbers_the_backends_sent() {
    let a = backend("a").await;
    let b = backend("b").await;
    // a prefers application utilization (gRFC A58); b reports CPU only, alternating.
    *a.load_report.lock().unwrap() = Some(Arc::new(|| {
        Some("TEXT cpu_utilization=0.1, application_utilization=0.8".into())
    }));
    let b_utilizations = Arc::new(Mutex::new(Vec::<f64>::new()));
    {
        let seen = Arc::clone(&b_utilizations);
        *b.load_report.lock().unwrap() = Some(Arc::new(move || {
            let mut seen = seen.lock().unwrap();
            let u = if seen.len().is_multiple_of(2) {
                0.2
            } else {
                0.4
            };
            seen.push(u);
            Some(format!("TEXT cpu_utilization={u}"))
        }));
    }
    let port = free_port();
    let mut reporting = route("orders", port, Algorithm::RoundRobin, &[&a, &b]);
    reporting.weighting.source = MetricsSource::LoadReports;
    reporting.weighting.interval = ApiDuration::from_millis(300);
    // A route without loadReports is never reported, whatever its backends send.
    let other_port = free_port();
    let silent = route("other", other_port, Algorithm::RoundRobin, &[&a]);
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::start(dir.path(), Some(config(1, vec![reporting, silent]))).await;
    let f = follow(&stub, &token_file(dir.path(), "t"), None).await;
    assert_eq!(f.sidecar.version(), 1);

    let c = client();
    for _ in 0..5 {
        assert_eq!(get(&c, other_port, "/").await.0, 200);
    }
    let a_before = a.hits();
    for _ in 0..10 {
        assert_eq!(get(&c, port, "/").await.0, 200);
    }
    b.fail_with(503);
    let b_ok = b_utilizations.lock().unwrap().len() as u64;
    for _ in 0..6 {
        get(&c, port, "/").await;
    }
    b.recover();
    let a_hits = (a.hits() - a_before) as u64;
    let b_hits = b_utilizations.lock().unwrap().len() as u64;
    let b_errors = b_hits - b_ok;
    assert_eq!(a_hits + b_hits, 16);

    let a_address = a.address();
    let b_address = b.address();
    let totals = |reports: &[LoadReport], address: &str| {
        let (mut requests, mut errors, mut weighted) = (0_u64, 0_u64, 0.0);
        for e in reports.iter().flat_map(|r| &r.endpoints) {
            if e.address == address {
                requests += e.requests;
                errors += e.errors;
                weighted += e.utilization * e.requests as f64;
            }
        }
        (requests, errors, weighted / requests.max(1) as f64)
    };
    eventually("every response reported", Duration::from_secs(5), || {
        let reports = stub.reports();
        totals(&reports, &a_address).0 == a_hits && totals(&reports, &b_address).0 == b_hits
    })
    .await;
    let reports = stub.reports();
    let (_, a_errors, a_mean) = totals(&reports, &a_address);
    let (_, reported_b_errors, b_mean) = totals(&reports, &b_address);
    assert_eq!(a_errors, 0);
    assert!((a_mean - 0.8).abs() < 1e-6, "a: {a_mean}");
    assert_eq!(reported_b_errors, b_errors);
    let b_values = b_utilizations.lock().unwrap().clone();
    let expected_b = b_values.iter().sum::<f64>() / b_values.len() as f64;
    assert!(
        (b_mean - expected_b).abs() < 1e-6,
        "b: {b_mean} vs {expected_b}"
    );
    for report in &reports {
        assert!(report.window_seconds >= 0.3, "{report:?}");
        assert!(
            report.endpoints.iter().all(|e| e.policy == "orders"),
            "{report:?}"
        );
    }
    // A report counts as sent once its answer is back, just after the stub has it.
    eventually(
        "every report counted as sent",
        Duration::from_secs(5),
        || f.metric(|m| m.load_reports.with_label_values(&["sent"]).get()) == reports.len() as u64,
    )
    .await;

    // Quiet windows are not posted.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        stub.reports().len(),
        reports.len(),
        "an empty report was posted"
    );
}
