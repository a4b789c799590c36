//! Taking failing endpoints out of rotation, bringing them back, and retrying within
//! a budget.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::*;
use trimtab_api::{Duration as ApiDuration, RetryOn, balancer_policy::Algorithm};

#[tokio::test]
async fn ejects_endpoint_after_three_consecutive_5xx_and_returns_it_after_the_ejection_time() {
    let good = backend("good").await;
    let bad = backend("bad").await;
    bad.fail_with(500);
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[&good, &bad]);
    r.outlier_detection.consecutive_errors = 3;
    r.outlier_detection.base_ejection_time = ApiDuration::from_millis(1500);
    r.outlier_detection.max_ejection_percent = 50;
    let _sidecar = sidecar(vec![r]).await;
    let c = client();

    // Round robin alternates: the bad endpoint fails its 3rd request on the 6th overall.
    let (spread_before, _) = spread(&c, port, 6, Duration::from_secs(5)).await;
    assert_eq!(bad.hits(), 3, "{spread_before:?}");
    let (after, failures) = spread(&c, port, 20, Duration::from_secs(5)).await;
    assert_eq!(
        (after.get("good"), failures),
        (Some(&20), 0),
        "ejected endpoint got traffic"
    );
    assert_eq!(bad.hits(), 3);

    bad.recover();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (recovered, failures) = spread(&c, port, 20, Duration::from_secs(5)).await;
    assert_eq!(failures, 0);
    assert_eq!(recovered.get("bad"), Some(&10), "{recovered:?}");
}

#[tokio::test]
async fn panic_threshold_balances_over_all_endpoints_when_too_few_are_usable() {
    let a = backend("a").await;
    let b = backend("b").await;
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[&a, &b]);
    r.endpoints[0].state = trimtab_api::balancer_policy::EndpointState::Unhealthy;
    r.endpoints[1].state = trimtab_api::balancer_policy::EndpointState::Unhealthy;
    r.outlier_detection.panic_threshold_percent = 50;
    let _sidecar = sidecar(vec![r]).await;
    let (spread, failures) = spread(&client(), port, 10, Duration::from_secs(5)).await;
    assert_eq!(failures, 0);
    assert_eq!((spread.get("a"), spread.get("b")), (Some(&5), Some(&5)));
}

#[tokio::test]
async fn retries_a_503_on_another_endpoint() {
    let good = backend("good").await;
    let bad = backend("bad").await;
    bad.fail_with(503);
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[&bad, &good]);
    r.retries.attempts = 2;
    r.retries.retry_on = vec![RetryOn::Status(503)];
    r.retries.backoff = ApiDuration::from_millis(1);
    r.retries.max_backoff = ApiDuration::from_millis(5);
    let _sidecar = sidecar(vec![r]).await;
    let (spread, failures) = spread(&client(), port, 10, Duration::from_secs(5)).await;
    assert_eq!((spread.get("good"), failures), (Some(&10), 0), "{spread:?}");
}

#[tokio::test]
async fn does_not_retry_a_post_unless_non_idempotent_is_set() {
    let bad = backend("bad").await;
    bad.fail_with(503);
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[&bad]);
    r.retries.attempts = 2;
    r.retries.retry_on = vec![RetryOn::Status(503)];
    r.retries.backoff = ApiDuration::from_millis(1);
    let _sidecar = sidecar(vec![r]).await;
    let c = client();
    let post = || {
        http::Request::post(format!("http://127.0.0.1:{port}/"))
            .body(Default::default())
            .unwrap()
    };
    assert_eq!(send(&c, post()).await.0, 503);
    assert_eq!(bad.hits(), 1);
    let (status, _, _) = get(&c, port, "/").await;
    assert_eq!(status, 503);
    assert_eq!(bad.hits(), 4, "a GET is tried 1 + 2 times");
}

#[tokio::test]
async fn honours_retry_after_capped_at_max_backoff() {
    let bad = backend("bad").await;
    bad.fail_with(503);
    *bad.retry_after.lock().unwrap() = Some("10".into());
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[&bad]);
    r.retries.attempts = 1;
    r.retries.retry_on = vec![RetryOn::Status(503)];
    r.retries.backoff = ApiDuration::from_millis(1);
    r.retries.max_backoff = ApiDuration::from_millis(300);
    let _sidecar = sidecar(vec![r]).await;
    let started = std::time::Instant::now();
    let (status, _, _) = get(&client(), port, "/").await;
    let waited = started.elapsed();
    assert_eq!((status, bad.hits()), (503, 2));
    // The backend asked for 10 s; the sidecar waited maxBackoff (300 ms), not 1 ms.
    assert!(
        waited >= Duration::from_millis(290) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

/// During a total outage every request fails. Without a budget, 50 concurrent
/// requests with 3 retries each would hit the backends 200 times; the budget (20% of
/// active requests, at least 3 retries in flight) keeps that close to 50.
#[tokio::test]
async fn retry_budget_caps_retries_during_an_outage() {
    let a = backend("a").await;
    let b = backend("b").await;
    a.fail_with(503);
    b.fail_with(503);
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[&a, &b]);
    r.retries.attempts = 3;
    r.retries.retry_on = vec![RetryOn::Status(503)];
    r.retries.budget_percent = 20;
    r.retries.backoff = ApiDuration::from_millis(50);
    r.retries.max_backoff = ApiDuration::from_millis(50);
    let _sidecar = sidecar(vec![r]).await;
    let c = client();
    let requests = 50;
    let tasks: Vec<_> = (0..requests)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { get(&c, port, "/").await.0 })
        })
        .collect();
    for t in tasks {
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .unwrap()
                .unwrap(),
            503
        );
    }
    let hits = a.hits() + b.hits();
    assert!(hits >= requests, "{hits}");
    assert!(
        hits <= requests + 3 * 13,
        "retry storm: {hits} attempts for {requests} requests"
    );
}

#[tokio::test]
async fn active_health_checks_take_a_failing_endpoint_out_and_bring_it_back() {
    let good = backend("good").await;
    let flaky = backend("flaky").await;
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[&good, &flaky]);
    r.health_check = Some(trimtab_api::balancer_policy::HealthCheck {
        path: "/healthz".into(),
        interval: ApiDuration::from_millis(50),
        timeout: ApiDuration::from_millis(40),
        unhealthy_threshold: 2,
        healthy_threshold: 2,
    });
    let _sidecar = sidecar(vec![r]).await;
    let c = client();
    flaky.fail_with(500);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (during, _) = spread(&c, port, 10, Duration::from_secs(5)).await;
    assert_eq!(during.get("good"), Some(&10), "{during:?}");
    flaky.recover();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (after, _) = spread(&c, port, 10, Duration::from_secs(5)).await;
    assert!(after.get("flaky").copied().unwrap_or(0) >= 4, "{after:?}");
}
