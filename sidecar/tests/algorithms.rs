//! The traffic split of each algorithm, measured through the proxy against real
//! backends on 127.0.0.1.
#![allow(clippy::unwrap_used)]

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use support::*;
use trimtab_api::{Duration as ApiDuration, balancer_policy::Algorithm};

#[tokio::test]
async fn round_robin_splits_traffic_evenly() {
    let (a, b, c) = (backend("a").await, backend("b").await, backend("c").await);
    let port = free_port();
    let _s = sidecar(vec![route("r", port, Algorithm::RoundRobin, &[&a, &b, &c])]).await;
    let (split, failures) = spread(&client(), port, 90, Duration::from_secs(10)).await;
    assert_eq!(failures, 0);
    assert_eq!((split["a"], split["b"], split["c"]), (30, 30, 30));
}

#[tokio::test]
async fn weighted_round_robin_splits_5_1_1_in_the_nginx_order() {
    let (a, b, c) = (backend("a").await, backend("b").await, backend("c").await);
    let port = free_port();
    let mut r = route("r", port, Algorithm::WeightedRoundRobin, &[&a, &b, &c]);
    for (endpoint, weight) in r.endpoints.iter_mut().zip([5, 1, 1]) {
        endpoint.weight = weight;
    }
    let _s = sidecar(vec![r]).await;
    let cl = client();
    let mut order = String::new();
    for _ in 0..7 {
        order.push_str(&get(&cl, port, "/").await.1);
    }
    assert_eq!(order, "aabacaa");
    let (split, _) = spread(&cl, port, 70, Duration::from_secs(10)).await;
    assert_eq!((split["a"], split["b"], split["c"]), (50, 10, 10));
}

/// Eight concurrent clients against one fast and one slow (40 ms) backend: the
/// load-aware algorithms send the slow one much less than half, round robin half.
async fn slow_backend_share(algorithm: Algorithm) -> f64 {
    let fast = backend("fast").await;
    let slow = backend("slow").await;
    slow.delay_ms.store(40, Ordering::SeqCst);
    fast.delay_ms.store(2, Ordering::SeqCst);
    let port = free_port();
    let _s = sidecar(vec![route("r", port, algorithm, &[&fast, &slow])]).await;
    let workers: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let c = client();
                spread(&c, port, 60, Duration::from_secs(5)).await
            })
        })
        .collect();
    for w in workers {
        assert_eq!(w.await.unwrap().1, 0);
    }
    slow.hits() as f64 / (slow.hits() + fast.hits()) as f64
}

#[tokio::test]
async fn least_connections_sends_less_traffic_to_a_slow_endpoint() {
    let share = slow_backend_share(Algorithm::LeastConnections).await;
    assert!(share < 0.3, "slow endpoint got {share:.2}");
}

#[tokio::test]
async fn least_request_sends_less_traffic_to_a_slow_endpoint() {
    let share = slow_backend_share(Algorithm::LeastRequest).await;
    assert!(share < 0.3, "slow endpoint got {share:.2}");
}

#[tokio::test]
async fn peak_ewma_sends_less_traffic_to_a_slow_endpoint() {
    let share = slow_backend_share(Algorithm::PeakEwma).await;
    assert!(share < 0.3, "slow endpoint got {share:.2}");
}

#[tokio::test]
async fn round_robin_ignores_latency() {
    let share = slow_backend_share(Algorithm::RoundRobin).await;
    assert!(
        (0.45..=0.55).contains(&share),
        "slow endpoint got {share:.2}"
    );
}

/// A backend that reports ORCA load as its request rate over its capacity, measured
/// over 100 ms windows: what a real server's CPU would say.
fn report_load(b: &Backend, capacity_rps: f64) {
    let rate = Arc::new(AtomicU64::new(0));
    let hits = Arc::clone(&b.hits);
    let window_rate = Arc::clone(&rate);
    tokio::spawn(async move {
        let mut last = hits.load(Ordering::SeqCst);
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = hits.load(Ordering::SeqCst);
            window_rate.store(((now - last) as f64 * 10.0).to_bits(), Ordering::SeqCst);
            last = now;
        }
    });
    *b.load_report.lock().unwrap() = Some(Arc::new(move || {
        let rps = f64::from_bits(rate.load(Ordering::SeqCst)).max(1.0);
        Some(format!(
            "TEXT cpu_utilization={:.4}, rps_fractional={rps:.1}",
            rps / capacity_rps
        ))
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_weighted_moves_traffic_toward_capacity_from_load_reports() {
    let small = backend("small").await;
    let big = backend("big").await;
    report_load(&small, 2_000.0);
    report_load(&big, 6_000.0);
    let port = free_port();
    let mut r = route("r", port, Algorithm::CpuWeighted, &[&small, &big]);
    r.weighting.interval = ApiDuration::from_millis(200);
    r.weighting.smoothing = 0.5;
    let _s = sidecar(vec![r]).await;
    let load = |seconds: u64| async move {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                tokio::spawn(async move {
                    spread(&client(), port, 5_000, Duration::from_secs(seconds)).await
                })
            })
            .collect();
        for w in workers {
            assert_eq!(w.await.unwrap().1, 0);
        }
    };
    // Warm up: weights start equal and converge over a few update periods.
    load(2).await;
    let (small_before, big_before) = (small.hits(), big.hits());
    let started = Instant::now();
    load(2).await;
    let (s, b) = (small.hits() - small_before, big.hits() - big_before);
    let big_share = b as f64 / (s + b) as f64;
    // Capacities 1:3 → the big backend's fair share is 0.75.
    assert!(
        (0.6..=0.9).contains(&big_share),
        "big backend got {big_share:.2} of {} requests in {:?}",
        s + b,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_weighted_lets_an_endpoint_ejected_for_load_back_once_it_cools() {
    let (a, b) = (backend("a").await, backend("b").await);
    let hot = backend("hot").await;
    report_load(&a, 5_000.0);
    report_load(&b, 5_000.0);
    // Above criticalLoad whatever its traffic, until it cools (below).
    *hot.load_report.lock().unwrap() =
        Some(Arc::new(|| Some("TEXT cpu_utilization=0.99".to_owned())));
    let port = free_port();
    let mut r = route("r", port, Algorithm::CpuWeighted, &[&a, &b, &hot]);
    r.weighting.interval = ApiDuration::from_millis(200);
    // Its last report would keep it out for a minute if stale reports counted.
    r.weighting.sample_expiry = ApiDuration::from_secs(60);
    let _s = sidecar(vec![r]).await;
    let load = |seconds: u64| async move {
        let (_, failed) = spread(&client(), port, 20_000, Duration::from_secs(seconds)).await;
        assert_eq!(failed, 0);
    };
    load(1).await;
    let before = hot.hits();
    load(1).await;
    let while_hot = hot.hits() - before;
    // Now it reports like the others: its rate over the same capacity.
    report_load(&hot, 5_000.0);
    load(2).await;
    let before = (hot.hits(), a.hits() + b.hits());
    load(1).await;
    let (hot_after, others_after) = (hot.hits() - before.0, a.hits() + b.hits() - before.1);
    let share = hot_after as f64 / (hot_after + others_after) as f64;
    assert!(
        share > 0.1,
        "back in service it got {share:.2} of the traffic ({hot_after} requests; {while_hot} while hot)"
    );
}
