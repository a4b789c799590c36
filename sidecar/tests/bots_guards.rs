//! Local guards and `/metrics` against a real shop on 127.0.0.1: `maxLoad` holds the
//! load at the last good level, `criticalLoad` stops every user at once, and
//! `trimtab-bots` exports its counters for Prometheus and exits 4 when aborted.

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use shop::{Config, Shop};
use tokio::time::Instant;
use trimtab_api::load_test::LoadTestSpec;
use trimtab_sidecar::bots::{
    gate::UNLIMITED,
    guard::GuardState,
    run::{Compiled, Run, RunOptions},
};
use trimtab_test_ports::free_port;

/// A login-then-browse scenario with `guards` and `workload`.
fn spec(workload: serde_json::Value, guards: serde_json::Value) -> LoadTestSpec {
    serde_json::from_value(serde_json::json!({
        "target": {"url": "http://127.0.0.1:1"},
        "workload": workload,
        "scenario": {
            "start": "login",
            "thinkTime": {"distribution": "constant", "mean": "20ms"},
            "states": [
                {"name": "login",
                 "request": {"method": "POST", "path": "/api/login", "json": {"user": "bot-{{ user.id }}"}},
                 "extract": {"token": "$.token"},
                 "checks": ["response.status == 200"],
                 "next": [{"state": "browse"}]},
                {"name": "browse",
                 "request": {"method": "GET", "path": "/api/products?page=1",
                             "headers": {"authorization": "Bearer {{ vars.token }}"}},
                 "checks": ["response.status == 200"],
                 "next": [{"state": "browse"}]}
            ]
        },
        "guards": guards,
    }))
    .expect("a LoadTestSpec")
}

async fn start(spec: &LoadTestSpec, addr: std::net::SocketAddr) -> Run {
    let options = RunOptions {
        target: Some(format!("http://{addr}")),
        request_timeout: Duration::from_secs(5),
        ..RunOptions::default()
    };
    let compiled = Compiled::new(spec, &options).expect("compiles");
    Run::start(compiled, &options).await.expect("starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_load_holds_the_ramp_and_sheds_users_to_the_last_good_level() {
    // Two slots of 10 ms: about 200 requests/s, so queueing (and p99) grows with
    // every user past a handful.
    let config = Config {
        base_workers: 2,
        service_time: Duration::from_millis(10),
        ..Config::ephemeral()
    };
    let (addr, shop) = Shop::bind(config).await.expect("shop starts");
    let spec = spec(
        serde_json::json!({"users": 150, "rampUp": "5s", "duration": "7s"}),
        serde_json::json!({"maxLoad": {"p99": "80ms"}, "window": "1s"}),
    );
    let run = start(&spec, addr).await;
    let shared = run.shared.clone();

    // Samples (ceiling, active users) while the guard holds, once the shedding had
    // half a second to take effect.
    let sampler = tokio::spawn(async move {
        let mut held_since: Option<Instant> = None;
        let mut worst_excess = i64::MIN;
        let mut samples = 0;
        while Instant::now() < shared.deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let ceiling = shared.gate.ceiling();
            if ceiling == UNLIMITED {
                held_since = None;
                continue;
            }
            let since = *held_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_millis(500) {
                let active = shared.recorder.live.active_users.load(Relaxed);
                worst_excess = worst_excess.max(active as i64 - ceiling as i64);
                samples += 1;
            }
        }
        (worst_excess, samples)
    });
    let output = run.finish().await;
    let (worst_excess, samples) = sampler.await.expect("sampler");
    shop.shutdown().await;

    let first_hold = output
        .guard
        .iter()
        .find(|e| e.state == GuardState::Holding)
        .unwrap_or_else(|| panic!("never held: {:?}", output.guard));
    let ceiling = first_hold.ceiling.expect("a hold has a ceiling");
    assert!(
        (1..150).contains(&ceiling),
        "held at {ceiling} of 150 users"
    );
    assert!(
        first_hold.reason.starts_with("maxLoad: p99"),
        "{first_hold:?}"
    );
    assert!(output.aborted().is_none());
    assert!(samples > 0, "no sample while holding: {:?}", output.guard);
    assert!(
        worst_excess <= 0,
        "{worst_excess} users above the ceiling while holding"
    );
    assert!(output.results.requests > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_load_stops_every_user_at_once() {
    let (addr, shop) = Shop::bind(Config::ephemeral()).await.expect("shop starts");
    let spec = spec(
        serde_json::json!({"users": 50, "duration": "60s"}),
        serde_json::json!({"criticalLoad": {"errorRate": 0.25}, "window": "1s"}),
    );
    let run = start(&spec, addr).await;
    let shared = run.shared.clone();
    let finished = tokio::spawn(run.finish());

    // The target goes away: every request now fails to connect.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    shop.shutdown().await;
    let down = Instant::now();

    let output = tokio::time::timeout(Duration::from_secs(10), finished)
        .await
        .expect("the guard ends a 60 s run within seconds of the outage")
        .expect("run");
    let reason = output.aborted().expect("aborted");
    assert!(reason.starts_with("criticalLoad: error rate"), "{reason}");
    assert!(
        down.elapsed() < Duration::from_secs(5),
        "{:?}",
        down.elapsed()
    );
    assert!(shared.gate.is_aborted());

    // Nobody sends after the abort: the counters stand still.
    let requests = shared.recorder.live.requests.load(Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(shared.recorder.live.requests.load(Relaxed), requests);
}

async fn scrape(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: bots\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    Some(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_metrics_and_exits_4_when_the_guard_aborts() {
    let (addr, shop) = Shop::bind(Config::ephemeral()).await.expect("shop starts");
    let dir = std::env::temp_dir().join(format!("trimtab-bots-guards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("loadtest.yaml");
    let spec = spec(
        serde_json::json!({"users": 20, "duration": "30s"}),
        serde_json::json!({"maxLoad": {"cpu": 0.8, "errorRate": 0.05}, "criticalLoad": {"errorRate": 0.25}, "window": "1s"}),
    );
    std::fs::write(&file, serde_yaml_ng::to_string(&spec).expect("yaml")).expect("write spec");
    let port = free_port();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_trimtab-bots"))
        .args(["run", file.to_str().expect("utf-8 path")])
        .args(["--target", &format!("http://{addr}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("trimtab-bots starts");

    let mut metrics = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(text) = scrape(port).await
            && text.contains("trimtab_bots_requests_total{state=\"browse\"}")
        {
            metrics = Some(text);
            break;
        }
    }
    let metrics = metrics.expect("/metrics answered with per-state counters");
    for family in [
        "trimtab_bots_active_users",
        "trimtab_bots_request_duration_seconds_bucket{state=\"login\",le=\"0.005\"}",
        "trimtab_bots_checks_total{state=\"browse\",result=\"passed\"}",
        "trimtab_bots_guard_ceiling_users -1",
    ] {
        assert!(metrics.contains(family), "no {family} in\n{metrics}");
    }

    shop.shutdown().await;
    let output = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("aborted well before its 30 s")
        .expect("exit status");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(4),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("aborted by the guard: criticalLoad: error rate"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cpu limits need the target pods' metrics"),
        "{stderr}"
    );
    assert!(stdout.contains("Aborted"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
