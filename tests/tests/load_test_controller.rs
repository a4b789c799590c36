//! The LoadTest controller end to end: the real operator process makes the scenario
//! ConfigMap, the token Secret and the Indexed Job, the real Job controller
//! (kube-controller-manager) makes the Pods, and the test node agent runs them as
//! `trimtab-bots` processes against the shop example on loopback. The runners register
//! with the operator, start together and report; the test checks the merged status and
//! report against the runners' own results, the invariant violations of the oversell
//! bug, a refused runner token, a broken scenario, a criticalLoad abort proven by the
//! shop's own request counter, CPU guards reading a real Prometheus (maxLoad pauses and
//! resumes, criticalLoad aborts), an operator restart mid-test, a runner that dies, and
//! a test deleted mid-run.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::StreamBody;
use hyper::body::Frame;
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{ConfigMap, Event, Pod, Secret},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;
use trimtab_api::{
    load_test::{LoadTest, Phase},
    results::{Results, human},
    runner_protocol,
};
use trimtab_tests::{
    load_test_env::{self, LoadTestEnv, abort_time, looping},
    operator_process::{https_client, workspace_binary},
    prometheus_server::{CpuExporter, Prometheus},
    shop::{self, RequestLog},
};

const NAMESPACE: &str = "load";
/// How long a test may take to reach a phase.
const WAIT: Duration = Duration::from_secs(120);

/// A LoadTest against `target` with this file's defaults (4 users, 3 s, 2 runners)
/// under the fields `spec` sets.
fn load_test(name: &str, target: &str, spec: serde_json::Value) -> serde_json::Value {
    let defaults = json!({
        "target": {"url": target},
        "workload": {"users": 4, "duration": "3s"},
        "runners": {"parallelism": 2, "image": "example.invalid/trimtab-sidecar:test"},
    });
    load_test_env::load_test(NAMESPACE, name, &[defaults, spec])
}

/// Everyone buys the first product of page 1 at once: the oversell bug's race.
fn flash_sale() -> serde_json::Value {
    json!({
        "start": "login",
        "thinkTime": {"distribution": "constant", "mean": "5ms"},
        "states": [
            {"name": "login", "request": {"method": "POST", "path": "/api/login", "json": {"user": "bot-{{ user.id }}"}},
             "extract": {"token": "$.token"}, "next": [{"state": "browse", "weight": 1}]},
            {"name": "browse", "request": {"path": "/api/products?page=1", "headers": {"authorization": "Bearer {{ vars.token }}"}},
             "extract": {"product": "$.items[0].id"}, "next": [{"state": "cart", "weight": 1}]},
            {"name": "cart", "request": {"method": "POST", "path": "/api/cart", "headers": {"authorization": "Bearer {{ vars.token }}"},
             "json": {"product": "{{ vars.product }}", "quantity": 1}}, "next": [{"state": "checkout", "weight": 1}]},
            {"name": "checkout", "request": {"method": "POST", "path": "/api/checkout", "headers": {"authorization": "Bearer {{ vars.token }}"}},
             "checks": ["response.status == 200 || response.status == 409"], "next": [{"state": "browse", "weight": 1}]},
        ],
    })
}

/// `trimtab-bots` as the node agent runs it, with `--json` into the container's own
/// directory: what each runner process itself measured, to check the merge against.
fn bots_recording_results(dir: &Path, bots: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let wrapper = dir.join("trimtab-bots-recording");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexport TRIMTAB_JSON=\"$PWD/results.json\"\nexec '{}' \"$@\"\n",
            bots.display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    wrapper
}

/// The results each runner of `test` wrote, in completion-index order, and its log.
fn runner_results(work: &Path, test: &str) -> Vec<(Results, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(work).expect("work dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&format!("{NAMESPACE}_{test}-runners-")) || name.ends_with(".log") {
            continue;
        }
        let log = std::fs::read_to_string(work.join(format!("{name}.log"))).unwrap_or_default();
        let json = std::fs::read(entry.path().join("results.json"))
            .unwrap_or_else(|e| panic!("{name}/results.json: {e}\nlog:\n{log}"));
        found.push((name, serde_json::from_slice(&json).expect("results"), log));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found.into_iter().map(|(_, r, l)| (r, l)).collect()
}

