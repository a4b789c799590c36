//! A real etcd and kube-apiserver per test run, the way controller-runtime's *envtest*
//! serves Go operators: every test that needs the Kubernetes API calls
//! [`TestCluster::start`] and gets a fresh, empty API server on free loopback ports,
//! with an admin [`kube::Client`], a kubeconfig for `kubectl` and `helm`, and a way to
//! act as any other user ([`TestCluster::client_as`]).
//!
//! # What runs, and what does not
//!
//! Only etcd and kube-apiserver, unless a test asks for more: kube-controller-manager
//! with chosen controllers ([`TestCluster::start_controller_manager`]) and a stand-in
//! kubelet that runs Pods as local processes ([`crate::node_agent`]). Without them (as
//! with envtest):
//!
//! - Pods stay `Pending` forever unless a test writes their `status` itself.
//! - No controller creates the `default` ServiceAccount of a new namespace, yet the
//!   `ServiceAccount` admission plugin stays *enabled* (we test token projection), and it
//!   rejects every Pod whose ServiceAccount does not exist with 403 *"error looking up
//!   service account"*. Create namespaces with [`TestCluster::ensure_namespace`], which
//!   creates the `default` ServiceAccount too.
//! - Deleted namespaces stay `Terminating` (the namespace controller would empty them),
//!   Jobs create no Pods, garbage collection of owned objects never happens.
//! - The binaries of kube-controller-manager, kubectl and helm are built alongside and
//!   found in [`TestCluster::bin_dir`] for tests that need a controller or a chart.
//!
//! # Cost
//!
//! Measured on the 2-core development machine with Kubernetes v1.36.3 and etcd v3.6.8:
//!
//! - Cold build of all five binaries by `tests/cluster/build.sh` on a fresh machine
//!   (module downloads plus `go build`, with Rust crates compiling alongside): 18 min 31 s.
//!   The result is cached by the pinned versions, so every later run only checks that the
//!   files exist.
//! - Warm [`TestCluster::start`] (binaries cached) until `/readyz` is ok and the
//!   `default` namespace exists: 2.9 to 3.8 s (five runs); four clusters started at once
//!   took 7 s.
//!
//! # Debugging a failed test
//!
//! The temporary directory ([`TestCluster::dir`]) holds `etcd.log`, `kube-apiserver.log`,
//! every certificate and the kubeconfigs. It is removed when the [`TestCluster`] is
//! dropped, unless the test is panicking or `TRIMTAB_KEEP_CLUSTER=1` is set (then its path
//! is printed to stderr), or [`TestCluster::start`] failed (the error names the log). The
//! servers themselves always stop with the [`TestCluster`], or with the test process if it
//! is killed: each runs under a watchdog shell that kills it when our end of a pipe closes.

use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Environment variable naming a directory that already holds the binaries; skips
/// `tests/cluster/build.sh` (for machines that bring their own, or a CI cache).
pub const BIN_DIR_ENV: &str = "TRIMTAB_TESTCLUSTER_BIN";
/// Environment variable that, set to `1`, keeps the temporary directory (logs, certificates,
/// kubeconfigs) of every cluster, not only of failed tests.
pub const KEEP_ENV: &str = "TRIMTAB_KEEP_CLUSTER";
/// The audience that Trimtab's projected service-account tokens carry, accepted by the API
/// server next to its own issuer.
pub const TRIMTAB_AUDIENCE: &str = "trimtab";

/// How long the API server may take to become ready. A warm start takes a few seconds;
/// the margin is for a 2-core machine running several test binaries at once.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two readiness probes.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Upper bound for one readiness probe, so a server that accepts but never answers still
/// lets the loop notice the deadline and a dead process.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Startup attempts. Free ports are found by binding port 0 and releasing it, so another
/// process can take one before our server binds it; a fresh set of ports then succeeds.
const START_ATTEMPTS: usize = 3;
/// How long `Drop` waits for a killed server to be reaped before killing its watchdog shell.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of a server log quoted in an error.
const LOG_TAIL_LINES: usize = 30;

