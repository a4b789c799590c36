//! `trimtab-bots` stopped by a signal or by an operator's abort at the end of the run,
//! as real processes on 127.0.0.1: a small HTTP target whose `/slow` answers only after
//! 30 s (the closing invariant check to cut short), and a fake operator that speaks the
//! runner protocol over TLS. In a pod the runner is PID 1, which the kernel gives no
//! default signal disposition, so without its own handler a SIGTERM would be ignored;
//! these tests check that the handler stops the run, still writes and delivers its
//! results, and exits 6 (a second signal: at once, 143).

use std::{
    convert::Infallible,
    io::{BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde_json::json;
use trimtab_api::{
    results::Results,
    runner_protocol::{Directive, RunnerReport, RunnerStage, unix_micros},
};
use trimtab_tests::operator_process::{ServingCert, workspace_binary};

/// How long `/slow` takes: far longer than any test waits for an exit.
const SLOW: Duration = Duration::from_secs(30);
/// How long a stopped runner may take to exit.
const PROMPTLY: Duration = Duration::from_secs(3);

/// The target on 127.0.0.1: `/fast` answers at once, `/slow` after [`SLOW`].
struct Target {
    addr: SocketAddr,
    /// Requests to `/fast` received.
    fast: Arc<AtomicU64>,
    /// Requests to `/slow` received (each still waiting for its answer).
    slow: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Target {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("local address");
        let (fast, slow) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let accept = {
            let (fast, slow) = (fast.clone(), slow.clone());
            // Ends when the test drops the target (which aborts it).
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (fast, slow) = (fast.clone(), slow.clone());
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (fast, slow) = (fast.clone(), slow.clone());
                        async move {
                            if request.uri().path() == "/slow" {
                                slow.fetch_add(1, SeqCst);
                                tokio::time::sleep(SLOW).await;
                            } else {
                                fast.fetch_add(1, SeqCst);
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"{\"ok\":true}",
                            ))))
                        }
                    });
                    tokio::spawn(async move {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        Self {
            addr,
            fast,
            slow,
            accept,
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// What the fake operator heard and what it answers.
#[derive(Debug, Default)]
struct OperatorState {
    /// Every report, in arrival order.
    reports: Vec<RunnerReport>,
    /// Answered to every running report once set.
    abort: Option<String>,
    /// Answer final reports with 503 (as a replica that is not the leader does).
    refuse_final: bool,
}

impl OperatorState {
    /// The status and body for `report`: start at once, abort when told to.
    fn answer(&mut self, report: RunnerReport) -> (u16, String) {
        let directive = match report.stage {
            RunnerStage::Waiting => Directive {
                start_at_unix_micros: Some(unix_micros(SystemTime::now())),
                ..Directive::default()
            },
            RunnerStage::Running => Directive {
                abort: self.abort.clone(),
                ..Directive::default()
            },
            RunnerStage::Finished if self.refuse_final => {
                self.reports.push(report);
                return (503, "not the leader".to_owned());
            }
            RunnerStage::Finished => Directive::default(),
        };
        self.reports.push(report);
        (
            200,
            serde_json::to_string(&directive).expect("a directive encodes"),
        )
    }

    fn finished(&self) -> Vec<&RunnerReport> {
        self.reports
            .iter()
            .filter(|r| r.stage == RunnerStage::Finished)
            .collect()
    }
}

/// The operator's runner endpoint over TLS on 127.0.0.1, one thread per connection
/// (the runner speaks HTTP/1.1 with keep-alive, a request at a time).
struct FakeOperator {
    url: String,
    cert: ServingCert,
    state: Arc<Mutex<OperatorState>>,
    stop: Arc<AtomicBool>,
}

impl FakeOperator {
    fn start(dir: &Path) -> Self {
        let cert = ServingCert::write(dir);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_file(&cert.cert).expect("certificate PEM")],
            PrivateKeyDer::from_pem_file(&cert.key).expect("key PEM"),
        )
        .expect("a serving certificate");
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let url = format!("https://{}", listener.local_addr().expect("local address"));
        listener.set_nonblocking(true).expect("non-blocking");
        let state = Arc::new(Mutex::new(OperatorState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                // Until the test ends, and five minutes at most.
                let until = Instant::now() + Duration::from_secs(300);
                while !stop.load(SeqCst) && Instant::now() < until {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (config, state) = (config.clone(), state.clone());
                            std::thread::spawn(move || serve(stream, config, &state));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        Self {
            url,
            cert,
            state,
            stop,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, OperatorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The flags that put `trimtab-bots` under this operator.
    fn args(&self) -> Vec<String> {
        [
            "--control-plane",
            &self.url,
            "--control-plane-ca",
            self.cert.cert.to_str().expect("utf-8 path"),
            "--test",
            "load/signals",
            "--token",
            "runner-token",
            "--report-interval",
            "200ms",
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

impl Drop for FakeOperator {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// Answers the reports of one connection: at most 10,000, until the client closes it
/// or is silent for 10 s.
fn serve(
    stream: std::net::TcpStream,
    config: Arc<rustls::ServerConfig>,
    state: &Mutex<OperatorState>,
) {
    let Ok(()) = stream.set_nonblocking(false) else {
        return;
    };
    let Ok(()) = stream.set_read_timeout(Some(Duration::from_secs(10))) else {
        return;
    };
    let Ok(connection) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = BufReader::new(rustls::StreamOwned::new(connection, stream));
    for _ in 0..10_000 {
        let Some(body) = read_request(&mut tls) else {
            return;
        };
        let (status, body) = match serde_json::from_slice::<RunnerReport>(&body) {
            Ok(report) => state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .answer(report),
            Err(e) => (400, format!("not a report: {e}")),
        };
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let out = tls.get_mut();
        if out.write_all(response.as_bytes()).is_err() || out.flush().is_err() {
            return;
        }
    }
}

/// One request's body; `None` once the connection is closed or broken.
fn read_request(tls: &mut impl std::io::BufRead) -> Option<Vec<u8>> {
    let mut length = 0;
    let mut first = true;
    // A request line, at most 100 headers and the blank line.
    for _ in 0..102 {
        let mut line = String::new();
        if tls.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() && !first {
            let mut body = vec![0; length];
            tls.read_exact(&mut body).ok()?;
            return Some(body);
        }
        first = false;
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    None
}

/// A LoadTest spec: two users browsing `/fast` every 20 ms for `duration`, and an
/// invariant on `/slow` checked only at the end (`every` is longer than any run here).
fn write_spec(dir: &Path, duration: &str) -> PathBuf {
    let spec = json!({
        "target": {"url": "http://127.0.0.1:1"},
        "workload": {"users": 2, "duration": duration},
        "scenario": {
            "start": "browse",
            "thinkTime": {"distribution": "constant", "mean": "20ms"},
            "states": [
                {"name": "browse",
                 "request": {"method": "GET", "path": "/fast"},
                 "checks": ["response.status == 200"],
                 "next": [{"state": "browse"}]}
            ]
        },
        "invariants": [
            {"name": "ledger", "request": {"method": "GET", "path": "/slow"},
             "expect": "response.status == 200", "every": "1h"}
        ]
    });
    let file = dir.join("loadtest.yaml");
    // JSON is YAML.
    std::fs::write(&file, spec.to_string()).expect("write the spec");
    file
}

/// The `trimtab-bots` binary, built first if need be. Each test asks for it before it
/// starts anything with a time limit: on a fresh clone that build takes minutes.
fn bots_binary() -> PathBuf {
    workspace_binary("trimtab-sidecar", "trimtab-bots").expect("trimtab-bots")
}

/// `bots run` against `target`, writing its results to `json`.
fn start_bots(
    bots: &Path,
    spec: &Path,
    target: &Target,
    json: &Path,
    extra: &[String],
) -> tokio::process::Child {
    tokio::process::Command::new(bots)
        .arg("run")
        .arg(spec)
        .args(["--target", &format!("http://{}", target.addr)])
        .args(["--request-timeout", "20s"])
        .arg("--json")
        .arg(json)
        .args(extra)
        .env_remove("JOB_COMPLETION_INDEX")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("trimtab-bots starts")
}

/// Sends `signal` (TERM, INT) to the process `pid` with kill(1).
fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -s {signal} {pid}: {status}");
}

/// Polls `done` every 20 ms until it holds; panics after `limit`.
async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits at most `limit` for the exit; returns the output and how long it took.
async fn exit_within(child: tokio::process::Child, limit: Duration) -> (Output, Duration) {
    let since = Instant::now();
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("trimtab-bots still running {limit:?} after the stop"))
        .expect("exit status");
    (output, since.elapsed())
}

fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn read_results(path: &Path) -> Results {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).expect("--json holds results")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_local_run_writes_its_results_and_exits_6() {
    let bots = bots_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let target = Target::start().await;
    let json = dir.path().join("results.json");
    let child = start_bots(&bots, &write_spec(dir.path(), "60s"), &target, &json, &[]);
    let pid = child.id().expect("a pid");

    wait_until("20 requests at the target", Duration::from_secs(20), || {
        target.fast.load(SeqCst) >= 20
    })
    .await;
    send_signal(pid, "TERM");
    let (output, took) = exit_within(child, PROMPTLY).await;

    assert_eq!(output.status.code(), Some(6), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    let results = read_results(&json);
    assert!(results.requests >= 20, "{} requests", results.requests);
    assert!(
        results.requests <= target.fast.load(SeqCst),
        "{} requests recorded, {} at the target",
        results.requests,
        target.fast.load(SeqCst)
    );
    assert_eq!(
        target.slow.load(SeqCst),
        0,
        "a stopped run makes no closing checks"
    );
    assert!(took < PROMPTLY, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_the_operator_delivers_the_final_results_and_exits_6() {
    let bots = bots_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let target = Target::start().await;
    let operator = FakeOperator::start(dir.path());
    let json = dir.path().join("results.json");
    let child = start_bots(
        &bots,
        &write_spec(dir.path(), "60s"),
        &target,
        &json,
        &operator.args(),
    );
    let pid = child.id().expect("a pid");

    wait_until(
        "a running report and 20 requests",
        Duration::from_secs(20),
        || {
            target.fast.load(SeqCst) >= 20
                && operator
                    .state()
                    .reports
                    .iter()
                    .any(|r| r.stage == RunnerStage::Running)
        },
    )
    .await;
    send_signal(pid, "TERM");
    let (output, _) = exit_within(child, PROMPTLY).await;

    assert_eq!(output.status.code(), Some(6), "{}", describe(&output));
    let written = read_results(&json);
    let state = operator.state();
    let finished = state.finished();
    assert_eq!(finished.len(), 1, "one final report");
    let delivered = finished[0].results.as_ref().expect("final results");
    assert!(delivered.requests >= 20, "{} requests", delivered.requests);
    assert_eq!(delivered.requests, written.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once_while_the_final_results_are_retried() {
    let bots = bots_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let target = Target::start().await;
    let operator = FakeOperator::start(dir.path());
    operator.state().refuse_final = true;
    let json = dir.path().join("results.json");
    let child = start_bots(
        &bots,
        &write_spec(dir.path(), "60s"),
        &target,
        &json,
        &operator.args(),
    );
    let pid = child.id().expect("a pid");

    wait_until("10 requests at the target", Duration::from_secs(20), || {
        target.fast.load(SeqCst) >= 10
    })
    .await;
    send_signal(pid, "TERM");
    // It keeps retrying the refused final report (for a minute) ...
    wait_until("a refused final report", PROMPTLY, || {
        !operator.state().finished().is_empty()
    })
    .await;
    assert!(json.exists(), "the results are written before delivery");
    // ... until the second signal.
    send_signal(pid, "TERM");
    let (output, took) = exit_within(child, Duration::from_secs(2)).await;

    assert_eq!(output.status.code(), Some(143), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SIGTERM after SIGTERM"), "{stderr}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_abort_during_the_closing_checks_ends_the_run_at_once() {
    let bots = bots_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let target = Target::start().await;
    let operator = FakeOperator::start(dir.path());
    let json = dir.path().join("results.json");
    let child = start_bots(
        &bots,
        &write_spec(dir.path(), "1s"),
        &target,
        &json,
        &operator.args(),
    );

    // After the deadline the closing check of `ledger` waits for /slow; only an
    // answer to a report can abort it now.
    wait_until("the closing check", Duration::from_secs(20), || {
        target.slow.load(SeqCst) == 1
    })
    .await;
    operator.state().abort = Some("the test was stopped".to_owned());
    let (output, took) = exit_within(child, PROMPTLY).await;

    assert_eq!(output.status.code(), Some(4), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("aborted by the guard: the test was stopped"),
        "{stderr}"
    );
    let state = operator.state();
    let finished = state.finished();
    assert_eq!(finished.len(), 1, "one final report");
    let delivered = finished[0].results.as_ref().expect("final results");
    assert!(delivered.requests > 0);
    assert_eq!(
        delivered.invariants.get("ledger").map(|i| i.checks),
        Some(0),
        "the cut-short check records nothing"
    );
    assert!(took < PROMPTLY, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_during_the_closing_checks_ends_a_local_run_at_once() {
    let bots = bots_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let target = Target::start().await;
    let json = dir.path().join("results.json");
    let child = start_bots(&bots, &write_spec(dir.path(), "1s"), &target, &json, &[]);
    let pid = child.id().expect("a pid");

    wait_until("the closing check", Duration::from_secs(20), || {
        target.slow.load(SeqCst) == 1
    })
    .await;
    send_signal(pid, "INT");
    let (output, took) = exit_within(child, PROMPTLY).await;

    assert_eq!(output.status.code(), Some(6), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stopped by SIGINT"), "{stderr}");
    let results = read_results(&json);
    assert!(results.requests > 0);
    assert_eq!(results.invariants.get("ledger").map(|i| i.checks), Some(0));
    assert!(took < PROMPTLY, "{took:?}");
}