/// The target's own counter shows no request later than two report intervals after
/// the guard's breach (the abort event in the report).
async fn assert_quiet_after_breach(env: &LoadTestEnv, test: &str, log: RequestLog) {
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (total, last_change) = log.stop();
    let (report_json, _) = env.report(NAMESPACE, test).await;
    let breach = abort_time(&report_json);
    assert!(total > 0, "{test} sent nothing");
    let last_change = last_change.expect("the counter moved");
    eprintln!(
        "{test}: last request at the target {:?} after the breach",
        last_change.duration_since(breach).unwrap_or_default()
    );
    // Two report intervals (2 s each), plus the sampler's own 100 ms period.
    let limit = breach + Duration::from_millis(4_100);
    assert!(
        last_change <= limit,
        "{test}: a request arrived {:?} after the breach",
        last_change.duration_since(breach).unwrap_or_default()
    );
}

#[tokio::test]
async fn load_tests_start_together_merge_results_exactly_and_abort_at_critical_load() {
    let (shop_addr, _shop) = shop::start(&[]);
    let bots = workspace_binary("trimtab-sidecar", "trimtab-bots").expect("trimtab-bots");
    let work = tempfile::tempdir().expect("work dir");
    let recording = bots_recording_results(work.path(), &bots);
    let node_dir = work.path().join("node");
    let env = LoadTestEnv::start(NAMESPACE, &recording, &node_dir, &[]).await;
    let (cluster, operator, cert, control_plane) =
        (&env.cluster, &env.operator, &env.cert, &env.control_plane);

    let tests = Api::<LoadTest>::namespaced(cluster.client(), NAMESPACE);
    let target = format!("http://{shop_addr}");

    // 1. Two runners start together and report; status and report equal the merge of
    //    what the runner processes themselves recorded.
    let health = load_test(
        "health",
        &target,
        json!({
            "workload": {"users": 4, "duration": "10s"},
            "scenario": looping("/healthz", "response.status == 200", "50ms"),
        }),
    );
    env.apply(&health).await;
    // A runner with another token is refused while the test runs.
    env.wait_for_phase(NAMESPACE, "health", Phase::Running, WAIT, || {})
        .await;
    let scenario_file = work.path().join("health.yaml");
    std::fs::write(&scenario_file, health.to_string()).expect("scenario file");
    let rogue = tokio::process::Command::new(&bots)
        .arg("run")
        .arg(&scenario_file)
        .args([
            "--target",
            &target,
            "--shard",
            "0/2",
            "--test",
            "load/health",
        ])
        .args(["--token", "not-the-token", "--start-deadline", "20s"])
        .arg(format!("--control-plane={control_plane}"))
        .arg(format!("--control-plane-ca={}", cert.cert.display()))
        .output()
        .await
        .expect("rogue runner");
    let stderr = String::from_utf8_lossy(&rogue.stderr);
    assert_eq!(rogue.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("refused runner 0: 401") && stderr.contains("token"),
        "{stderr}"
    );
    // A stranger is refused before its body is read: a report that announces 100 MiB
    // and sends one chunk gets its 401 at once, not after the body.
    let chunk = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(
        Bytes::from_static(b"{\"seq\": 1, "),
    ))])
    .chain(futures_util::stream::pending());
    let request = hyper::Request::post(format!(
        "{control_plane}{}",
        runner_protocol::report_path(NAMESPACE, "health", 0)
    ))
    .header("authorization", "Bearer not-the-token")
    .header("content-length", (100u64 << 20).to_string())
    .body(StreamBody::new(chunk))
    .expect("request");
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        https_client(&cert.pem).request(request),
    )
    .await
    .expect("refused without reading the body")
    .expect("an answer");
    assert_eq!(refused.status(), 401);
    // The operator crashes and comes back while the test runs: the runners' next
    // reports rebuild its view, the start they were given included, and nothing they
    // had reported is lost (checked below against the runners' own results).
    let given_start = tests
        .get("health")
        .await
        .expect("health")
        .status
        .and_then(|s| s.start_time)
        .expect("a start time");
    operator.restart().await;

    let done = env
        .wait_for_phase(NAMESPACE, "health", Phase::Succeeded, WAIT, || {})
        .await;
    let status = done.status.expect("status");
    let runners = status.runners.clone().expect("runner counts");
    assert_eq!((runners.finished, runners.failed), (2, 0), "{runners:?}");
    let reported = runner_results(&node_dir, "health");
    assert_eq!(reported.len(), 2);
    let mut merged = Results::default();
    for (results, log) in &reported {
        assert!(results.requests > 0, "a runner sent nothing:\n{log}");
        merged.merge(results);
    }
    let requests = status.requests.clone().expect("request counts");
    assert_eq!(requests.total, merged.requests);
    assert_eq!(requests.failed, merged.failures.total());
    let latency = status.latency.clone().expect("latency");
    assert_eq!(
        latency.p99,
        human(merged.latency.corrected.quantile(0.99)),
        "status p99 from the operator's merge = the test's own merge"
    );
    let (report_json, summary) = env.report(NAMESPACE, "health").await;
    let reported_results: Results =
        serde_json::from_value(report_json["results"].clone()).expect("results in the report");
    assert_eq!(
        reported_results, merged,
        "the report's results, histograms included, are exactly the runners' merged"
    );
    // One start: every runner began within a few milliseconds of the others.
    let skew = report_json["startSkewMicros"].as_u64().expect("start skew");
    eprintln!("start skew of 2 runners: {skew} µs");
    assert!(skew < 250_000, "start skew {skew} µs");
    let start = report_json["startAtUnixMicros"].as_u64().expect("a start");
    let given = u64::try_from(given_start.0.as_microsecond()).expect("after 1970");
    // status.startTime has whole seconds.
    assert!(
        start.abs_diff(given) < 1_000_000,
        "the start after the restart ({start} µs) is the one given before ({given} µs)"
    );
    assert_eq!(
        status.report.map(|r| r.config_map).as_deref(),
        Some("health-report")
    );
    assert!(
        summary.contains("get") && summary.contains("all"),
        "{summary}"
    );
    let secret = Api::<Secret>::namespaced(cluster.client(), NAMESPACE)
        .get("health-runner-token")
        .await
        .expect("the token Secret");
    assert!(secret.data.is_some_and(|d| d.contains_key("token")));
    // cleanup: onSuccess (the default) deletes the Job; scenario and report stay.
    let jobs = Api::<Job>::namespaced(cluster.client(), NAMESPACE);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while jobs.get_opt("health-runners").await.expect("job").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Job was not cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let scenario = Api::<ConfigMap>::namespaced(cluster.client(), NAMESPACE)
        .get("health-scenario")
        .await
        .expect("the scenario ConfigMap stays");
    assert!(scenario.data.expect("data")["loadtest.yaml"].contains("/healthz"));

    // 2. The oversell bug: the stock invariant's violations reach status and report.
    let (sale_addr, _sale_shop) = shop::start(&[
        "--bug=oversell",
        "--initial-stock=3",
        "--base-workers=16",
        "--service-time=1ms",
    ]);
    let sale = load_test(
        "sale",
        &format!("http://{sale_addr}"),
        json!({
            "workload": {"users": 40, "duration": "4s"},
            "scenario": flash_sale(),
            "invariants": [{"name": "stock-never-negative", "request": {"path": "/api/admin/stock"},
                            "expect": "response.json.items.all(i, i.stock >= 0)", "every": "1s"}],
        }),
    );
    env.apply(&sale).await;
    let sold = env
        .wait_for_phase(NAMESPACE, "sale", Phase::Succeeded, WAIT, || {})
        .await;
    let invariants = sold.status.expect("status").invariants;
    assert!(
        invariants
            .iter()
            .any(|i| i.name == "stock-never-negative" && i.violations > 0),
        "{invariants:?}"
    );
    let (_, summary) = env.report(NAMESPACE, "sale").await;
    assert!(
        summary.contains("stock-never-negative:")
            && !summary.contains("stock-never-negative: 0 violations"),
        "{summary}"
    );

    // 3. criticalLoad: every request fails its check; the guard aborts the test, and the
    //    shop's own counter shows nothing arrived 2 report intervals after the breach.
    let (doomed_addr, _doomed_shop) = shop::start(&[]);
    let log = RequestLog::start(doomed_addr, Duration::from_secs(120));
    let doomed = load_test(
        "doomed",
        &format!("http://{doomed_addr}"),
        json!({
            "workload": {"users": 6, "duration": "60s"},
            "scenario": looping("/api/nothing-here", "response.status == 200", "20ms"),
            "guards": {"criticalLoad": {"errorRate": 0.5}, "window": "2s"},
        }),
    );
    env.apply(&doomed).await;
    let aborted = env
        .wait_for_phase(NAMESPACE, "doomed", Phase::Aborted, WAIT, || {})
        .await;
    let status = aborted.status.expect("status");
    assert!(
        status.conditions.iter().any(|c| c.type_ == "Aborted"
            && c.reason == "CriticalLoad"
            && c.message.contains("error rate")),
        "{:?}",
        status.conditions
    );
    assert_quiet_after_breach(&env, "doomed", log).await;
    // onSuccess keeps an aborted test's Job for inspection, suspended.
    let job = jobs.get("doomed-runners").await.expect("job");
    assert_eq!(job.spec.and_then(|s| s.suspend), Some(true));

    // 4. CPU guards from a real Prometheus: over maxLoad the test pauses, back under
    //    it resumes, over criticalLoad it aborts.
    let (exporter, exporter_addr) = CpuExporter::start().await.expect("exporter starts");
    exporter.set_cores(NAMESPACE, "hot-0", 0.2);
    let prometheus = Prometheus::start(exporter_addr)
        .await
        .expect("prometheus starts");
    let target_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "hot-0", "labels": {"app": "hot"}},
        // Bound elsewhere: only its labels and CPU request matter here.
        "spec": {"nodeName": "elsewhere", "containers": [{"name": "app", "image": "shop",
                 "resources": {"requests": {"cpu": "1"}}}]},
    }))
    .expect("pod");
    Api::<Pod>::namespaced(cluster.client(), NAMESPACE)
        .create(&PostParams::default(), &target_pod)
        .await
        .expect("target pod");
    let (hot_addr, _hot_shop) = shop::start(&[]);
    let log = RequestLog::start(hot_addr, Duration::from_secs(120));
    let hot = load_test(
        "hot",
        &format!("http://{hot_addr}"),
        json!({
            "target": {"url": format!("http://{hot_addr}"), "podSelector": {"matchLabels": {"app": "hot"}}},
            // Ramping 16 users over 40 s, so that a hold has load to shed.
            "workload": {"users": 16, "rampUp": "40s", "duration": "120s"},
            "scenario": looping("/healthz", "response.status == 200", "50ms"),
            "guards": {
                "maxLoad": {"cpu": 0.6},
                "criticalLoad": {"cpu": 0.9},
                "window": "2s",
                "cpuSource": "prometheus",
                "prometheus": {
                    "url": prometheus.url(),
                    "query": "sum by (pod) (rate(container_cpu_usage_seconds_total{namespace=\"$namespace\",container!=\"\"}[5s]))",
                },
            },
        }),
    );
    env.apply(&hot).await;
    env.wait_for_phase(NAMESPACE, "hot", Phase::Running, WAIT, || {})
        .await;
    // The live numbers are on the operator's /metrics too.
    let operator_metrics = shop::get_text(operator.admin_addr, "/metrics").await;
    assert!(
        operator_metrics.contains(r#"trimtab_loadtest_requests{loadtest="hot",namespace="load"}"#),
        "{operator_metrics}"
    );
    let active = || async {
        tests
            .get("hot")
            .await
            .ok()
            .and_then(|t| t.status?.users)
            .map_or(0, |u| u.active)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while active().await < 3 {
        assert!(tokio::time::Instant::now() < deadline, "hot never ramped");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    exporter.set_cores(NAMESPACE, "hot-0", 0.75);
    let paused = env
        .wait_for_phase(NAMESPACE, "hot", Phase::Paused, WAIT, || {})
        .await;
    let guard = paused.status.and_then(|s| s.guard).expect("guard status");
    assert!(
        guard
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("maxLoad: cpu")),
        "{guard:?}"
    );
    // Held: once every runner has been told (its next report, ≤ 2 s) and has reported
    // again (≤ 2 s more), the active users stay at the hold's ceiling while the ramp
    // would have gone on adding users.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let mut held = 0;
    for _ in 0..12 {
        held = held.max(active().await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    exporter.set_cores(NAMESPACE, "hot-0", 0.2);
    env.wait_for_phase(NAMESPACE, "hot", Phase::Running, WAIT, || {})
        .await;
    // Resumed: the ramp goes on past the ceiling.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while active().await <= held {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ramp did not resume past {held} users"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    exporter.set_cores(NAMESPACE, "hot-0", 1.0);
    let aborted = env
        .wait_for_phase(NAMESPACE, "hot", Phase::Aborted, WAIT, || {})
        .await;
    let reason = aborted
        .status
        .and_then(|s| s.guard)
        .and_then(|g| g.reason)
        .unwrap_or_default();
    assert!(reason.starts_with("criticalLoad: cpu"), "{reason}");
    assert_quiet_after_breach(&env, "hot", log).await;
    let (report_json, _) = env.report(NAMESPACE, "hot").await;
    let ceiling = report_json["guardEvents"]
        .as_array()
        .and_then(|events| events.iter().find(|e| e["state"] == "holding"))
        .and_then(|e| e["ceiling"].as_u64())
        .expect("the hold's ceiling");
    eprintln!("hot: held at {held} active users, the hold's ceiling {ceiling} of 16");
    // Each of the 2 runners keeps at least one user.
    assert!(
        ceiling < 16 && held <= ceiling.max(2),
        "held at {held} active users, ceiling {ceiling}"
    );

    // 5. A runner that dies fails the test (docs/load-tests.md): what the others
    //    reported is still in the report. Then a running test that is deleted stops:
    //    its Job and runners go, and the target sees no more requests.
    let (dies_addr, _dies_shop) = shop::start(&[]);
    let dies = load_test(
        "dies",
        &format!("http://{dies_addr}"),
        json!({
            "workload": {"users": 4, "duration": "60s"},
            "scenario": looping("/healthz", "response.status == 200", "50ms"),
        }),
    );
    env.apply(&dies).await;
    env.wait_for_phase(NAMESPACE, "dies", Phase::Running, WAIT, || {})
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Runner 0's command line holds its Pod's name (its scenario path).
    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-f", &format!("{NAMESPACE}_dies-runners-0-")])
        .status()
        .expect("pkill");
    assert!(killed.success(), "runner 0 of dies was not found");
    let failed = env
        .wait_for_phase(NAMESPACE, "dies", Phase::Failed, WAIT, || {})
        .await;
    let status = failed.status.expect("status");
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Failed" && c.reason == "RunnerFailed"),
        "{:?}",
        status.conditions
    );
    let (report_json, _) = env.report(NAMESPACE, "dies").await;
    assert!(
        report_json["results"]["requests"].as_u64() > Some(0),
        "the runners' reports before the death are kept: {report_json}"
    );

    let (gone_addr, _gone_shop) = shop::start(&[]);
    let gone = load_test(
        "gone",
        &format!("http://{gone_addr}"),
        json!({
            "workload": {"users": 4, "duration": "60s"},
            "scenario": looping("/healthz", "response.status == 200", "50ms"),
        }),
    );
    env.apply(&gone).await;
    env.wait_for_phase(NAMESPACE, "gone", Phase::Running, WAIT, || {})
        .await;
    // Running means the start is fixed (2 s ahead): wait for the traffic itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while shop::requests(gone_addr).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "gone never sent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = RequestLog::start(gone_addr, Duration::from_secs(60));
    tests
        .delete("gone", &Default::default())
        .await
        .expect("delete gone");
    let deleted = SystemTime::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while jobs.get_opt("gone-runners").await.expect("job").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deleted test's Job stayed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (total, last_change) = log.stop();
    assert!(total > 0, "gone sent nothing");
    let after = last_change
        .and_then(|t| t.duration_since(deleted).ok())
        .unwrap_or_default();
    eprintln!("gone: last request at the target {after:?} after the delete");
    assert!(
        after < Duration::from_secs(10),
        "requests went on {after:?} after the LoadTest was deleted"
    );

    // 6. A scenario the runners refuse (a CEL check that does not compile) fails it.
    env.apply(&load_test(
        "broken",
        &target,
        json!({"scenario": looping("/healthz", "response.status ==", "50ms")}),
    ))
    .await;
    let failed = env
        .wait_for_phase(NAMESPACE, "broken", Phase::Failed, WAIT, || {})
        .await;
    let status = failed.status.expect("status");
    assert!(status.runners.expect("runners").failed >= 1);
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Failed" && c.reason == "RunnerFailed"),
        "{:?}",
        status.conditions
    );
    // onSuccess keeps a failed test's runners for inspection.
    assert!(jobs.get_opt("broken-runners").await.expect("job").is_some());
    let events = Api::<Event>::namespaced(cluster.client(), NAMESPACE)
        .list(&ListParams::default())
        .await
        .expect("events");
    let reasons: Vec<_> = events
        .items
        .iter()
        .filter(|e| e.involved_object.name.as_deref() == Some("broken"))
        .filter_map(|e| e.reason.clone())
        .collect();

    assert!(
        reasons.iter().any(|r| r == "RunnerFailed"),
        "events of broken: {reasons:?}\noperator log:\n{}",
        operator.log_text()
    );
}