/// What can go wrong while building, starting or talking to the test cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `tests/cluster/build.sh` failed or printed no directory.
    #[error("building the test cluster binaries with `bash {script}` failed: {reason}")]
    Build {
        /// The build script that was run.
        script: PathBuf,
        /// What went wrong (exit status, missing output); its own output is on stderr.
        reason: String,
    },
    /// A binary is missing from the bin directory.
    #[error(
        "binary {path} does not exist or is not a file (bin dir from {source_of_dir}); \
         rerun tests/cluster/build.sh or fix {BIN_DIR_ENV}"
    )]
    MissingBinary {
        /// Where the binary was expected.
        path: PathBuf,
        /// Where the bin directory came from: the build script or the environment variable.
        source_of_dir: &'static str,
    },
    /// A file-system operation on the cluster's directory failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "writing".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No free loopback port could be reserved.
    #[error("finding a free port on 127.0.0.1: {0}")]
    FreePort(#[source] std::io::Error),
    /// A certificate or key could not be generated.
    #[error("generating the {what}: {reason}")]
    Certificate {
        /// Which certificate or key.
        what: String,
        /// rcgen's error, or what was wrong with the DER it produced.
        reason: String,
    },
    /// A server process could not be started.
    #[error("starting {binary} for {server}: {source}")]
    Spawn {
        /// "etcd" or "kube-apiserver".
        server: &'static str,
        /// The binary.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A server process exited before the cluster was ready.
    #[error(
        "{server} (port {port}) exited with {status} before the API server was ready; last lines of {log}:\n{tail}"
    )]
    Exited {
        /// "etcd" or "kube-apiserver".
        server: &'static str,
        /// The port it was told to serve on.
        port: u16,
        /// Its exit status.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// The API server did not become ready in time.
    #[error(
        "kube-apiserver at {url} was not ready after {waited:?} (last answer: {last_answer}); last lines of {log}:\n{tail}"
    )]
    NotReady {
        /// The server URL.
        url: String,
        /// How long we waited.
        waited: Duration,
        /// The last `/readyz` body or error.
        last_answer: String,
        /// The API server log file.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// A kubeconfig could not be turned into a client.
    #[error("building a kube client from {path}: {reason}")]
    Client {
        /// The kubeconfig.
        path: PathBuf,
        /// kube's error.
        reason: String,
    },
    /// A request to the API server failed.
    #[error("{action}: {source}")]
    Api {
        /// What was requested, e.g. "creating namespace foo".
        action: String,
        /// kube's error.
        #[source]
        source: kube::Error,
    },
}

impl ClusterError {
    /// True when a server died because another process took its port between our probe
    /// and its bind, the one failure that a retry with fresh ports fixes.
    fn is_port_taken(&self) -> bool {
        matches!(self, ClusterError::Exited { tail, .. } if tail.contains("address already in use"))
    }
}

/// A running etcd + kube-apiserver pair on loopback, stopped and cleaned up on drop.
pub struct TestCluster {
    /// Started on demand by [`TestCluster::start_controller_manager`]; stopped first.
    controller_manager: Option<ServerProcess>,
    /// Stopped before `dir` is removed (see `Drop`), so no server writes into a removed
    /// directory.
    apiserver: ServerProcess,
    etcd: ServerProcess,
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    server_url: String,
    ca_pem: String,
    service_account_issuer: String,
    kubeconfig: PathBuf,
    client: kube::Client,
}

impl fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCluster")
            .field("server_url", &self.server_url)
            .field("dir", &self.dir.path())
            .field("bin_dir", &self.bin_dir)
            .field("etcd", &self.etcd)
            .field("apiserver", &self.apiserver)
            .finish_non_exhaustive()
    }
}

