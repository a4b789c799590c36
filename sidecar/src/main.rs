//! `trimtab-sidecar`: reads its settings, starts the admin port and the route
//! listeners, serves the policy files (or the kept config) and reloads them.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use trimtab_sidecar::{
    admin, config_source,
    metrics::Metrics,
    settings::{Cli, LogFormat, Settings},
    sidecar::{Options, Sidecar},
};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(&cli)?;
    if cli.print_config {
        print!("{}", serde_yaml_ng::to_string(&settings)?);
        return Ok(());
    }
    let filter = EnvFilter::try_new(&settings.log_level)
        .with_context(|| format!("--log-level {:?}", settings.log_level))?;
    match settings.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = settings.worker_threads {
        runtime.worker_threads(threads.max(1));
    }
    runtime
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(settings))
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let metrics = Metrics::new()?;
    let sidecar = Sidecar::new(
        Options {
            listen_address: settings.listen_address,
            max_request_body: settings.max_request_body_bytes,
            max_header_bytes: settings.max_header_bytes,
            state_dir: settings.state_dir.clone(),
        },
        metrics,
    );
    let admin_address = SocketAddr::new(settings.admin_address, settings.admin_port);
    let admin_listener = TcpListener::bind(admin_address)
        .await
        .with_context(|| format!("--admin-port: cannot listen on {admin_address}"))?;
    tracing::info!(%admin_address, "admin port listening");
    tokio::spawn(admin::serve(admin_listener, Arc::clone(sidecar.shared())));

    let fingerprint = config_source::start(&sidecar, &settings.policies).await;
    if !settings.policies.is_empty() {
        tokio::spawn(config_source::watch_files(
            Arc::clone(&sidecar),
            settings.policies.clone(),
            fingerprint,
            settings.reload_poll_interval.get(),
        ));
    }
    shutdown_signal().await;
    tracing::info!("shutting down: listeners closed, open requests finishing");
    sidecar.shutdown().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
