//! Capacity emulation: the ORCA header reports utilization that follows the load, and
//! a capacity change takes effect while the shop runs.

mod common;

use std::time::{Duration, Instant};

use common::Shopper;
use futures_util::future::join_all;
use http::StatusCode;
use shop::{Config, Shop};

const SERVICE_TIME: Duration = Duration::from_millis(20);

fn config() -> Config {
    Config {
        service_time: SERVICE_TIME,
        base_workers: 4,
        utilization_window: Duration::from_millis(300),
        ..Config::ephemeral()
    }
}

/// Keeps `concurrency` requests in flight against /api/products for `duration`.
async fn load(shopper: &Shopper, concurrency: usize, duration: Duration) {
    let until = Instant::now() + duration;
    join_all((0..concurrency).map(|_| {
        let shopper = shopper.clone();
        async move {
            while Instant::now() < until {
                assert_eq!(
                    shopper.get("/api/products", None).await.status,
                    StatusCode::OK
                );
            }
        }
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orca_utilization_rises_under_load_and_falls_back_when_idle() {
    let (addr, shop) = Shop::bind(config()).await.expect("shop starts");
    let shopper = Shopper::new(addr);

    let idle = shopper.get("/healthz", None).await.orca();
    assert!(idle["cpu_utilization"] < 0.05, "idle: {idle:?}");
    assert_eq!(idle["named_metrics.workers"], 4.0);

    // Twice as many clients as slots: the pool saturates and requests queue.
    let loaded = tokio::spawn({
        let shopper = shopper.clone();
        async move { load(&shopper, 8, Duration::from_millis(1500)).await }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let busy = shopper.get("/healthz", None).await.orca();
    assert!(busy["cpu_utilization"] > 0.8, "saturated: {busy:?}");
    assert!(
        busy["named_metrics.demand"] > 1.2,
        "requests queue: {busy:?}"
    );
    assert!(busy["rps_fractional"] > 50.0, "serving: {busy:?}");
    assert!(shop.load().utilization > 0.8);
    loaded.await.expect("load ran");

    // Every response carries the header, shop work included.
    let product = shopper.get("/api/products/1", None).await;
    assert!(product.orca().contains_key("cpu_utilization"));

    // Bounded wait for the average to decay: 300 ms window, so 3 s is ten windows.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = busy["cpu_utilization"];
    while last >= 0.1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = shopper.get("/healthz", None).await.orca()["cpu_utilization"];
    }
    assert!(last < 0.1, "still {last} after idling");

    let metrics = shopper.get("/metrics", None).await.text();
    assert!(metrics.contains("shop_utilization "), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utilization_follows_concurrency() {
    let (addr, _shop) = Shop::bind(config()).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    // One client on four slots keeps at most a quarter of them busy.
    load(&shopper, 1, Duration::from_millis(1000)).await;
    let light = shopper.get("/healthz", None).await.orca()["cpu_utilization"];
    assert!(
        light > 0.05 && light < 0.3,
        "one client on four slots: {light}"
    );
    load(&shopper, 4, Duration::from_millis(1000)).await;
    let heavy = shopper.get("/healthz", None).await.orca()["cpu_utilization"];
    assert!(
        heavy > 0.5 && heavy > 2.0 * light,
        "four clients {heavy} vs one {light}"
    );
}

/// Completed requests from `concurrency` closed-loop clients over `duration`.
async fn completed(shopper: &Shopper, concurrency: usize, duration: Duration) -> usize {
    let until = Instant::now() + duration;
    let counts = join_all((0..concurrency).map(|_| {
        let shopper = shopper.clone();
        async move {
            let mut done = 0;
            while Instant::now() < until {
                assert_eq!(
                    shopper.get("/api/products", None).await.status,
                    StatusCode::OK
                );
                done += 1;
            }
            done
        }
    }))
    .await;
    counts.iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_two_shop_serves_about_twice_a_capacity_one_shop() {
    let (small_addr, _small) = Shop::bind(config()).await.expect("shop starts");
    let large_config = Config {
        capacity: 2.0,
        ..config()
    };
    let (large_addr, _large) = Shop::bind(large_config).await.expect("shop starts");
    // Both saturated (16 clients > 8 slots), measured at the same time so a busy
    // machine slows both alike.
    let (small_shopper, large_shopper) = (Shopper::new(small_addr), Shopper::new(large_addr));
    let (small, large) = tokio::join!(
        completed(&small_shopper, 16, Duration::from_millis(1000)),
        completed(&large_shopper, 16, Duration::from_millis(1000)),
    );
    let ratio = large as f64 / small.max(1) as f64;
    assert!(
        (1.6..=2.4).contains(&ratio),
        "capacity 2 served {large}, capacity 1 served {small}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halving_capacity_mid_run_halves_the_worker_slots() {
    let (addr, shop) = Shop::bind(config()).await.expect("shop starts");
    let shopper = Shopper::new(addr);

    let reply = shopper.get("/admin/capacity", None).await;
    assert_eq!(reply.json()["workers"].as_u64(), Some(4));

    // Change it while requests are in flight.
    let running = tokio::spawn({
        let shopper = shopper.clone();
        async move { load(&shopper, 8, Duration::from_millis(500)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = shopper
        .post("/admin/capacity", None, r#"{"capacity": 0.5}"#)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["workers"].as_u64(), Some(2));
    assert_eq!(reply.json()["capacity"].as_f64(), Some(0.5));
    running.await.expect("load ran");
    assert_eq!(shop.capacity(), 0.5);

    // Two slots: eight requests of 20 ms need at least four rounds.
    let started = Instant::now();
    join_all((0..8).map(|_| shopper.get("/api/products", None))).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= SERVICE_TIME * 4 - Duration::from_millis(5),
        "8 requests on 2 slots took {elapsed:?}"
    );

    // The report follows within a sampling interval or two.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let report = shopper.get("/healthz", None).await.orca();
    assert_eq!(report["named_metrics.workers"], 2.0);
    let metrics = shopper.get("/metrics", None).await.text();
    assert!(metrics.contains("shop_worker_slots 2"), "{metrics}");
    assert!(metrics.contains("shop_capacity 0.5"), "{metrics}");

    // And back up, through the library handle this time.
    let resized = shop.set_capacity(2.0).expect("valid capacity");
    assert_eq!((resized.previous_workers, resized.workers), (2, 8));
    let started = Instant::now();
    join_all((0..8).map(|_| shopper.get("/api/products", None))).await;
    assert!(started.elapsed() >= SERVICE_TIME);
}