impl TestCluster {
    /// Builds (or finds cached) the binaries, starts etcd and kube-apiserver on free
    /// loopback ports, and returns once `/readyz` is ok and the `default` namespace exists.
    ///
    /// Makes up to three attempts, with fresh ports each time, when a server finds its
    /// port taken by another process.
    pub async fn start() -> Result<TestCluster, ClusterError> {
        let bin_dir = binaries().await?;
        let mut attempt = 1;
        loop {
            match Self::start_once(bin_dir.clone()).await {
                Err(err) if err.is_port_taken() && attempt < START_ATTEMPTS => {
                    tracing::warn!(attempt, "test cluster port was taken, retrying: {err}");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(bin_dir: PathBuf) -> Result<TestCluster, ClusterError> {
        let dir = tempfile::Builder::new()
            .prefix("trimtab-cluster-")
            .tempdir()
            .map_err(|source| ClusterError::Io {
                action: "creating a temporary directory in",
                path: std::env::temp_dir(),
                source,
            })?;
        let root = dir.path().to_path_buf();
        let pki = Pki::generate()?;
        pki.write(&root)?;

        // Reserve all three ports at once so they are distinct from each other.
        let [etcd_client_port, etcd_peer_port, apiserver_port] = free_ports()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_client_port}");
        let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let server_url = format!("https://127.0.0.1:{apiserver_port}");
        // The issuer is the API server's own URL, as on a real cluster, so the
        // OIDC discovery document it serves is consistent with the tokens it signs.
        let service_account_issuer = server_url.clone();

        let etcd = ServerProcess::spawn(
            "etcd",
            &bin_dir.join("etcd"),
            &[
                format!("--data-dir={}", root.join("etcd-data").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={etcd_peer_url}"),
                format!("--initial-advertise-peer-urls={etcd_peer_url}"),
                format!("--initial-cluster=default={etcd_peer_url}"),
                // Test data is thrown away: durability only costs time.
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            etcd_client_port,
            root.join("etcd.log"),
        )?;

        let path = |name: &str| root.join(name).display().to_string();
        let apiserver = ServerProcess::spawn(
            "kube-apiserver",
            &bin_dir.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                format!("--cert-dir={}", path("apiserver-certs")),
                format!("--tls-cert-file={}", path(files::SERVING_CERT)),
                format!("--tls-private-key-file={}", path(files::SERVING_KEY)),
                format!("--secure-port={apiserver_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--allow-privileged=true".into(),
                "--authorization-mode=RBAC".into(),
                format!("--client-ca-file={}", path(files::CLIENT_CA_CERT)),
                format!("--service-account-issuer={service_account_issuer}"),
                format!(
                    "--service-account-key-file={}",
                    path(files::SERVICE_ACCOUNT_PUBLIC_KEY)
                ),
                format!(
                    "--service-account-signing-key-file={}",
                    path(files::SERVICE_ACCOUNT_KEY)
                ),
                format!("--api-audiences={service_account_issuer},{TRIMTAB_AUDIENCE}"),
                // Nothing here needs request fairness, and its bootstrap objects are
                // one more post-start hook that `/readyz` waits for.
                "--enable-priority-and-fairness=false".into(),
                "--profiling=false".into(),
            ],
            apiserver_port,
            root.join("kube-apiserver.log"),
        )?;

        let kubeconfig = root.join(files::ADMIN_KUBECONFIG);
        let (admin_cert, admin_key) = admin_identity(&pki.client_ca)?;
        write_identity(
            &root,
            "admin",
            &admin_cert,
            &admin_key,
            &server_url,
            &kubeconfig,
        )?;
        let client = client_from_kubeconfig(&kubeconfig).await?;

        let mut cluster = TestCluster {
            controller_manager: None,
            apiserver,
            etcd,
            dir,
            bin_dir,
            server_url,
            ca_pem: pki.serving_ca_pem,
            service_account_issuer,
            kubeconfig,
            client,
        };
        if let Err(err) = cluster.wait_until_ready().await {
            // Keep the logs that the error points to, except after a port collision,
            // which the caller retries and which would only litter the temp dir.
            if !err.is_port_taken() {
                cluster.dir.disable_cleanup(true);
            }
            return Err(err);
        }
        Ok(cluster)
    }

    /// Polls `/readyz` and then the `default` namespace (created by the API server's
    /// bootstrap controller shortly after it serves), failing fast if a server dies.
    async fn wait_until_ready(&mut self) -> Result<(), ClusterError> {
        let started = Instant::now();
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        loop {
            self.etcd.fail_if_exited()?;
            self.apiserver.fail_if_exited()?;
            let last_answer =
                match tokio::time::timeout(READY_PROBE_TIMEOUT, self.probe(&namespaces)).await {
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Ok(Some(answer)) | Err(answer)) => answer,
                    Err(_) => format!("no answer within {READY_PROBE_TIMEOUT:?}"),
                };
            if started.elapsed() > READY_TIMEOUT {
                return Err(ClusterError::NotReady {
                    url: self.server_url.clone(),
                    waited: started.elapsed(),
                    last_answer,
                    log: self.apiserver.log.clone(),
                    tail: log_tail(&self.apiserver.log),
                });
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }
    }

    /// One readiness probe: `Ok(None)` when ready, otherwise what the server said.
    async fn probe(&self, namespaces: &Api<Namespace>) -> Result<Option<String>, String> {
        let request = hyper::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        let body = self
            .client
            .request_text(request)
            .await
            .map_err(|e| e.to_string())?;
        if body.trim() != "ok" {
            return Ok(Some(body));
        }
        match namespaces.get_opt("default").await {
            Ok(Some(_)) => Ok(None),
            Ok(None) => Ok(Some(
                "/readyz is ok; namespace default not created yet".into(),
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A client authenticated as `admin` in group `system:masters`, which RBAC lets do
    /// anything. Cheap to clone.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A client acting as `user` in `groups`: the admin identity impersonates them
    /// (`Impersonate-User` / `Impersonate-Group` headers), which is how RBAC for a
    /// ServiceAccount or a person is checked without minting credentials for each.
    /// The API server adds `system:authenticated`.
    pub async fn client_as(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<kube::Client, ClusterError> {
        let error = |reason: String| ClusterError::Client {
            path: self.kubeconfig.clone(),
            reason,
        };
        let kubeconfig =
            Kubeconfig::read_from(&self.kubeconfig).map_err(|e| error(e.to_string()))?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| error(e.to_string()))?;
        config.auth_info.impersonate = Some(user.to_owned());
        if !groups.is_empty() {
            config.auth_info.impersonate_groups =
                Some(groups.iter().map(|g| (*g).to_owned()).collect());
        }
        kube::Client::try_from(config).map_err(|e| error(e.to_string()))
    }

    /// Creates namespace `name` and its `default` ServiceAccount, either of which may
    /// already exist.
    ///
    /// The ServiceAccount is what kube-controller-manager would create; without it the
    /// `ServiceAccount` admission plugin rejects every Pod in the namespace.
    pub async fn ensure_namespace(&self, name: &str) -> Result<(), ClusterError> {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        create_unless_exists(
            &Api::all(self.client()),
            &namespace,
            format!("creating namespace {name}"),
        )
        .await?;
        let service_account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("default".to_owned()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        create_unless_exists(
            &Api::namespaced(self.client(), name),
            &service_account,
            format!("creating service account {name}/default"),
        )
        .await
    }

    /// The admin kubeconfig (for `kubectl`, `helm`, or a process under test).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory holding etcd, kube-apiserver, kube-controller-manager, kubectl and
    /// helm.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// `kubectl --kubeconfig <admin kubeconfig>`; add arguments and run it.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(self.bin_dir.join("kubectl"));
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }

    /// `helm --kubeconfig <admin kubeconfig>`, with helm's cache, config and data
    /// directories inside [`TestCluster::dir`] so tests never touch the user's helm setup.
    pub fn helm(&self) -> Command {
        let mut command = Command::new(self.bin_dir.join("helm"));
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir().join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir().join("helm/config"))
            .env("HELM_DATA_HOME", self.dir().join("helm/data"));
        command
    }

    /// The API server URL, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// PEM of the CA that signed the API server's serving certificate (SANs `127.0.0.1`
    /// and `localhost`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The `iss` of service-account tokens; also the API server URL. Tokens are accepted
    /// for this audience and for [`TRIMTAB_AUDIENCE`].
    pub fn service_account_issuer(&self) -> &str {
        &self.service_account_issuer
    }

    /// The temporary directory: logs (`etcd.log`, `kube-apiserver.log`), etcd's data, and
    /// the files named in [`files`].
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts kube-controller-manager with only `controllers` (e.g. `job`,
    /// `garbagecollector`), as the admin, without leader election or a serving port. Its
    /// log is `kube-controller-manager.log` in [`TestCluster::dir`]. Pods the Job
    /// controller creates still need a node: see [`crate::node_agent`].
    pub fn start_controller_manager(&mut self, controllers: &[&str]) -> Result<(), ClusterError> {
        if self.controller_manager.is_some() {
            return Ok(());
        }
        let root = self.dir.path();
        let mut manager = ServerProcess::spawn(
            "kube-controller-manager",
            &self.bin_dir.join("kube-controller-manager"),
            &[
                format!("--kubeconfig={}", self.kubeconfig.display()),
                format!("--controllers={}", controllers.join(",")),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=false".into(),
                // No health or metrics port: nothing here scrapes it.
                "--secure-port=0".into(),
                format!(
                    "--service-account-private-key-file={}",
                    root.join(files::SERVICE_ACCOUNT_KEY).display()
                ),
                "-v=1".into(),
            ],
            0,
            root.join("kube-controller-manager.log"),
        )?;
        // A flag it refuses ends it at once; say so now rather than as a Job that never runs.
        std::thread::sleep(Duration::from_millis(300));
        manager.fail_if_exited()?;
        self.controller_manager = Some(manager);
        Ok(())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(manager) = &mut self.controller_manager {
            manager.stop();
        }
        self.apiserver.stop();
        self.etcd.stop();
        let keep_requested = std::env::var(KEEP_ENV).is_ok_and(|v| v == "1");
        if std::thread::panicking() || keep_requested {
            self.dir.disable_cleanup(true);
            eprintln!(
                "test cluster stopped; its logs are kept in {} and {}",
                self.etcd.log.display(),
                self.apiserver.log.display(),
            );
        }
    }
}

/// Names of the files that [`TestCluster::start`] writes into [`TestCluster::dir`], for
/// tests that start kube-controller-manager or hand them to a process under test.
pub mod files {
    /// PEM of the CA that signed the API server's serving certificate.
    pub const SERVING_CA_CERT: &str = "serving-ca.crt";
    /// The API server's serving certificate.
    pub const SERVING_CERT: &str = "apiserver.crt";
    /// The API server's serving key.
    pub const SERVING_KEY: &str = "apiserver.key";
    /// PEM of the CA whose client certificates the API server accepts (`--client-ca-file`).
    pub const CLIENT_CA_CERT: &str = "client-ca.crt";
    /// The client CA's key (PKCS#8), e.g. for kube-controller-manager's
    /// `--cluster-signing-cert-file`/`--cluster-signing-key-file`.
    pub const CLIENT_CA_KEY: &str = "client-ca.key";
    /// The ECDSA P-256 key (PKCS#8) that signs service-account tokens, e.g. for
    /// kube-controller-manager's `--service-account-private-key-file`.
    pub const SERVICE_ACCOUNT_KEY: &str = "service-account.key";
    /// Its public key (SPKI PEM), which verifies them. kube-apiserver v1.36 does not
    /// accept the PKCS#8 private key in `--service-account-key-file`.
    pub const SERVICE_ACCOUNT_PUBLIC_KEY: &str = "service-account.pub";
    /// The admin kubeconfig.
    pub const ADMIN_KUBECONFIG: &str = "admin.kubeconfig";
}

// --- binaries -----------------------------------------------------------------------

/// The bin directory, found once per test process: parallel tests wait for the one build
/// instead of starting their own (the build script is not safe to run concurrently).
/// A failure is remembered too, so every test reports it instead of rebuilding.
static BIN_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();

async fn binaries() -> Result<PathBuf, ClusterError> {
    // `OnceLock::get_or_init` blocks concurrent callers, so call it off the runtime.
    let found = tokio::task::spawn_blocking(|| BIN_DIR.get_or_init(find_binaries).clone())
        .await
        .map_err(|e| ClusterError::Build {
            script: build_script(),
            reason: format!("the build task failed: {e}"),
        })?;
    let dir = found.map_err(|reason| ClusterError::Build {
        script: build_script(),
        reason,
    })?;
    let source_of_dir = if std::env::var_os(BIN_DIR_ENV).is_some() {
        BIN_DIR_ENV
    } else {
        "tests/cluster/build.sh"
    };
    for binary in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kubectl",
        "helm",
    ] {
        let path = dir.join(binary);
        if !path.is_file() {
            return Err(ClusterError::MissingBinary {
                path,
                source_of_dir,
            });
        }
    }
    Ok(dir)
}

fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/build.sh")
}

/// Runs the build script (cached: fast unless the pinned versions changed) and returns the
/// last line of its stdout. Its progress goes to our stderr, since a cold build takes long.
fn find_binaries() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let output = Command::new("bash")
        .arg(build_script())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not run bash: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "it exited with {} (its output is above)",
            output.status
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().map(str::trim).rfind(|line| !line.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Err("it printed no bin directory on stdout".into()),
    }
}

// --- processes ----------------------------------------------------------------------

/// Runs the server under `sh` and kills it with SIGKILL when the shell's stdin closes.
///
/// We hold the write end of that pipe. Dropping it (in [`ServerProcess::stop`]) stops the
/// server, and so does the end of the test process for any reason, a SIGKILL included:
/// no orphaned API servers keep ports and CPU after an aborted run. The shell exits with
/// the server's status, so waiting for the shell is waiting for the server. fd 3 carries
/// the pipe past POSIX's rule that a background job's stdin is `/dev/null`. The shell
/// notes `Killed` as the last line of the log of a server it stopped.
const WATCHDOG_SCRIPT: &str = r#"
exec 3<&0
"$@" </dev/null 3<&- &
server=$!
{ read -r _ <&3; kill -KILL "$server"; } 2>/dev/null &
watchdog=$!
wait "$server"
status=$?
kill "$watchdog" 2>/dev/null
exit "$status"
"#;

/// One server (etcd or kube-apiserver) with its log file.
#[derive(Debug)]
struct ServerProcess {
    name: &'static str,
    port: u16,
    log: PathBuf,
    shell: Child,
    /// Write end of the watchdog's stdin; dropping it kills the server.
    lifeline: Option<ChildStdin>,
    stopped: bool,
}

impl ServerProcess {
    fn spawn(
        name: &'static str,
        binary: &Path,
        args: &[String],
        port: u16,
        log: PathBuf,
    ) -> Result<ServerProcess, ClusterError> {
        let io_error = |source| ClusterError::Io {
            action: "creating log file",
            path: log.clone(),
            source,
        };
        let stdout = File::create(&log).map_err(io_error)?;
        let stderr = stdout.try_clone().map_err(io_error)?;
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("sh")
            .arg(binary)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| ClusterError::Spawn {
                server: name,
                binary: binary.to_path_buf(),
                source,
            })?;
        let lifeline = shell.stdin.take();
        Ok(ServerProcess {
            name,
            port,
            log,
            shell,
            lifeline,
            stopped: false,
        })
    }

    fn fail_if_exited(&mut self) -> Result<(), ClusterError> {
        let status = self.shell.try_wait().map_err(|source| ClusterError::Io {
            action: "checking the process that writes",
            path: self.log.clone(),
            source,
        })?;
        match status {
            None => Ok(()),
            Some(status) => Err(ClusterError::Exited {
                server: self.name,
                port: self.port,
                status,
                log: self.log.clone(),
                tail: log_tail(&self.log),
            }),
        }
    }

    /// Kills the server and waits for it; idempotent.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        drop(self.lifeline.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.shell.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Ok(Some(_)) | Err(_) => return,
            }
        }
        // The watchdog did not act; the server may outlive us, but the test goes on.
        eprintln!(
            "{} (port {}) did not stop within {STOP_TIMEOUT:?}; killing its watchdog shell {}",
            self.name,
            self.port,
            self.shell.id()
        );
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a log, for error messages.
fn log_tail(log: &Path) -> String {
    match fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(could not read the log: {e})"),
    }
}

/// `N` distinct free loopback ports for the servers to bind.
fn free_ports<const N: usize>() -> Result<[u16; N], ClusterError> {
    let mut ports = [0; N];
    for port in &mut ports {
        *port = trimtab_test_ports::try_free_port().map_err(ClusterError::FreePort)?;
    }
    Ok(ports)
}

// --- clients ------------------------------------------------------------------------

/// Writes `<name>.crt`, `<name>.key` and a kubeconfig using them.
///
/// The kubeconfig is JSON (a subset of YAML that kube, kubectl and helm all read), so no
/// value needs YAML quoting.
fn write_identity(
    dir: &Path,
    name: &str,
    cert_pem: &str,
    key_pem: &str,
    server_url: &str,
    kubeconfig: &Path,
) -> Result<(), ClusterError> {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    write_file(&cert, cert_pem)?;
    write_file(&key, key_pem)?;
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "trimtab-test",
            "cluster": {
                "server": server_url,
                "certificate-authority": dir.join(files::SERVING_CA_CERT),
            },
        }],
        "users": [{
            "name": name,
            "user": { "client-certificate": cert, "client-key": key },
        }],
        "contexts": [{
            "name": "trimtab-test",
            "context": { "cluster": "trimtab-test", "user": name, "namespace": "default" },
        }],
        "current-context": "trimtab-test",
    });
    write_file(kubeconfig, &format!("{config:#}\n"))
}

