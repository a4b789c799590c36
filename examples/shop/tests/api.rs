//! The shop's HTTP API as the bot scenario (examples/shop-loadtest.yaml) uses it, and
//! its answers to bad input.

mod common;

use std::time::Duration;

use common::Shopper;
use http::{Method, StatusCode};
use shop::{Config, Shop};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn fast() -> Config {
    Config {
        service_time: Duration::from_millis(1),
        ..Config::ephemeral()
    }
}

#[tokio::test]
async fn scenario_logs_in_browses_adds_to_cart_checks_out_and_stock_decreases() {
    let (addr, shop) = Shop::bind(fast()).await.expect("shop starts");
    let shopper = Shopper::new(addr);

    // login: POST /api/login {"user": "bot-{{ user.id }}"}, extract $.token
    let token = shopper.login("bot-7").await;

    // browse: GET /api/products?page={{ user.id % 5 + 1 }}, every page the scenario
    // can ask for has items; extract $.items[0].id
    let mut first_ids = Vec::new();
    for page in 1..=5 {
        let reply = shopper
            .get(&format!("/api/products?page={page}"), Some(&token))
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        let body = reply.json();
        let items = body["items"].as_array().expect("items array");
        assert!(!items.is_empty(), "page {page} is empty");
        for field in ["id", "name", "price", "stock"] {
            assert!(
                items[0].get(field).is_some(),
                "item lacks {field}: {}",
                items[0]
            );
        }
        first_ids.push(items[0]["id"].as_u64().expect("numeric id"));
    }
    let product = first_ids[2];
    let before = shopper.stock_of(product).await;

    // addToCart: the template renders the id into a string: "{{ vars.product }}"
    let reply = shopper
        .post(
            "/api/cart",
            Some(&token),
            &format!(r#"{{"product": "{product}", "quantity": 1}}"#),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["items"][0]["product"].as_u64(), Some(product));

    let cart = shopper.get("/api/cart", Some(&token)).await;
    assert_eq!(cart.json()["items"][0]["quantity"].as_u64(), Some(1));

    // checkout: POST /api/checkout with no body
    let reply = shopper
        .send(Method::POST, "/api/checkout", Some(&token), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let order = reply.json();
    assert!(order["order"].as_u64().is_some(), "order number in {order}");
    assert_eq!(order["items"][0]["product"].as_u64(), Some(product));

    // The invariant's view: stock went down by one and is not negative.
    assert_eq!(shopper.stock_of(product).await, before - 1);
    assert_eq!(
        shop.stock(u32::try_from(product).expect("small id")),
        Some(before - 1)
    );
    let stock = shopper.get("/api/admin/stock", None).await.json();
    assert!(
        stock["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|i| i["stock"].as_i64() >= Some(0))
    );

    // Checkout emptied the cart; a second checkout has nothing to order.
    let cart = shopper.get("/api/cart", Some(&token)).await;
    assert_eq!(cart.json()["items"].as_array().map(Vec::len), Some(0));
    let reply = shopper
        .send(Method::POST, "/api/checkout", Some(&token), None)
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert!(reply.error().contains("cart is empty"), "{}", reply.error());
    shop.shutdown().await;
}

#[tokio::test]
async fn product_by_id_and_numeric_product_ids_work_too() {
    let (addr, _shop) = Shop::bind(fast()).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    let reply = shopper.get("/api/products/3", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["id"].as_u64(), Some(3));
    let reply = shopper.get("/api/products/999999", None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.error().contains("999999"), "{}", reply.error());

    let token = shopper.login("alice").await;
    let reply = shopper
        .post("/api/cart", Some(&token), r#"{"product": 3}"#)
        .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "quantity defaults to 1: {}",
        reply.text()
    );
    assert_eq!(reply.json()["items"][0]["quantity"].as_u64(), Some(1));
}

#[tokio::test]
async fn checkout_beyond_the_stock_is_409_naming_the_product_and_keeps_the_cart() {
    let config = Config {
        initial_stock: 2,
        ..fast()
    };
    let (addr, shop) = Shop::bind(config).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    let alice = shopper.login("alice").await;
    let bob = shopper.login("bob").await;
    for token in [&alice, &bob] {
        let reply = shopper
            .post("/api/cart", Some(token), r#"{"product": 5, "quantity": 2}"#)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let reply = shopper
        .send(Method::POST, "/api/checkout", Some(&alice), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = shopper
        .send(Method::POST, "/api/checkout", Some(&bob), None)
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    let body = reply.json();
    assert_eq!(body["product"].as_u64(), Some(5));
    assert_eq!(body["requested"].as_u64(), Some(2));
    assert_eq!(body["available"].as_i64(), Some(0));
    assert!(reply.error().contains("product 5"), "{}", reply.error());
    assert_eq!(shop.stock(5), Some(0));
    // Bob's cart is still there for him to change.
    let cart = shopper.get("/api/cart", Some(&bob)).await;
    assert_eq!(cart.json()["items"][0]["quantity"].as_u64(), Some(2));
    let cleared = shopper
        .send(Method::DELETE, "/api/cart", Some(&bob), None)
        .await;
    assert_eq!(cleared.json()["items"].as_array().map(Vec::len), Some(0));
}

#[tokio::test]
async fn adding_an_out_of_stock_product_to_the_cart_is_409() {
    let config = Config {
        initial_stock: 0,
        ..fast()
    };
    let (addr, _shop) = Shop::bind(config).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    let token = shopper.login("carol").await;
    let reply = shopper
        .post(
            "/api/cart",
            Some(&token),
            r#"{"product": 1, "quantity": 1}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert!(reply.error().contains("out of stock"), "{}", reply.error());
    assert_eq!(reply.json()["product"].as_u64(), Some(1));
}

#[tokio::test]
async fn malformed_json_is_400_naming_the_problem() {
    let (addr, _shop) = Shop::bind(fast()).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    let token = shopper.login("dave").await;
    let cases: [(&str, Option<&str>, &str, &str); 8] = [
        ("/api/login", None, r#"{"user": "#, "not valid JSON"),
        ("/api/login", None, "", "body is empty"),
        ("/api/login", None, r#"["alice"]"#, "must be a JSON object"),
        (
            "/api/login",
            None,
            r#"{"name": "alice"}"#,
            "field `user` is missing",
        ),
        ("/api/login", None, r#"{"user": 42}"#, "field `user`"),
        (
            "/api/cart",
            Some(&token),
            r#"{"product": "three"}"#,
            "field `product`",
        ),
        (
            "/api/cart",
            Some(&token),
            r#"{"product": 1, "quantity": -1}"#,
            "field `quantity`",
        ),
        (
            "/admin/capacity",
            None,
            r#"{"capacity": "lots"}"#,
            "field `capacity`",
        ),
    ];
    for (path, token, body, expected) in cases {
        let reply = shopper.post(path, token, body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{path} {body}: {}",
            reply.text()
        );
        assert!(
            reply.error().contains(expected),
            "{path} {body}: {:?} lacks {expected:?}",
            reply.error()
        );
    }
    let reply = shopper.get("/api/products?page=zero", None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.error().contains("`page`"), "{}", reply.error());
    let reply = shopper
        .post("/admin/capacity", None, r#"{"capacity": 0}"#)
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.error().contains("capacity"), "{}", reply.error());
}

#[tokio::test]
async fn oversized_body_is_413() {
    let (addr, _shop) = Shop::bind(fast()).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    let body = format!(r#"{{"user": "{}"}}"#, "x".repeat(100_000));
    let reply = shopper.post("/api/login", None, &body).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn cart_and_checkout_without_a_valid_token_are_401() {
    let (addr, _shop) = Shop::bind(fast()).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    let cart = r#"{"product": 1, "quantity": 1}"#;
    let no_token = shopper.post("/api/cart", None, cart).await;
    assert_eq!(no_token.status, StatusCode::UNAUTHORIZED);
    assert!(
        no_token.error().contains("authorization"),
        "{}",
        no_token.error()
    );
    assert_eq!(
        no_token
            .headers
            .get("www-authenticate")
            .map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    let unknown = shopper
        .post("/api/cart", Some("not-a-real-token"), cart)
        .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert!(
        unknown.error().contains("unknown token"),
        "{}",
        unknown.error()
    );
    let checkout = shopper
        .send(Method::POST, "/api/checkout", None, None)
        .await;
    assert_eq!(checkout.status, StatusCode::UNAUTHORIZED);
    let cart = shopper.get("/api/cart", Some("")).await;
    assert_eq!(cart.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let (addr, _shop) = Shop::bind(fast()).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    let reply = shopper.get("/api/nope", None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.error().contains("/api/nope"), "{}", reply.error());
    let reply = shopper.get("/api/checkout", None).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        reply.headers.get("allow").map(|v| v.as_bytes()),
        Some(&b"POST"[..])
    );
}

#[tokio::test]
async fn health_and_metrics_answer() {
    let (addr, _shop) = Shop::bind(fast()).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    assert_eq!(shopper.get("/healthz", None).await.status, StatusCode::OK);
    let token = shopper.login("erin").await;
    shopper
        .post("/api/cart", Some(&token), r#"{"product": 1}"#)
        .await;
    shopper
        .send(Method::POST, "/api/checkout", Some(&token), None)
        .await;
    let metrics = shopper.get("/metrics", None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.text();
    for expected in [
        r#"shop_requests_total{route="login",status="200"} 1"#,
        r#"shop_orders_total{result="placed"} 1"#,
        "shop_request_duration_seconds_bucket",
        "shop_requests_in_flight",
        "shop_utilization",
        "shop_stock_negative_products 0",
        "shop_worker_slots 4",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
}

#[tokio::test]
async fn one_keep_alive_connection_serves_request_after_request() {
    let (addr, _shop) = Shop::bind(fast()).await.expect("shop starts");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    for _ in 0..3 {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: shop\r\n\r\n")
            .await
            .expect("writes");
        let mut seen = Vec::new();
        let mut buffer = [0u8; 1024];
        // Bounded: one small response, read until its body arrives or 10 s pass.
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while !seen.ends_with(b"ok\n") {
                let n = stream.read(&mut buffer).await.expect("reads");
                assert!(
                    n > 0,
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&seen)
                );
                seen.extend_from_slice(&buffer[..n]);
            }
        })
        .await;
        assert!(read.is_ok(), "no response in time");
        let text = String::from_utf8_lossy(&seen).to_lowercase();
        assert!(text.starts_with("http/1.1 200"), "{text}");
        assert!(text.contains("endpoint-load-metrics: text "), "{text}");
    }
}

#[tokio::test]
async fn garbage_on_the_wire_does_not_hurt_the_shop() {
    let (addr, _shop) = Shop::bind(fast()).await.expect("shop starts");
    for garbage in [
        &b"\x00\xff\xfe garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /api/login HTTP/1.1\r\ncontent-length: nope\r\n\r\n",
    ] {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        stream.write_all(garbage).await.expect("writes");
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;
    }
    let shopper = Shopper::new(addr);
    assert_eq!(shopper.get("/healthz", None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_taken_port_is_reported_with_the_address() {
    let (addr, _shop) = Shop::bind(fast()).await.expect("shop starts");
    let config = Config {
        listen: addr,
        ..fast()
    };
    let error = Shop::bind(config)
        .await
        .map(|_| ())
        .expect_err("port is taken");
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
    assert!(
        std::error::Error::source(&error).is_some(),
        "the OS error is the source"
    );
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_stops_listening() {
    let config = Config {
        service_time: Duration::from_millis(300),
        ..Config::ephemeral()
    };
    let (addr, shop) = Shop::bind(config).await.expect("shop starts");
    let shopper = Shopper::new(addr);
    // A keep-alive connection left idle in the client's pool must not hold shutdown up.
    assert_eq!(shopper.get("/healthz", None).await.status, StatusCode::OK);
    let in_flight = tokio::spawn({
        let shopper = shopper.clone();
        async move { shopper.get("/api/products", None).await.status }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(4), shop.shutdown())
        .await
        .expect("shutdown completes within the grace period");
    assert_eq!(in_flight.await.expect("request task"), StatusCode::OK);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );
}

#[tokio::test]
async fn replicas_sharing_a_store_share_sessions_carts_and_stock() {
    let store = shop::Store::new(&fast()).expect("store");
    let (a, shop_a) = Shop::bind_replica(fast(), store.clone())
        .await
        .expect("replica a");
    let (b, shop_b) = Shop::bind_replica(
        Config {
            capacity: 2.0,
            ..fast()
        },
        store,
    )
    .await
    .expect("replica b");
    let (on_a, on_b) = (Shopper::new(a), Shopper::new(b));

    // Logged in on one replica, shopping on the other.
    let token = on_a.login("bot-1").await;
    let before = on_b.stock_of(1).await;
    let reply = on_b
        .post(
            "/api/cart",
            Some(&token),
            r#"{"product": 1, "quantity": 2}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = on_a
        .send(Method::POST, "/api/checkout", Some(&token), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(on_b.stock_of(1).await, before - 2);
    assert_eq!(shop_a.stock(1), shop_b.stock(1));
    shop_a.shutdown().await;
    shop_b.shutdown().await;
}
