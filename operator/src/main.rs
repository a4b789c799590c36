//! `trimtab-operator`: reconciles BalancerPolicies into endpoint weights and serves its
//! own metrics and probes.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use kube::runtime::events::Reporter;
use trimtab_operator::{
    admin, balancer_policy,
    index::PolicyIndex,
    leader::{self, Leadership},
    metrics::Metrics,
};

/// Layering: defaults < environment (`TRIMTAB_*`) < flags.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the admin server (`/metrics`, `/live`, `/ready`).
    #[arg(long, env = "TRIMTAB_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    admin_addr: SocketAddr,
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
    let index = PolicyIndex::default();
    let admin = admin::serve(args.admin_addr, registry)
        .await
        .with_context(|| format!("binding the admin server to {}", args.admin_addr))?;
    tracing::info!(addr = %admin.local_addr, "admin server listening");

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
        index,
        metrics.controller("balancerpolicy"),
        reporter,
        leadership,
    )
    .await;
    tracing::info!("shut down");
    Ok(())
}