async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, ClusterError> {
    let error = |reason: String| ClusterError::Client {
        path: path.to_path_buf(),
        reason,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| error(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| error(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| error(e.to_string()))
}

async fn create_unless_exists<K>(
    api: &Api<K>,
    object: &K,
    action: String,
) -> Result<(), ClusterError>
where
    K: kube::Resource + Clone + fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(source) => Err(ClusterError::Api { action, source }),
    }
}

fn write_file(path: &Path, contents: &str) -> Result<(), ClusterError> {
    fs::write(path, contents).map_err(|source| ClusterError::Io {
        action: "writing",
        path: path.to_path_buf(),
        source,
    })
}

// --- certificates -------------------------------------------------------------------

/// The cluster's keys and certificates. Two CAs, as on a kubeadm cluster, so a client
/// certificate can never pass as a serving certificate and the other way round.
struct Pki {
    serving_ca_pem: String,
    serving_cert_pem: String,
    serving_key_pem: String,
    client_ca: Issuer<'static, KeyPair>,
    client_ca_pem: String,
    client_ca_key_pem: String,
    service_account_key_pem: String,
    service_account_public_key_pem: String,
}

impl Pki {
    fn generate() -> Result<Pki, ClusterError> {
        let (serving_ca_pem, serving_ca) = certificate_authority("trimtab-test-serving-ca")?;
        let (client_ca_pem, client_ca) = certificate_authority("trimtab-test-client-ca")?;

        let serving_key = new_key("kube-apiserver serving key")?;
        let mut serving =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .map_err(|e| cert_error("kube-apiserver serving certificate", e))?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        serving.use_authority_key_identifier_extension = true;
        let serving_cert = serving
            .signed_by(&serving_key, &serving_ca)
            .map_err(|e| cert_error("kube-apiserver serving certificate", e))?;

        // rcgen's default algorithm is ECDSA P-256 and it serializes keys as PKCS#8, which
        // --service-account-signing-key-file reads; --service-account-key-file gets the
        // public key.
        let service_account_key = new_key("service-account signing key")?;

        Ok(Pki {
            serving_ca_pem,
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            client_ca_key_pem: client_ca.key().serialize_pem(),
            client_ca,
            client_ca_pem,
            service_account_key_pem: service_account_key.serialize_pem(),
            service_account_public_key_pem: service_account_key.public_key_pem(),
        })
    }

