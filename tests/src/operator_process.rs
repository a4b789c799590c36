//! The workspace's binaries as real processes: `trimtab-operator` against the test
//! cluster, so a test can kill and restart it the way a node failure would.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::process::{Child, Command};

use crate::cluster::TestCluster;

/// An HTTP/1.1 client of the operator's config server that trusts `ca_pem` (the test
/// certificate, or the operator's own CA) and nothing else.
pub fn https_client<B>(ca_pem: &str) -> HttpClient<hyper_rustls::HttpsConnector<HttpConnector>, B>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA PEM"))
        .expect("CA accepted");
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    HttpClient::builder(TokioExecutor::new()).build(connector)
}

/// Builds (a no-op when fresh) and returns the path of binary `bin` of package
/// `package`, next to the running test executable. Building here keeps
/// `cargo test -p trimtab-tests` from running a stale binary.
pub fn workspace_binary(package: &str, bin: &str) -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = std::process::Command::new(&cargo);
    // Cargo runs this test with the variables of *this* package set; build scripts that
    // watch one of them (ring's watches CARGO_MANIFEST_DIR) would then rebuild, here and
    // again in the next build outside a test: minutes of TLS crates each time.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    let status = command
        .args(["build", "--locked", "--quiet", "-p", package, "--bin", bin])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .map_err(|e| format!("running {cargo} build: {e}"))?;
    if !status.success() {
        return Err(format!(
            "cargo build -p {package} --bin {bin} failed: {status}"
        ));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/<profile>/deps/<test> → target/<profile>/<bin>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(bin))
        .ok_or_else(|| format!("no target directory above {}", exe.display()))?;
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("{} was not built", path.display()))
    }
}

pub use trimtab_test_ports::free_addr;

/// A serving certificate for 127.0.0.1 and localhost, written as PEM files.
#[derive(Debug)]
pub struct ServingCert {
    /// The certificate (also the CA clients trust: it is self-signed).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The certificate as PEM.
    pub pem: String,
}

impl ServingCert {
    /// Makes one in `dir`.
    pub fn write(dir: &Path) -> Self {
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("certificate");
        let cert = dir.join("config-server.crt");
        let key = dir.join("config-server.key");
        std::fs::write(&cert, made.cert.pem()).expect("write certificate");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key");
        Self {
            cert,
            key,
            pem: made.cert.pem(),
        }
    }
}

/// A running `trimtab-operator`.
#[derive(Debug)]
pub struct OperatorProcess {
    /// `None` only while it restarts.
    child: std::sync::Mutex<Option<Child>>,
    /// How it was started, to start it again.
    command: StartCommand,
    /// The config server's address.
    pub config_addr: SocketAddr,
    /// The admin server's address.
    pub admin_addr: SocketAddr,
    /// Where its log goes.
    pub log: PathBuf,
}

impl OperatorProcess {
    /// Starts replica `instance` with its Lease in `namespace`, serving config on
    /// `config_addr` with `cert`, logging to `<cluster dir>/<instance>.log`.
    pub async fn start(
        cluster: &TestCluster,
        namespace: &str,
        instance: &str,
        config_addr: SocketAddr,
        cert: &ServingCert,
    ) -> Self {
        Self::start_with(cluster, namespace, instance, config_addr, Some(cert), &[]).await
    }

    /// [`Self::start`] with extra `TRIMTAB_*` environment, as the chart sets it. Without
    /// `cert` the environment says where the certificate comes from (e.g.
    /// `TRIMTAB_TLS_SECRET`: the operator's own CA).
    pub async fn start_with(
        cluster: &TestCluster,
        namespace: &str,
        instance: &str,
        config_addr: SocketAddr,
        cert: Option<&ServingCert>,
        env: &[(&str, &str)],
    ) -> Self {
        let admin_addr = free_addr();
        let log = cluster.dir().join(format!("{instance}.log"));
        let mut args = vec![
            "--instance".to_owned(),
            instance.to_owned(),
            "--namespace".to_owned(),
            namespace.to_owned(),
            format!("--config-addr={config_addr}"),
            format!("--admin-addr={admin_addr}"),
        ];
        if let Some(cert) = cert {
            args.push(format!("--tls-cert-file={}", cert.cert.display()));
            args.push(format!("--tls-key-file={}", cert.key.display()));
        }
        let mut envs = vec![
            (
                "KUBECONFIG".to_owned(),
                cluster.kubeconfig_path().display().to_string(),
            ),
            (
                "TRIMTAB_LOG".to_owned(),
                "info,trimtab_operator=debug".to_owned(),
            ),
        ];
        envs.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let command = StartCommand {
            binary: workspace_binary("trimtab-operator", "trimtab-operator").expect("operator"),
            args,
            envs,
            log: log.clone(),
        };
        let operator = Self {
            child: std::sync::Mutex::new(Some(command.spawn())),
            command,
            config_addr,
            admin_addr,
            log,
        };
        operator.wait_until_listening().await;
        operator
    }

    /// SIGKILL, then the same process again (same instance, addresses and
    /// environment, the log appended): a crash and restart of its pod.
    pub async fn restart(&self) {
        let old = self.lock_child().take();
        if let Some(mut old) = old {
            let _ = old.kill().await;
        }
        *self.lock_child() = Some(self.command.spawn());
        self.wait_until_listening().await;
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn wait_until_listening(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(self.config_addr)
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "operator did not listen on {} within 30 s; log:\n{}",
                self.config_addr,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id, e.g. to read its RSS from `/proc`.
    pub fn pid(&self) -> Option<u32> {
        self.lock_child().as_ref().and_then(Child::id)
    }

    /// User + system CPU seconds so far (USER_HZ is 100 on Linux); 0 once it exited.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = self
            .pid()
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.split(' ').collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        // After the command: state is field 3, utime 14 and stime 15 (1-based) → 11, 12.
        ticks(11).unwrap_or(0.0) / 100.0 + ticks(12).unwrap_or(0.0) / 100.0
    }

    /// VmRSS and VmHWM (the peak), in MB; NaN once it exited.
    pub fn memory_mb(&self) -> (f64, f64) {
        let status = self
            .pid()
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .unwrap_or_default();
        let kb = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
    }

    /// SIGKILL, as when its node dies.
    pub async fn kill(self) {
        let child = self.lock_child().take();
        if let Some(mut child) = child {
            let _ = child.kill().await;
        }
    }
}

/// What starts the operator process.
#[derive(Debug)]
struct StartCommand {
    binary: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
}

impl StartCommand {
    fn spawn(&self) -> Child {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        Command::new(&self.binary)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .args(&self.args)
            // tracing writes to stdout: both go to the log.
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("operator starts")
    }
}
