//! The demo's main logic, run as `trimtab-demo` runs it but with short phases: real
//! shop replicas, the real sidecar and the real bots on 127.0.0.1. What it must show
//! is what the README promises: both algorithms serve the bots without a wire error,
//! cpuWeighted moves traffic to the big replica, and the stock invariant catches the
//! oversell bug.

use std::time::Duration;

use trimtab_demo::{Demo, Options, Progress, Sizing, render, run_demo};

/// Five-second phases, with the load scaled like the default one: fewer users, and
/// replicas slow enough (2 slots × 40 ms per unit: 50, 100 and 200 requests/s) that
/// the capacity-1 replica is still the bottleneck under round robin (200 users offer
/// about 190 requests/s, a third of it 63/s against its 50).
fn short_demo() -> Options {
    Options {
        phase_duration: Duration::from_secs(5),
        users: 200,
        sizing: Sizing {
            base_workers: 2,
            service_time: Duration::from_millis(40),
        },
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_phases_run_and_cpu_weighted_moves_load_to_the_big_shop() {
    let mut notes = Vec::new();
    let report = run_demo(&short_demo(), |p| notes.push(p))
        .await
        .expect("the demo starts and runs");
    let table = render(&report);
    let (rr, cw) = (&report.round_robin, &report.cpu_weighted);

    for row in [rr, cw] {
        assert!(row.requests > 0, "{} sent nothing:\n{table}", row.algorithm);
        assert_eq!(
            row.transport_errors(),
            0,
            "{} had wire errors {:?}: {:#?}\n{table}",
            row.algorithm,
            row.failures,
            row.first_failures
        );
        assert!(
            row.shops.iter().all(|s| s.responses > 0),
            "{}: every shop serves some traffic:\n{table}",
            row.algorithm
        );
    }
    // Round robin alternates: the two replicas it does not overload serve the same.
    let (rr_medium, rr_big) = (
        rr.share_of(2.0).expect("a capacity-2 shop"),
        rr.share_of(4.0).expect("a capacity-4 shop"),
    );
    assert!(
        (rr_medium - rr_big).abs() < 0.02,
        "round robin splits evenly:\n{table}"
    );
    let cw_big = cw.share_of(4.0).expect("a capacity-4 shop");
    assert!(
        cw_big > rr_big + 0.05,
        "cpuWeighted should send the capacity-4 shop more than round robin does:\n{table}"
    );
    let weights: Vec<u32> = cw.shops.iter().map(|s| s.weight).collect();
    assert!(
        weights[0] < weights[1] && weights[1] < weights[2],
        "the learnt weights follow the capacities 1:2:4: {weights:?}\n{table}"
    );

    let oversell = &report.oversell;
    assert!(
        oversell.requests > 0 && oversell.checkouts > 0,
        "the flash sale ran:\n{table}"
    );
    assert!(
        oversell.checks >= 2,
        "the invariant is checked during the sale and at its end:\n{table}"
    );

    let started = notes
        .iter()
        .filter(|p| matches!(p, Progress::Phase { .. }))
        .count();
    assert_eq!(started, 3, "one progress note per phase: {notes:?}");
    let json = serde_json::to_value(&report).expect("the report serializes");
    assert!(
        json["cpuWeighted"]["shops"][2]["share"].is_number(),
        "{json}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_invariant_catches_the_oversell_in_the_flash_sale() {
    let mut demo = Demo::start(short_demo()).await.expect("the demo starts");
    // A sale is one race per product (three units, then every checkout is refused), as
    // wide as the shop's OVERSELL_RACE_WINDOW; on a loaded machine one sale can still
    // miss it. Up to three independent sales, each on fresh replicas, must catch it.
    let mut oversell = demo.oversell().await.expect("the flash sale runs");
    for _ in 1..3 {
        if oversell.violations > 0 {
            break;
        }
        oversell = demo.oversell().await.expect("the flash sale runs");
    }
    demo.shutdown().await;
    assert!(
        oversell.violations > 0,
        "the stock invariant caught nothing in {} checks: {oversell:#?}",
        oversell.checks
    );
    let first = oversell
        .first_violation
        .as_ref()
        .expect("the offending response is kept");
    assert_eq!(first.request, "GET /api/admin/stock");
    assert!(
        first.response.contains("\"stock\":-"),
        "the excerpt shows the negative stock: {}",
        first.response
    );
    assert!(
        oversell.oversold.units > 0,
        "the shop itself counted oversold units: {oversell:#?}"
    );
}

#[tokio::test]
async fn a_missing_policy_file_is_refused_before_anything_starts() {
    let options = Options {
        policy: "/nonexistent/local-demo.yaml".into(),
        ..short_demo()
    };
    let error = run_demo(&options, |_| {})
        .await
        .expect_err("no policy file");
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/local-demo.yaml: cannot read:"),
        "{error}"
    );
}