    fn write(&self, dir: &Path) -> Result<(), ClusterError> {
        for (name, pem) in [
            (files::SERVING_CA_CERT, &self.serving_ca_pem),
            (files::SERVING_CERT, &self.serving_cert_pem),
            (files::SERVING_KEY, &self.serving_key_pem),
            (files::CLIENT_CA_CERT, &self.client_ca_pem),
            (files::CLIENT_CA_KEY, &self.client_ca_key_pem),
            (files::SERVICE_ACCOUNT_KEY, &self.service_account_key_pem),
            (
                files::SERVICE_ACCOUNT_PUBLIC_KEY,
                &self.service_account_public_key_pem,
            ),
        ] {
            write_file(&dir.join(name), pem)?;
        }
        Ok(())
    }
}

fn cert_error(what: &str, error: rcgen::Error) -> ClusterError {
    ClusterError::Certificate {
        what: what.to_owned(),
        reason: error.to_string(),
    }
}

fn new_key(what: &str) -> Result<KeyPair, ClusterError> {
    KeyPair::generate().map_err(|e| cert_error(what, e))
}

/// A self-signed CA: its certificate PEM, and the issuer that signs with it.
fn certificate_authority(name: &str) -> Result<(String, Issuer<'static, KeyPair>), ClusterError> {
    let key = new_key(name)?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| cert_error(name, e))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(|e| cert_error(name, e))?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// The admin's client certificate (PEM) and key (PKCS#8 PEM): CN=admin, O=system:masters,
