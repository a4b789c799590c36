//! Test backends and helpers. Everything listens on 127.0.0.1 only, and every load
//! loop is bounded in count and time.
#![allow(dead_code, clippy::unwrap_used, missing_debug_implementations)]

pub mod llm;

use std::{
    ffi::OsStr,
    net::SocketAddr,
    path::Path,
    process::{Child, Command},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use trimtab_api::{
    balancer_policy::{
        Algorithm, Limits, Listener, OutlierDetection, Retries, Timeouts, Weighting,
    },
    sidecar_config::{Endpoint, Route, SidecarConfig},
};
use trimtab_sidecar::{
    metrics::Metrics,
    sidecar::{Options, Sidecar},
};

/// A function computing an ORCA header value for each response.
pub type LoadReporter = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// A test backend: answers with its name, counts hits, and can be told to fail or lag.
#[derive(Clone)]
pub struct Backend {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// Status to answer with; 200 when 0.
    pub status: Arc<AtomicU16>,
    pub delay_ms: Arc<AtomicU64>,
    pub load_report: Arc<Mutex<Option<LoadReporter>>>,
    /// A Retry-After header to send with every response.
    pub retry_after: Arc<Mutex<Option<String>>>,
}

impl Backend {
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn fail_with(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn recover(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

pub async fn backend(name: &'static str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = Backend {
        name,
        addr: listener.local_addr().unwrap(),
        hits: Arc::default(),
        status: Arc::default(),
        delay_ms: Arc::default(),
        load_report: Arc::default(),
        retry_after: Arc::default(),
    };
    let server = b.clone();
    tokio::spawn(async move {
        let http = Arc::new(auto::Builder::new(TokioExecutor::new()));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let b = server.clone();
            let http = Arc::clone(&http);
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(b.clone(), req));
                let _ = http
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    b
}

async fn answer(
    b: Backend,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    b.hits.fetch_add(1, Ordering::SeqCst);
    if req.headers().contains_key(http::header::UPGRADE) {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0_u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let delay = b.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = match b.status.load(Ordering::SeqCst) {
        0 => 200,
        s => s,
    };
    let body = if req.uri().path() == "/headers" {
        let mut lines: Vec<String> = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        lines.sort();
        lines.join("\n")
    } else {
        let received = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes().len())
            .unwrap_or(0);
        format!("{} got {received} bytes", b.name)
    };
    let mut response = Response::builder()
        .status(status)
        .header("x-backend", b.name);
    let reporter = b.load_report.lock().unwrap().clone();
    if let Some(report) = reporter.and_then(|r| r()) {
        response = response.header("endpoint-load-metrics", report);
    }
    if let Some(after) = b.retry_after.lock().unwrap().clone() {
        response = response.header("retry-after", after);
    }
    Ok(response.body(Full::new(Bytes::from(body))).unwrap())
}

/// A TCP server on 127.0.0.1 that answers every connection with bytes that are not
/// HTTP and closes it.
pub async fn broken_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0_u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"THIS IS NOT HTTP\r\n\r\n").await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

pub use trimtab_test_ports::free_port;

/// The `trimtab-sidecar` binary as a child process, its admin port on 127.0.0.1 and its
/// log in a file that a test failing to see it ready shows: a bare "never ready" had
/// left a flaky test unexplained.
pub struct SidecarProcess {
    child: Child,
    pub admin_port: u16,
    log: tempfile::NamedTempFile,
}

impl SidecarProcess {
    /// Starts the binary with `args` and a free admin port; killed when dropped.
    pub fn start<S: AsRef<OsStr>>(args: &[S]) -> Self {
        let admin_port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        // The log goes to stdout, errors from argument parsing to stderr: both appended.
        let append = || {
            std::fs::OpenOptions::new()
                .append(true)
                .open(log.path())
                .unwrap()
        };
        let child = Command::new(env!("CARGO_BIN_EXE_trimtab-sidecar"))
            .args(args)
            .args(["--admin-address", "127.0.0.1", "--admin-port"])
            .arg(admin_port.to_string())
            .env("TRIMTAB_LOG_LEVEL", "info")
            .stdout(append())
            .stderr(append())
            .spawn()
            .unwrap();
        Self {
            child,
            admin_port,
            log,
        }
    }

    /// Waits up to 10 s for `/ready` to answer 200; else panics with the exit status,
    /// if any, and the log.
    pub async fn ready(&mut self) {
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(&c, self.admin_port, "/ready").await.0 != 200 {
            if Instant::now() >= deadline {
                let status = self.child.try_wait().unwrap();
                let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
                panic!("the sidecar never became ready (exited: {status:?}); its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to 10 s until `state_dir` keeps the config of `version`. The sidecar keeps
/// a config just after it starts serving it, so a test that restarts one must wait.
pub async fn wait_until_kept(state_dir: &Path, version: u64) {
    let dir = trimtab_sidecar::config_source::StateDir::new(state_dir.to_path_buf());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let kept = dir.load().ok().flatten().map(|config| config.version);
        if kept == Some(version) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "version {version} was never kept in {}: {kept:?}",
            state_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A route with test-friendly defaults: no retries, fast backoff.
pub fn route(name: &str, port: u16, algorithm: Algorithm, backends: &[&Backend]) -> Route {
    Route {
        namespace: "test".into(),
        name: name.into(),
        listener: Listener {
            port,
            protocol: Default::default(),
        },
        algorithm,
        endpoints: backends
            .iter()
            .map(|b| Endpoint::new(b.address()))
            .collect(),
        weighting: Weighting::default(),
        health_check: None,
        outlier_detection: OutlierDetection {
            consecutive_errors: 0,
            ..OutlierDetection::default()
        },
        retries: Retries {
            attempts: 0,
            ..Retries::default()
        },
        timeouts: Timeouts::default(),
        limits: Limits::default(),
        llm: None,
    }
}

pub fn options() -> Options {
    Options {
        listen_address: "127.0.0.1".parse().unwrap(),
        max_request_body: 1024 * 1024,
        max_header_bytes: 16 * 1024,
        state_dir: None,
    }
}

/// A sidecar serving `routes` on 127.0.0.1.
pub async fn sidecar(routes: Vec<Route>) -> Arc<Sidecar> {
    let sidecar = Sidecar::new(options(), Metrics::new().unwrap());
    sidecar
        .apply(SidecarConfig { version: 1, routes })
        .await
        .unwrap();
    sidecar
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// GET `path` on 127.0.0.1:`port`: status, x-backend header and body.
pub async fn get(client: &TestClient, port: u16, path: &str) -> (u16, String, String) {
    send(
        client,
        Request::get(format!("http://127.0.0.1:{port}{path}"))
            .body(Full::default())
            .unwrap(),
    )
    .await
}

pub async fn send(client: &TestClient, request: Request<Full<Bytes>>) -> (u16, String, String) {
    match client.request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let backend = response
                .headers()
                .get("x-backend")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            (status, backend, String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (0, String::new(), format!("client error: {e}")),
    }
}

/// Writes `raw` to 127.0.0.1:`port` and returns what comes back until the connection
/// closes (or 2 s pass).
pub async fn raw_exchange(port: u16, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends a GET on `stream` and reads its whole response (Content-Length framed);
/// returns the status line's code and the body.
pub async fn exchange_on(stream: &mut TcpStream, path: &str) -> (u16, String) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: shop\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0_u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert_ne!(n, 0, "closed mid-response");
        received.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a content-length");
            if body.len() >= length {
                return (head[9..12].parse().unwrap(), body.to_owned());
            }
        }
    }
}

/// Sends `count` sequential GETs (stopping early after `max_time`) and counts answers
/// by backend name; returns also the number of non-200 answers.
pub async fn spread(
    client: &TestClient,
    port: u16,
    count: usize,
    max_time: Duration,
) -> (std::collections::HashMap<String, usize>, usize) {
    let deadline = Instant::now() + max_time;
    let mut by_backend = std::collections::HashMap::new();
    let mut failures = 0;
    for _ in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let (status, backend, _) = get(client, port, "/").await;
        if status == 200 {
            *by_backend.entry(backend).or_insert(0) += 1;
        } else {
            failures += 1;
        }
    }
    (by_backend, failures)
}
