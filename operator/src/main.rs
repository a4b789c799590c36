//! `trimtab-operator`: reconciles BalancerPolicies into endpoint weights, serves the
//! sidecars' config and the sidecar-injection webhook over HTTPS, and its own metrics
//! and probes.
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
use k8s_openapi::api::core::v1::{ResourceRequirements, Secret};
use kube::{Api, runtime::events::Reporter};
use tokio::sync::watch;
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
    load_test::{self, runs::Runs, token::TokenKey},
    metrics::Metrics,
    sidecar_counts::Replica,
    tls_secret::{TlsSecret, issue},
    webhook::{InjectionSettings, Injector, ca_bundle},
};

/// The audience of the sidecars' projected tokens, which the config server's
/// TokenReview asks for.
const TOKEN_AUDIENCE: &str = "trimtab";

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
    /// With `--tls-cert-file`: the CA bundle injected sidecars trust (cert-manager's
    /// `ca.crt`). Default: the certificate file itself (a self-signed certificate).
    #[arg(long, env = "TRIMTAB_TLS_CA_FILE", requires = "tls_cert_file")]
    tls_ca_file: Option<PathBuf>,
    /// Instead of files: the Secret (in --namespace) holding the operator's own CA and
    /// serving certificate. Created when absent, renewed by the leader, followed by
    /// every replica.
    #[arg(long, env = "TRIMTAB_TLS_SECRET", conflicts_with = "tls_cert_file")]
    tls_secret: Option<String>,
    /// Extra DNS names or IP addresses for the serving certificate in --tls-secret,
    /// besides the Service's (comma-separated).
    #[arg(long, env = "TRIMTAB_TLS_EXTRA_SANS", value_delimiter = ',')]
    tls_extra_sans: Vec<String>,
    /// Lifetime of the serving certificate in --tls-secret; renewed with a third left.
    #[arg(long, env = "TRIMTAB_TLS_CERT_VALIDITY", default_value = "2160h")]
    tls_cert_validity: trimtab_api::Duration,
    /// The operator's Service: the serving certificate's names and the control-plane
    /// URL injected sidecars use.
    #[arg(long, env = "TRIMTAB_SERVICE_NAME", default_value = "trimtab-operator")]
    service_name: String,
    /// The cluster's DNS domain, for the serving certificate's fully qualified name.
    #[arg(long, env = "TRIMTAB_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// The MutatingWebhookConfiguration whose webhooks' caBundle the leader keeps equal
    /// to the CA in --tls-secret.
    #[arg(long, env = "TRIMTAB_WEBHOOK_CONFIGURATION", requires = "tls_secret")]
    webhook_configuration: Option<String>,
    /// How often the leader compares that caBundle with the CA (it also checks when
    /// the CA changes and when it becomes leader).
    #[arg(long, env = "TRIMTAB_CA_BUNDLE_CHECK_INTERVAL", default_value = "30s")]
    ca_bundle_check_interval: trimtab_api::Duration,
    /// The sidecar image injected into pods; without it `/mutate-pods` answers 404.
    #[arg(long, env = "TRIMTAB_SIDECAR_IMAGE")]
    sidecar_image: Option<String>,
    /// The injected sidecar's imagePullPolicy.
    #[arg(long, env = "TRIMTAB_SIDECAR_IMAGE_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    sidecar_image_pull_policy: String,
    /// The injected sidecar's default resources, as the JSON of a Kubernetes
    /// ResourceRequirements (`{"requests": {"cpu": "50m"}}`); pods override by annotation.
    #[arg(long, env = "TRIMTAB_SIDECAR_RESOURCES")]
    sidecar_resources: Option<String>,
    /// The injected sidecar's default log filter (its TRIMTAB_LOG_LEVEL).
    #[arg(long, env = "TRIMTAB_SIDECAR_LOG", default_value = "info")]
    sidecar_log: String,
    /// The injected sidecar's admin port (probes and metrics).
    #[arg(long, env = "TRIMTAB_SIDECAR_ADMIN_PORT", default_value_t = 15020)]
    sidecar_admin_port: u16,
    /// The config server's URL as injected sidecars reach it. Default:
    /// `https://<service>.<namespace>.svc:<port of --config-addr>`.
    #[arg(long, env = "TRIMTAB_CONTROL_PLANE_URL")]
    control_plane_url: Option<String>,
    /// Name of this replica in Events (the pod name in a cluster).
    #[arg(long, env = "TRIMTAB_POD_NAME", default_value = "trimtab-operator")]
    instance: String,
    /// The Secret (in --namespace) holding the key LoadTest runner tokens are derived
    /// from; created when absent.
    #[arg(
        long,
        env = "TRIMTAB_LOADTEST_KEY_SECRET",
        default_value = "trimtab-loadtest-key"
    )]
    loadtest_key_secret: String,
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
    // Read before anything starts: a typo in the chart's values is a startup error
    // naming the variable, not a sidecar injected with the wrong resources.
    let sidecar_resources: ResourceRequirements = match &args.sidecar_resources {
        None => ResourceRequirements::default(),
        Some(json) => serde_json::from_str(json).with_context(|| {
            format!("TRIMTAB_SIDECAR_RESOURCES (--sidecar-resources) is not a ResourceRequirements JSON object: {json}")
        })?,
    };
    let mut tls_secret = None;
    let source = match (&args.tls_cert_file, &args.tls_key_file, &args.tls_secret) {
        (Some(cert), Some(key), _) => CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        (_, _, Some(name)) => {
            let mut names =
                issue::service_names(&args.service_name, &args.namespace, &args.cluster_domain);
            names.extend(
                args.tls_extra_sans
                    .iter()
                    .filter(|n| !n.is_empty())
                    .cloned(),
            );
            let secret = TlsSecret::new(
                Api::<Secret>::namespaced(client.clone(), &args.namespace),
                name,
                names,
                args.tls_cert_validity.get(),
            );
            let bundle = secret
                .ensure()
                .await
                .with_context(|| format!("TRIMTAB_TLS_SECRET {}/{name}", args.namespace))?;
            let source = CertSource::Pem {
                chain: bundle.tls_crt.clone(),
                key: bundle.tls_key.clone(),
            };
            tls_secret = Some((secret, bundle.ca_crt));
            source
        }
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
    // The CA injected sidecars (and the webhook's caBundle) trust.
    let ca_pem = match (&tls_secret, &args.tls_ca_file, &args.tls_cert_file) {
        (Some((_, ca)), _, _) => ca.clone(),
        (None, Some(file), _) | (None, None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| {
                format!(
                    "reading the CA for injected sidecars from {}",
                    file.display()
                )
            })?,
        (None, None, None) => tls.self_signed_pem.clone().unwrap_or_default(),
    };
    let (ca_sender, ca) = watch::channel(ca_pem.clone());
    // Where injected sidecars and LoadTest runners reach this operator.
    let control_plane_url = args.control_plane_url.clone().unwrap_or_else(|| {
        format!(
            "https://{}.{}.svc:{}",
            args.service_name,
            args.namespace,
            args.config_addr.port()
        )
    });
    let injector = match &args.sidecar_image {
        None => None,
        Some(image) => Some(
            Injector::new(
                InjectionSettings {
                    image: image.clone(),
                    image_pull_policy: args.sidecar_image_pull_policy.clone(),
                    resources: sidecar_resources,
                    log_level: args.sidecar_log.clone(),
                    control_plane_url: control_plane_url.clone(),
                    ca_pem: ca_pem.clone(),
                    token_audience: TOKEN_AUDIENCE.into(),
                    admin_port: args.sidecar_admin_port,
                    version: env!("CARGO_PKG_VERSION").into(),
                    excluded_namespaces: vec![args.namespace.clone()],
                },
                &registry,
            )
            .context("registering metrics")?,
        ),
    };
    let pods = wiring.pods.as_reader();
    let pods_for_load_tests = pods.clone();
    let pods_synced = Arc::new(AtomicBool::new(false));
    {
        let (pods, synced) = (pods.clone(), Arc::clone(&pods_synced));
        tokio::spawn(async move {
            if pods.wait_until_ready().await.is_ok() {
                synced.store(true, Ordering::Release);
            }
        });
    }
    let key_secrets = Api::<Secret>::namespaced(client.clone(), &args.namespace);
    let token_key = TokenKey::ensure(&key_secrets, &args.loadtest_key_secret)
        .await
        .with_context(|| format!("TRIMTAB_LOADTEST_KEY_SECRET {}", args.namespace))?;
    let runs = Runs::new(token_key);
    let state = Arc::new(ServerState {
        runs: runs.clone(),
        index: wiring.index.clone(),
        auth: Authenticator::new(client.clone()),
        pods,
        pods_synced,
        load_reports: wiring.load_reports.clone(),
        subscribers: wiring.subscribers.clone(),
        metrics: ServerMetrics::register(&registry).context("registering metrics")?,
        injector,
    });
    if state.injector.is_some() {
        // Pods admitted after a CA change carry the new CA.
        let (state, mut ca) = (Arc::clone(&state), ca.clone());
        tokio::spawn(async move {
            while ca.changed().await.is_ok() {
                let pem = ca.borrow_and_update().clone();
                if let Some(injector) = &state.injector {
                    injector.set_ca_pem(&pem);
                }
            }
        });
    }
    if let Some((secret, _)) = &tls_secret {
        tokio::spawn(secret.clone().follow(tls.swap.clone(), ca_sender));
    }
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
    if let Some((secret, _)) = tls_secret {
        // Checked often enough that a certificate a third from expiry is caught early.
        let every = (args.tls_cert_validity.get() / 30).clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(3600),
        );
        tokio::spawn(secret.renew(leadership.clone(), every));
    }
    if let Some(name) = args.webhook_configuration.clone() {
        tokio::spawn(ca_bundle::keep_current(
            client.clone(),
            name,
            ca,
            leadership.clone(),
            args.ca_bundle_check_interval.get(),
        ));
    }
    let load_tests = load_test::Wiring {
        pods: pods_for_load_tests,
        runs,
        settings: load_test::RunnerSettings {
            image: args.sidecar_image.clone(),
            pull_policy: args.sidecar_image_pull_policy.clone(),
            control_plane_url,
            ca_pem,
        },
        live: load_test::metrics::LoadTestMetrics::register(&registry)
            .context("registering metrics")?,
    };
    // Both controllers stop on the shutdown signal.
    tokio::join!(
        balancer_policy::run(
            client.clone(),
            wiring,
            metrics.controller("balancerpolicy"),
            reporter.clone(),
            leadership.clone(),
        ),
        load_test::run(
            client,
            load_tests,
            metrics.controller("loadtest"),
            reporter,
            leadership,
        ),
    );
    tracing::info!("shut down");
    Ok(())
}