/// which RBAC lets do anything. Other identities impersonate from it
/// ([`TestCluster::client_as`]).
fn admin_identity(ca: &Issuer<'static, KeyPair>) -> Result<(String, String), ClusterError> {
    let what = "admin client certificate";
    let key = new_key(what)?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| cert_error(what, e))?;
    params.distinguished_name.push(DnType::CommonName, "admin");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, ca)
        .map_err(|e| cert_error(what, e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    use k8s_openapi::api::core::v1::Pod;

    #[tokio::test]
    async fn api_server_authenticates_the_admin_and_authorizes_impersonated_users_with_rbac() {
        let cluster = TestCluster::start()
            .await
            .unwrap_or_else(|e| panic!("test cluster starts: {e}"));

        let namespaces = Api::<Namespace>::all(cluster.client())
            .list(&Default::default())
            .await
            .expect("admin lists namespaces");
        assert!(
            namespaces
                .iter()
                .any(|ns| ns.metadata.name.as_deref() == Some("default"))
        );

        let alice = cluster
            .client_as("alice", &[])
            .await
            .expect("client for alice");
        match Api::<Namespace>::all(alice).list(&Default::default()).await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
            other => panic!("alice must be forbidden to list namespaces, got {other:?}"),
        }

        let bob = cluster
            .client_as("bob", &["team-a", "team-b", "team-c"])
            .await
            .expect("client for bob");
        let review = Api::<SelfSubjectReview>::all(bob)
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
            .expect("bob reviews himself");
        let user = review.status.and_then(|s| s.user_info).expect("user info");
        assert_eq!(user.username.as_deref(), Some("bob"));
        assert_eq!(
            user.groups.unwrap_or_default(),
            ["team-a", "team-b", "team-c", "system:authenticated"]
        );

        // Pods need their ServiceAccount (admission plugin ServiceAccount), which only
        // ensure_namespace creates here.
        cluster
            .ensure_namespace("smoke")
            .await
            .expect("namespace smoke");
        cluster
            .ensure_namespace("smoke")
            .await
            .expect("ensure_namespace is idempotent");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p" },
            "spec": { "containers": [{ "name": "c", "image": "example.invalid/none" }] },
        }))
        .expect("pod");
        Api::<Pod>::namespaced(cluster.client(), "smoke")
            .create(&PostParams::default(), &pod)
            .await
            .expect("pod admitted");

        let output = cluster
            .kubectl()
            .args(["get", "ns", "-o", "name"])
            .output()
            .expect("kubectl runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "kubectl failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.lines().any(|l| l == "namespace/smoke"), "{stdout}");
    }
}
