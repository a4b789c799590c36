//! The bots against a real shop on 127.0.0.1: the example scenario runs clean, the
//! oversell bug is caught by the stock invariant, broken scenarios are refused before
//! any traffic, and a seed replays a user's journey. Every run lasts a few seconds.

use std::time::Duration;

use shop::{Bug, Config, Shop};
use trimtab_api::load_test::LoadTestSpec;
use trimtab_sidecar::bots::run::{RunError, RunOptions, run};

const SHOP_LOADTEST: &str = include_str!("../../examples/shop-loadtest.yaml");

/// The example's spec, with `edit` applied to its YAML value (short think times and
/// a small population: the example is sized for a cluster).
fn shop_spec(edit: impl FnOnce(&mut serde_json::Value)) -> LoadTestSpec {
    let doc: serde_json::Value = serde_yaml_ng::from_str(SHOP_LOADTEST).expect("example parses");
    let mut spec = doc["spec"].clone();
    spec["workload"] = serde_json::json!({"users": 40, "duration": "3s"});
    spec["scenario"]["thinkTime"] =
        serde_json::json!({"distribution": "exponential", "mean": "20ms", "max": "200ms"});
    spec["invariants"][0]["every"] = serde_json::json!("500ms");
    edit(&mut spec);
    serde_json::from_value(spec).expect("edited spec is a LoadTestSpec")
}

fn options(addr: std::net::SocketAddr) -> RunOptions {
    RunOptions {
        target: Some(format!("http://{addr}")),
        duration: Some(Duration::from_secs(3)),
        request_timeout: Duration::from_secs(2),
        ..RunOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_scenario_runs_against_the_shop_with_no_failed_checks() {
    let (addr, shop) = Shop::bind(Config::ephemeral()).await.expect("shop starts");
    let output = run(&shop_spec(|_| {}), &options(addr))
        .await
        .expect("run starts");
    let r = &output.results;
    assert!(r.requests > 100, "only {} requests", r.requests);
    assert_eq!(r.checks_failed, 0, "failures: {:#?}", r.failure_examples);
    assert_eq!(r.failures.total(), 0, "failures: {:#?}", r.failure_examples);
    assert!(r.checks_passed >= r.requests);
    assert!(r.sessions_completed > 0);
    for state in ["login", "browse", "addToCart", "checkout"] {
        assert!(r.states[state].requests > 0, "{state} never ran");
    }
    assert_eq!(r.states["leave"].requests, 0, "leave sends no request");
    assert!(r.states["login"].transitions["browse"] > 0);
    assert_eq!(r.latency.corrected.count(), r.requests);
    let stock = &r.invariants["stock-never-negative"];
    assert!(stock.checks >= 2, "checked {} times", stock.checks);
    assert_eq!(stock.violations, 0);
    shop.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_invariant_catches_the_oversell_bug() {
    let config = Config {
        initial_stock: 3,
        base_workers: 32,
        bugs: vec![Bug::Oversell],
        ..Config::ephemeral()
    };
    let (addr, shop) = Shop::bind(config).await.expect("shop starts");
    let spec = shop_spec(|spec| {
        spec["workload"] = serde_json::json!({"users": 80, "duration": "3s"});
        // Everyone shops the first page, so everyone fights over product 1.
        spec["scenario"]["states"][1]["request"]["path"] =
            serde_json::json!("/api/products?page=1");
        spec["scenario"]["thinkTime"] =
            serde_json::json!({"distribution": "constant", "mean": "5ms"});
    });
    let output = run(&spec, &options(addr)).await.expect("run starts");
    let stock = &output.results.invariants["stock-never-negative"];
    assert!(
        stock.violations > 0,
        "no violation in {} checks",
        stock.checks
    );
    let example = stock
        .examples
        .first()
        .expect("an offending response is kept");
    assert_eq!(example.request, "GET /api/admin/stock");
    assert!(example.detail.contains("is false"), "{}", example.detail);
    assert!(
        example.response.contains("\"stock\":-"),
        "{}",
        example.response
    );
    assert!(shop.oversold().units > 0);
    shop.shutdown().await;
}

/// The scenario must be refused before any connection: the target here is a closed
/// port, so reaching the network would give `Unreachable`, not `Compile`.
async fn refusal(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let spec = shop_spec(edit);
    let options = RunOptions {
        target: Some("http://127.0.0.1:1".into()),
        ..RunOptions::default()
    };
    match run(&spec, &options).await {
        Err(RunError::Compile(e)) => e.to_string(),
        other => panic!("expected a compile refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_broken_scenario_is_refused_naming_state_and_field() {
    let bad_template = refusal(|s| {
        s["scenario"]["states"][2]["request"]["json"]["product"] = "{{ vars.product ".into();
    })
    .await;
    assert!(
        bad_template
            .starts_with("scenario.states[addToCart].request: json.product: template syntax error"),
        "{bad_template}"
    );
    let bad_path = refusal(|s| {
        s["scenario"]["states"][1]["extract"]["product"] = "$.items[0".into();
    })
    .await;
    assert!(
        bad_path.starts_with("scenario.states[browse].extract.product: JSONPath"),
        "{bad_path}"
    );
    let bad_cel = refusal(|s| {
        s["scenario"]["states"][1]["checks"][1] = "size(response.json.items) 0".into();
    })
    .await;
    assert!(
        bad_cel.starts_with("scenario.states[browse].checks[1]: CEL syntax error at column 27"),
        "{bad_cel}"
    );
    let unknown = refusal(|s| {
        s["scenario"]["states"][2]["next"][0]["state"] = "pay".into();
    })
    .await;
    assert!(
        unknown.starts_with("scenario.states[addToCart].next[0].state: unknown state \"pay\""),
        "{unknown}"
    );
}

#[tokio::test]
async fn an_unreachable_target_is_refused_at_start() {
    let options = RunOptions {
        target: Some("http://127.0.0.1:1".into()),
        ..RunOptions::default()
    };
    let error = run(&shop_spec(|_| {}), &options)
        .await
        .expect_err("nothing listens on port 1");
    assert!(matches!(error, RunError::Unreachable { .. }), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_replays_the_same_journey_for_one_user() {
    let (addr, shop) = Shop::bind(Config::ephemeral()).await.expect("shop starts");
    let spec = shop_spec(|spec| {
        spec["workload"] = serde_json::json!({"users": 5, "duration": "2s"});
    });
    let journey = |seed| {
        let spec = spec.clone();
        async move {
            let options = RunOptions {
                seed,
                trace_user: Some(3),
                duration: Some(Duration::from_secs(2)),
                ..options(addr)
            };
            run(&spec, &options).await.expect("run starts").journey
        }
    };
    let (first, second, other) = (journey(42).await, journey(42).await, journey(7).await);
    // Timing decides how far a user gets in 2 s; the path it takes is the seed's.
    let common = first.len().min(second.len());
    assert!(common >= 10, "only {common} steps");
    assert_eq!(first[..common], second[..common]);
    let common = first.len().min(other.len());
    assert_ne!(
        first[..common],
        other[..common],
        "another seed, another journey"
    );
    shop.shutdown().await;
}
