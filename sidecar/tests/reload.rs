//! Config sources: hot reload of policy files under load, refusal of a bad config,
//! and the fail-static restart from the state directory.
#![allow(clippy::unwrap_used)]

mod support;

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use support::*;
use trimtab_api::balancer_policy::Algorithm;
use trimtab_sidecar::{
    config_source,
    metrics::Metrics,
    sidecar::{Options, Sidecar},
};

fn policy(name: &str, port: u16, algorithm: &str, endpoints: &[&Backend]) -> String {
    let list: Vec<String> = endpoints
        .iter()
        .map(|b| format!("\"{}\"", b.address()))
        .collect();
    format!(
        "apiVersion: trimtab.dev/v1alpha1\nkind: BalancerPolicy\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  clients: {{podSelector: {{}}}}\n  listener: {{port: {port}}}\n  endpoints: [{}]\n  algorithm: {algorithm}\n",
        list.join(", ")
    )
}

/// Replaces the file the way editors and ConfigMap updates do: write aside, rename over.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_for_version(sidecar: &Sidecar, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while sidecar.version() < version {
        assert!(
            Instant::now() < deadline,
            "version {version} never applied (at {})",
            sidecar.version()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn watched_sidecar(file: &Path, state_dir: Option<&Path>) -> Arc<Sidecar> {
    let sidecar = Sidecar::new(
        Options {
            state_dir: state_dir.map(Path::to_owned),
            ..options()
        },
        Metrics::new().unwrap(),
    );
    let paths = vec![file.to_owned()];
    let fingerprint = config_source::start(&sidecar, &paths).await;
    tokio::spawn(config_source::watch_files(
        Arc::clone(&sidecar),
        paths,
        fingerprint,
        Duration::from_millis(100),
    ));
    sidecar
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_fails_no_request() {
    let a = backend("a").await;
    let b = backend("b").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    replace(&file, &policy("r", port, "roundRobin", &[&a]));
    let sidecar = watched_sidecar(&file, None).await;
    assert_eq!(sidecar.version(), 1);

    // Four clients send back-to-back requests for at most 3 s / 1500 requests each.
    let load: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let c = client();
                let deadline = Instant::now() + Duration::from_secs(3);
                let (mut ok, mut failed) = (0, Vec::new());
                for _ in 0..1500 {
                    if Instant::now() > deadline {
                        break;
                    }
                    let (status, _, body) = get(&c, port, "/").await;
                    if status == 200 {
                        ok += 1;
                    } else {
                        failed.push((status, body));
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let steps = [
        policy("r", port, "leastRequest", &[&a, &b]),
        policy("r", port, "peakEwma", &[&b]),
        policy("r", port, "weightedRoundRobin", &[&a, &b]),
        policy("r", port, "roundRobin", &[&a]),
    ];
    for (i, text) in steps.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        replace(&file, text);
        wait_for_version(&sidecar, i as u64 + 2).await;
    }
    let (mut ok, mut failed) = (0, Vec::new());
    for task in load {
        let (o, f) = task.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 100, "only {ok} requests ran");
    assert!(a.hits() > 0 && b.hits() > 0);
}

#[tokio::test]
async fn refuses_an_invalid_reload_and_keeps_serving_the_old_config() {
    let a = backend("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    replace(&file, &policy("r", port, "roundRobin", &[&a]));
    let sidecar = watched_sidecar(&file, None).await;
    let bad = policy("r", port, "roundRobin", &[&a]).replace(&a.address(), "not-an-address");
    replace(&file, &bad);
    let good_again = policy("r2", port, "roundRobin", &[&a]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sidecar.version(), 1, "the invalid config was applied");
    assert_eq!(get(&client(), port, "/").await.0, 200);
    // Refusal is not sticky: the next good file is applied.
    replace(&file, &good_again);
    wait_for_version(&sidecar, 2).await;
    assert_eq!(get(&client(), port, "/").await.0, 200);
}

/// The sidecar binary serving the policy file, keeping its config in `state_dir`.
fn start_binary(policy: &Path, state_dir: &Path) -> SidecarProcess {
    SidecarProcess::start(&[
        "--policy".as_ref(),
        policy.as_os_str(),
        "--state-dir".as_ref(),
        state_dir.as_os_str(),
    ])
}

#[tokio::test]
async fn restarts_fail_static_from_the_state_dir_when_no_policy_loads() {
    let a = backend("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    let state = dir.path().join("state");
    replace(&file, &policy("r", port, "roundRobin", &[&a]));
    let mut first = start_binary(&file, &state);
    first.ready().await;
    assert_eq!(get(&client(), port, "/").await.1, "a");
    wait_until_kept(&state, 1).await;
    drop(first);

    // The policy file is gone: the restarted sidecar serves the kept config.
    std::fs::remove_file(&file).unwrap();
    let mut second = start_binary(&file, &state);
    second.ready().await;
    let (status, backend, _) = get(&client(), port, "/").await;
    assert_eq!((status, backend.as_str()), (200, "a"));
    let (_, _, config) = get(&client(), second.admin_port, "/config").await;
    assert!(config.contains(&a.address()), "{config}");
}

#[tokio::test]
async fn admin_port_serves_metrics_liveness_and_readiness() {
    let a = backend("a").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    replace(&file, &policy("r", port, "roundRobin", &[&a]));
    let mut sidecar = start_binary(&file, &dir.path().join("state"));
    sidecar.ready().await;
    let admin = sidecar.admin_port;
    let c = client();
    assert_eq!(get(&c, admin, "/live").await.0, 200);
    for _ in 0..3 {
        assert_eq!(get(&c, port, "/").await.0, 200);
    }
    let (status, _, metrics) = get(&c, admin, "/metrics").await;
    assert_eq!(status, 200);
    let endpoint = a.address();
    for expected in [
        format!(
            "trimtab_requests_total{{code=\"200\",endpoint=\"{endpoint}\",route=\"test/r\"}} 3"
        ),
        "trimtab_request_duration_seconds_bucket".to_owned(),
        "trimtab_active_requests{route=\"test/r\"} 0".to_owned(),
        format!(
            "trimtab_endpoint_state{{endpoint=\"{endpoint}\",route=\"test/r\",state=\"Active\"}} 1"
        ),
        format!("trimtab_endpoint_weight{{endpoint=\"{endpoint}\",route=\"test/r\"}} 1"),
        "trimtab_balance_score{route=\"test/r\"} 1".to_owned(),
        "trimtab_config_version 1".to_owned(),
    ] {
        assert!(
            metrics.contains(&expected),
            "missing {expected} in\n{metrics}"
        );
    }
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_and_closes_idle_connections() {
    use tokio::io::AsyncReadExt as _;

    let slow = backend("slow").await;
    let port = free_port();
    let sidecar = sidecar(vec![route("r", port, Algorithm::RoundRobin, &[&slow])]).await;
    // A keep-alive connection that carried one request and then sits idle.
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(2), exchange_on(&mut idle, "/"))
        .await
        .expect("answered within 2 s");
    assert_eq!(answered, (200, "slow got 0 bytes".to_owned()));
    let mut buf = [0_u8; 1024];
    // A request still at the backend when the sidecar stops.
    slow.delay_ms
        .store(400, std::sync::atomic::Ordering::SeqCst);
    let in_flight = tokio::spawn(async move { get(&client(), port, "/").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    sidecar.shutdown().await;

    let closed = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf))
        .await
        .expect("the idle connection is closed at once, not left open");
    assert_eq!(
        closed.unwrap(),
        0,
        "nothing more is sent on the idle connection"
    );
    let (status, backend_name, body) = in_flight.await.unwrap();
    assert_eq!((status, backend_name.as_str()), (200, "slow"), "{body}");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the listener is closed"
    );
}
