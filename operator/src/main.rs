//! `trimtab-operator`: reconciles BalancerPolicies into endpoint weights and serves its
//! own metrics and probes.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use clap::Parser;
use kube::runtime::events::Reporter;
use trimtab_operator::{
    admin,
    balancer_policy::{self, Wiring},
    config_server::{
        self, ServerMetrics, ServerState,
        auth::Authenticator,
        tls::{self, CertSource},
    },
    index::PolicyIndex,
    leader::{self, Leadership},
    metrics::Metrics,
    sidecar_counts::Replica,
};

/// Layering: defaults < environment (`TRIMTAB_*`) < flags.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the admin server (`/metrics`, `/live`, `/ready`).
    #[arg(long, env = "TRIMTAB_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    admin_addr: SocketAddr,
    /// Address of the config server the sidecars long-poll (HTTPS).
    #[arg(long, env = "TRIMTAB_CONFIG_ADDR", default_value = "0.0.0.0:8443")]
    config_addr: SocketAddr,
    /// PEM certificate chain of the config server; re-read when it changes. Without
    /// it (and the key) a self-signed certificate is made at start, for local runs.
    #[arg(long, env = "TRIMTAB_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key for `--tls-cert-file`.
    #[arg(long, env = "TRIMTAB_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Name of this replica in Events (the pod name in a cluster).
    #[arg(long, env = "TRIMTAB_POD_NAME", default_value = "trimtab-operator")]
    instance: String,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "TRIMTAB_NAMESPACE", default_value = "trimtab-system")]
    namespace: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "TRIMTAB_LOG_JSON")]
    log_json: bool,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_config {
        println!("{args:#?}");
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRIMTAB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).context("registering metrics")?;
    let mut wiring = Wiring::new(PolicyIndex::default());
    wiring.replica = Some(Replica {
        namespace: args.namespace.clone(),
        name: args.instance.clone(),
    });
    let source = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => {
            tracing::warn!("no --tls-cert-file: serving config with a self-signed certificate");
            CertSource::SelfSigned(vec![
                "localhost".into(),
                "127.0.0.1".into(),
                format!("trimtab-operator.{}.svc", args.namespace),
            ])
        }
    };
    let tls = tls::server_config(&source).context("setting up the config server's TLS")?;
    let pods = wiring.pods.as_reader();
    let pods_synced = Arc::new(AtomicBool::new(false));
    {
        let (pods, synced) = (pods.clone(), Arc::clone(&pods_synced));
        tokio::spawn(async move {
            if pods.wait_until_ready().await.is_ok() {
                synced.store(true, Ordering::Release);
            }
        });
    }
    let state = Arc::new(ServerState {
        index: wiring.index.clone(),
        auth: Authenticator::new(client.clone()),
        pods,
        pods_synced,
        load_reports: wiring.load_reports.clone(),
        subscribers: wiring.subscribers.clone(),
        metrics: ServerMetrics::register(&registry).context("registering metrics")?,
    });
    let ready: admin::Readiness = {
        let (index, pods_synced) = (state.index.clone(), Arc::clone(&state.pods_synced));
        Arc::new(move || index.is_synced() && pods_synced.load(Ordering::Acquire))
    };
    let admin = admin::serve(args.admin_addr, registry.clone(), ready)
        .await
        .with_context(|| format!("binding the admin server to {}", args.admin_addr))?;
    tracing::info!(addr = %admin.local_addr, "admin server listening");

    let config_addr = config_server::serve(args.config_addr, tls.config, state)
        .await
        .with_context(|| format!("binding the config server to {}", args.config_addr))?;
    tracing::info!(addr = %config_addr, "config server listening");

    let reporter = Reporter {
        controller: "trimtab-operator".into(),
        instance: Some(args.instance.clone()),
    };
    let leadership = Leadership::elect(
        client.clone(),
        &args.namespace,
        &args.instance,
        leader::LEASE_DURATION,
        leader::LEASE_GRACE,
    )
    .await
    .context("starting leader election")?;
    balancer_policy::run(
        client,
        wiring,
        metrics.controller("balancerpolicy"),
        reporter,
        leadership,
    )
    .await;
    tracing::info!("shut down");
    Ok(())
}
