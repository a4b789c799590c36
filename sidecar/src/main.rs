//! `trimtab-sidecar`: reads its settings, starts the admin port and the route
//! listeners, and serves either the policy files (reloading them) or the operator's
//! config server (following it and reporting load); the kept config when neither has
//! anything at start.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use trimtab_sidecar::{
    admin, config_source,
    control_plane::{ControlPlane, Timing, TrustAnchors},
    metrics::Metrics,
    settings::{Cli, LogFormat, Settings},
    sidecar::{Options, Sidecar},
};

/// mimalloc rather than glibc malloc: a proxied request allocates and frees a few dozen
/// small buffers (headers, URIs, body frames), and glibc's free lists were ~6% of the
/// proxy's CPU under load (see docs/benchmarks.md, "Sidecar proxy overhead"). Called
/// through `trimtab_allocator`, which keeps plain allocations off mimalloc's aligned path.
#[global_allocator]
static ALLOCATOR: trimtab_allocator::Allocator = trimtab_allocator::Allocator;

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
    // One worker thread is an event loop as nginx and Envoy run theirs: the
    // current-thread scheduler skips the work-stealing machinery (and its atomics) that
    // a single worker never uses.
    let mut runtime = match settings.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(threads) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads.max(1));
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
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
    // A URL or CA bundle that can never work is a settings error: refuse it before
    // serving anything.
    let control_plane = match &settings.control_plane {
        Some(url) => Some(Arc::new(ControlPlane::with_trust_anchors(
            url,
            &match &settings.control_plane_ca_pem {
                Some(pem) => TrustAnchors::Pem(pem.clone()),
                None => TrustAnchors::File(settings.control_plane_ca.clone()),
            },
            settings.token_file.clone(),
            Timing::default(),
            sidecar.shared().metrics.clone(),
        )?)),
        None => None,
    };
    let admin_address = SocketAddr::new(settings.admin_address, settings.admin_port);
    let admin_listener = TcpListener::bind(admin_address)
        .await
        .with_context(|| format!("--admin-port: cannot listen on {admin_address}"))?;
    tracing::info!(%admin_address, "admin port listening");
    tokio::spawn(admin::serve(admin_listener, Arc::clone(sidecar.shared())));

    let cancel = CancellationToken::new();
    let mut sources: Vec<JoinHandle<()>> = Vec::new();
    if let Some(control_plane) = control_plane {
        tracing::info!(url = ?settings.control_plane, "following the control plane");
        let following = control_plane.start(&sidecar).await;
        sources.push(tokio::spawn(Arc::clone(&control_plane).follow(
            Arc::clone(&sidecar),
            following,
            cancel.clone(),
        )));
        sources.push(tokio::spawn(
            control_plane.report_loads(Arc::clone(sidecar.shared()), cancel.clone()),
        ));
    } else {
        let fingerprint = config_source::start(&sidecar, &settings.policies).await;
        if !settings.policies.is_empty() {
            tokio::spawn(config_source::watch_files(
                Arc::clone(&sidecar),
                settings.policies.clone(),
                fingerprint,
                settings.reload_poll_interval.get(),
            ));
        }
    }
    shutdown_signal().await;
    tracing::info!("shutting down: listeners closed, open requests finishing");
    // The control plane's poll and load reports stop first, so that no config arrives
    // while the listeners close; a config being applied finishes.
    cancel.cancel();
    for source in sources {
        let _ = tokio::time::timeout(Duration::from_secs(1), source).await;
    }
    sidecar.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
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
