//! A real Prometheus server (Debian's `prometheus` package) for tests that read CPU the
//! way a cluster does, and a small exporter whose per-pod CPU the test sets.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

/// Why Prometheus could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    /// The binary is missing (`.ci/run` installs it with apt).
    #[error("starting {binary}: {source} (install it with `apt-get install prometheus`)")]
    Spawn {
        /// The binary run.
        binary: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file or port could not be set up.
    #[error("setting up Prometheus: {0}")]
    Io(#[from] std::io::Error),
    /// It did not become ready.
    #[error("Prometheus on port {port} not ready after 30s; log: {log}")]
    NotReady {
        /// Its port.
        port: u16,
        /// The end of its log.
        log: String,
    },
}

/// A Prometheus process scraping one target every second. Killed on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `target` (host:port) every
    /// second, and waits until it is ready.
    pub async fn start(target: SocketAddr) -> Result<Self, PrometheusError> {
        let binary = std::env::var("TRIMTAB_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let dir = tempfile::tempdir()?;
        let port = trimtab_test_ports::try_free_port()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n- job_name: cpu\n  static_configs: [{{targets: ['{target}']}}]\n"
            ),
        )?;
        let log_path: PathBuf = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|source| PrometheusError::Spawn { binary, source })?;
        let prometheus = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let request = format!("GET /-/ready HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
                let mut answer = String::new();
                if stream.write_all(request.as_bytes()).await.is_ok()
                    && stream.read_to_string(&mut answer).await.is_ok()
                    && answer.starts_with("HTTP/1.0 200")
                {
                    return Ok(prometheus);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(PrometheusError::NotReady {
            port,
            log: std::fs::read_to_string(&log_path).unwrap_or_default(),
        })
    }

    /// The base URL of its HTTP API.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves `container_cpu_usage_seconds_total` for pods whose CPU use (in cores) the test
/// sets: each counter grows at its pod's rate, as cAdvisor's does.
#[derive(Clone, Debug, Default)]
pub struct CpuExporter {
    pods: Arc<Mutex<BTreeMap<String, PodCpu>>>,
}

/// One pod's counter: it had `value` CPU-seconds at `since` and grows by `cores`.
#[derive(Debug)]
struct PodCpu {
    namespace: String,
    cores: f64,
    value: f64,
    since: Instant,
}

impl PodCpu {
    fn total(&self, now: Instant) -> f64 {
        self.value + self.cores * now.duration_since(self.since).as_secs_f64()
    }
}

impl CpuExporter {
    /// Starts serving `/metrics` on a free loopback port.
    pub async fn start() -> std::io::Result<(Self, SocketAddr)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let exporter = Self::default();
        let served = exporter.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let exporter = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let body = exporter.render();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok((exporter, addr))
    }

    /// From now on, `pod` in `namespace` uses `cores` CPU.
    pub fn set_cores(&self, namespace: &str, pod: &str, cores: f64) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let value = pods.get(pod).map(|p| p.total(now)).unwrap_or(0.0);
        pods.insert(
            pod.to_owned(),
            PodCpu {
                namespace: namespace.to_owned(),
                cores,
                value,
                since: now,
            },
        );
    }

    fn render(&self) -> String {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut out = String::from("# TYPE container_cpu_usage_seconds_total counter\n");
        for (pod, cpu) in pods.iter() {
            out.push_str(&format!(
                "container_cpu_usage_seconds_total{{namespace=\"{}\",pod=\"{pod}\",container=\"app\"}} {}\n",
                cpu.namespace,
                cpu.total(now)
            ));
        }
        out
    }
}
