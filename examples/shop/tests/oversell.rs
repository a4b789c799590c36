//! `--bug oversell`: concurrent checkouts of the last items drive stock negative with
//! the bug, and never without it.

mod common;

use common::Shopper;
use futures_util::future::join_all;
use http::{Method, StatusCode};
use shop::{Bug, Config, Shop, ShopHandle};

const SHOPPERS: usize = 50;
const LAST_ITEMS: i64 = 3;
const PRODUCT: u32 = 1;

/// Fifty sessions each with the product in the cart, then fifty checkouts at once.
/// Returns how many orders were placed.
async fn rush_for_the_last_items(shop: &ShopHandle, shopper: &Shopper) -> usize {
    assert!(shop.set_stock(PRODUCT, LAST_ITEMS));
    let tokens = join_all((0..SHOPPERS).map(|i| {
        let shopper = shopper.clone();
        async move {
            let token = shopper.login(&format!("rusher-{i}")).await;
            let reply = shopper
                .post(
                    "/api/cart",
                    Some(&token),
                    r#"{"product": 1, "quantity": 1}"#,
                )
                .await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            token
        }
    }))
    .await;
    let replies = join_all(tokens.iter().map(|token| {
        let shopper = shopper.clone();
        async move {
            shopper
                .send(Method::POST, "/api/checkout", Some(token), None)
                .await
        }
    }))
    .await;
    for reply in &replies {
        assert!(
            reply.status == StatusCode::OK || reply.status == StatusCode::CONFLICT,
            "the scenario's check allows 200 or 409, got {}: {}",
            reply.status,
            reply.text()
        );
    }
    replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_oversell_bug_concurrent_checkouts_drive_stock_negative() {
    let config = Config {
        initial_stock: LAST_ITEMS,
        bugs: vec![Bug::Oversell],
        ..Config::ephemeral()
    };
    let (addr, shop) = Shop::bind(config).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    // A race, so a bounded number of attempts; with the default pool of four slots it
    // shows on the first in practice.
    let mut attempts = 0;
    let oversold = loop {
        attempts += 1;
        let placed = rush_for_the_last_items(&shop, &shopper).await;
        let stock = shopper.stock_of(u64::from(PRODUCT)).await;
        if stock < 0 {
            assert!(
                placed > LAST_ITEMS as usize,
                "{placed} orders for {LAST_ITEMS} items"
            );
            assert_eq!(stock, LAST_ITEMS - placed as i64);
            break true;
        }
        if attempts == 10 {
            break false;
        }
    };
    assert!(oversold, "stock never went negative in {attempts} attempts");
    let metrics = shopper.get("/metrics", None).await.text();
    assert!(
        metrics.contains("shop_stock_negative_products 1"),
        "{metrics}"
    );
    assert!(shop.oversold().units > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_bug_concurrent_checkouts_never_oversell() {
    let config = Config {
        initial_stock: LAST_ITEMS,
        // As many slots as shoppers, so every checkout really runs at once.
        base_workers: SHOPPERS as u32,
        ..Config::ephemeral()
    };
    let (addr, shop) = Shop::bind(config).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    for _ in 0..3 {
        let placed = rush_for_the_last_items(&shop, &shopper).await;
        assert_eq!(placed, LAST_ITEMS as usize);
        assert_eq!(shopper.stock_of(u64::from(PRODUCT)).await, 0);
    }
    assert_eq!(shop.oversold().products, 0);
}
