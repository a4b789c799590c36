//! LoadTest runners at scale (issue 7): start skew across N runner processes, the
//! operator's CPU and memory while it merges their reports, and the time from a
//! criticalLoad breach to the last request the target sees. Run through
//! `bench/load-test-runners.sh`; prints Markdown for docs/benchmarks.md.
//!
//! Real everything but the container runtime: etcd, kube-apiserver, the Job and
//! garbage-collector controllers, the release `trimtab-operator`, the test node agent
//! running each runner Pod as a release `trimtab-bots` process, and the shop example
//! as the target, all on 127.0.0.1. Every wait is bounded.

use std::time::{Duration, Instant};

use serde_json::json;
use trimtab_api::load_test::Phase;
use trimtab_tests::{
    load_test_env::{self, LoadTestEnv, abort_time, looping},
    operator_process::workspace_binary,
    shop::{self, RequestLog},
};

const NS: &str = "bench";

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} {v}: not a number"))
        })
        .unwrap_or(default)
}

fn progress(started: Instant, what: &str) {
    eprintln!("[{:>6.1} s] {what}", started.elapsed().as_secs_f64());
}

fn load_test(name: &str, target: &str, spec: serde_json::Value) -> serde_json::Value {
    load_test_env::load_test(NS, name, &[json!({"target": {"url": target}}), spec])
}

#[tokio::main]
async fn main() {
    let runners = arg("--runners", 50);
    let seconds = arg("--seconds", 30);
    let started = Instant::now();

    let bots = workspace_binary("trimtab-sidecar", "trimtab-bots").expect("trimtab-bots");
    let work = tempfile::tempdir().expect("work dir");
    // Info logs: the operator's debug log would be part of what is measured.
    let env = LoadTestEnv::start(NS, &bots, work.path(), &[("TRIMTAB_LOG", "info")]).await;
    let operator = &env.operator;
    let (shop_addr, _shop) = shop::start(&[]);
    progress(started, "cluster, operator, node agent and shop up");

    // 1. N runners, four users each, reporting every 2 s for `seconds`.
    let merge = load_test(
        "merge",
        &format!("http://{shop_addr}"),
        json!({
            "workload": {"users": runners * 4, "duration": format!("{seconds}s")},
            "runners": {"parallelism": runners, "image": "bench/trimtab-sidecar"},
            "scenario": looping("/healthz", "response.status == 200", "100ms"),
        }),
    );
    env.apply(&merge).await;
    let created = Instant::now();
    env.wait_for_phase(NS, "merge", Phase::Running, Duration::from_secs(600), || {})
        .await;
    let registered_after = created.elapsed();
    progress(started, &format!("{runners} runners registered"));
    let (cpu0, t0) = (operator.cpu_seconds(), Instant::now());
    let mut peak_rss = 0.0f64;
    env.wait_for_phase(
        NS,
        "merge",
        Phase::Succeeded,
        Duration::from_secs(seconds + 300),
        || peak_rss = peak_rss.max(operator.memory_mb().0),
    )
    .await;
    let (cpu1, t1) = (operator.cpu_seconds(), Instant::now());
    let (_, hwm) = operator.memory_mb();
    let (merged, _) = env.report(NS, "merge").await;
    progress(started, "merge test succeeded");

    // 2. Every request fails its check: criticalLoad aborts; when did the shop see
    //    the last request?
    let (doomed_addr, _doomed) = shop::start(&[]);
    let log = RequestLog::start(doomed_addr, Duration::from_secs(900));
    let doomed = load_test(
        "doomed",
        &format!("http://{doomed_addr}"),
        json!({
            "workload": {"users": runners * 2, "duration": "300s"},
            "runners": {"parallelism": runners, "image": "bench/trimtab-sidecar"},
            "scenario": looping("/api/nothing-here", "response.status == 200", "100ms"),
            "guards": {"criticalLoad": {"errorRate": 0.5}, "window": "2s"},
        }),
    );
    env.apply(&doomed).await;
    env.wait_for_phase(
        NS,
        "doomed",
        Phase::Aborted,
        Duration::from_secs(600),
        || {},
    )
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (total, last_change) = log.stop();
    let (aborted, _) = env.report(NS, "doomed").await;
    let breach = abort_time(&aborted);
    let last = last_change.expect("the doomed shop saw requests");
    let after = match last.duration_since(breach) {
        Ok(d) => format!("+{:.0} ms", d.as_secs_f64() * 1e3),
        Err(e) => format!("−{:.0} ms", e.duration().as_secs_f64() * 1e3),
    };
    progress(started, "doomed test aborted");

    let skew = |r: &serde_json::Value| {
        r["startSkewMicros"]
            .as_u64()
            .map_or("n/a".into(), |us| format!("{:.1} ms", us as f64 / 1e3))
    };
    println!(
        "# bench/load-test-runners.sh --runners {runners} --seconds {seconds} — {} cores, load average {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!("| measure | value |");
    println!("| --- | ---: |");
    println!("| runner processes | {runners} |");
    println!(
        "| Job created → every runner registered | {:.1} s |",
        registered_after.as_secs_f64()
    );
    println!(
        "| start skew, merge test (max − min actual start) | {} |",
        skew(&merged)
    );
    println!("| start skew, abort test | {} |", skew(&aborted));
    println!(
        "| requests merged (merge test) | {} |",
        merged["results"]["requests"]
    );
    println!(
        "| operator CPU while merging ({runners} runners × a report / 2 s) | {:.1}% of one core |",
        100.0 * (cpu1 - cpu0) / (t1 - t0).as_secs_f64()
    );
    println!("| operator RSS during the test, peak sampled | {peak_rss:.1} MB |");
    println!("| operator VmHWM at the end | {hwm:.1} MB |");
    println!("| criticalLoad breach → last request at the target | {after} |");
    println!("| requests the doomed target answered | {total} |");
}
