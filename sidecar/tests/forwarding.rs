//! The proxy as an application sees it: forwarding, headers, bad input and broken
//! upstreams.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use http::Request;
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trimtab_api::balancer_policy::Algorithm;

#[tokio::test]
async fn forwards_a_request_with_its_body_and_returns_the_response() {
    let a = backend("a").await;
    let port = free_port();
    let _sidecar = sidecar(vec![route("r", port, Algorithm::RoundRobin, &[&a])]).await;
    let request = Request::post(format!("http://127.0.0.1:{port}/orders"))
        .body(Full::from(vec![7_u8; 100_000]))
        .unwrap();
    let (status, backend, body) = send(&client(), request).await;
    assert_eq!(
        (status, backend.as_str(), body.as_str()),
        (200, "a", "a got 100000 bytes")
    );
}

#[tokio::test]
async fn adds_forwarded_headers_and_strips_hop_by_hop_ones() {
    let a = backend("a").await;
    let port = free_port();
    let _sidecar = sidecar(vec![route("r", port, Algorithm::RoundRobin, &[&a])]).await;
    let request = Request::get(format!("http://127.0.0.1:{port}/headers"))
        .header("connection", "x-hop")
        .header("x-hop", "must not pass")
        .header("x-end-to-end", "passes")
        .body(Full::default())
        .unwrap();
    let (status, _, headers) = send(&client(), request).await;
    assert_eq!(status, 200);
    assert!(headers.contains("x-forwarded-for: 127.0.0.1"), "{headers}");
    assert!(headers.contains("x-forwarded-proto: http"), "{headers}");
    assert!(
        headers.contains(&format!("x-forwarded-host: 127.0.0.1:{port}")),
        "{headers}"
    );
    assert!(
        headers.contains(&format!(
            "forwarded: for=127.0.0.1;host=\"127.0.0.1:{port}\";proto=http"
        )),
        "{headers}"
    );
    assert!(
        headers.contains(&format!("host: {}", a.address())),
        "{headers}"
    );
    assert!(headers.contains("x-end-to-end: passes"), "{headers}");
    assert!(!headers.contains("x-hop"), "{headers}");
}

#[tokio::test]
async fn garbage_request_gets_400() {
    let a = backend("a").await;
    let port = free_port();
    let _sidecar = sidecar(vec![route("r", port, Algorithm::RoundRobin, &[&a])]).await;
    let answer = raw_exchange(port, b"\x16\x03\x01 this is not http\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn oversized_request_head_gets_431() {
    let a = backend("a").await;
    let port = free_port();
    let _sidecar = sidecar(vec![route("r", port, Algorithm::RoundRobin, &[&a])]).await;
    let big = "x".repeat(64 * 1024);
    let raw = format!("GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: {big}\r\n\r\n");
    let answer = raw_exchange(port, raw.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{:?}",
        &answer[..answer.len().min(100)]
    );
}

#[tokio::test]
async fn oversized_request_body_gets_413_naming_the_limit() {
    let a = backend("a").await;
    let port = free_port();
    let _sidecar = sidecar(vec![route("r", port, Algorithm::RoundRobin, &[&a])]).await;
    let request = Request::post(format!("http://127.0.0.1:{port}/"))
        .body(Full::from(vec![0_u8; 2 * 1024 * 1024]))
        .unwrap();
    let (status, _, body) = send(&client(), request).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("exceeds the limit of 1048576 bytes"),
        "{body}"
    );
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn broken_upstream_gets_502_naming_the_endpoint() {
    let broken = broken_backend().await;
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[]);
    r.endpoints = vec![trimtab_api::sidecar_config::Endpoint::new(
        broken.to_string(),
    )];
    let _sidecar = sidecar(vec![r]).await;
    let (status, _, body) = get(&client(), port, "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains(&format!("endpoint {broken} of route test/r failed")),
        "{body}"
    );
}

#[tokio::test]
async fn refused_connection_gets_502_naming_the_endpoint_and_the_failure() {
    let nobody = format!("127.0.0.1:{}", free_port());
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[]);
    r.endpoints = vec![trimtab_api::sidecar_config::Endpoint::new(nobody.clone())];
    let _sidecar = sidecar(vec![r]).await;
    let (status, _, body) = get(&client(), port, "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains(&nobody) && body.contains("connect-failure"),
        "{body}"
    );
}

#[tokio::test]
async fn saturated_endpoint_gets_503_naming_the_limit() {
    let a = backend("a").await;
    a.delay_ms.store(1500, std::sync::atomic::Ordering::SeqCst);
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[&a]);
    r.limits.max_concurrent_requests = 1;
    let _sidecar = sidecar(vec![r]).await;
    let c = client();
    let slow = tokio::spawn({
        let c = c.clone();
        async move { get(&c, port, "/").await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, _, body) = get(&c, port, "/").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("limits.maxConcurrentRequests (1"), "{body}");
    assert_eq!(slow.await.unwrap().0, 200);
}

#[tokio::test]
async fn upgrade_requests_become_a_two_way_tunnel() {
    let a = backend("a").await;
    let port = free_port();
    let _sidecar = sidecar(vec![route("r", port, Algorithm::RoundRobin, &[&a])]).await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    stream.write_all(b"ping over the tunnel").await.unwrap();
    let mut echoed = [0_u8; 20];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping over the tunnel");
}

#[tokio::test]
async fn h2c_requests_are_forwarded_too() {
    let a = backend("a").await;
    let port = free_port();
    let _sidecar = sidecar(vec![route("r", port, Algorithm::RoundRobin, &[&a])]).await;
    let h2: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let (status, backend, _) = get(&h2, port, "/").await;
    assert_eq!((status, backend.as_str()), (200, "a"));
}

/// The listener tells HTTP/1.1 from h2c by the connection's first bytes; a client
/// whose first segment is a lone `P` (POST, PUT or the h2c preface?) is still served,
/// and so are an upgrade and an h2c client after it on the same listener.
#[tokio::test]
async fn a_request_that_arrives_a_byte_at_first_is_still_served() {
    let a = backend("a").await;
    let port = free_port();
    let _sidecar = sidecar(vec![route("r", port, Algorithm::RoundRobin, &[&a])]).await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream
        .write_all(b"OST /orders HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("a got 3 bytes"), "{response}");
}

#[tokio::test]
async fn a_port_without_route_is_not_listened_on() {
    let a = backend("a").await;
    let port = free_port();
    let _sidecar = sidecar(vec![route("r", port, Algorithm::RoundRobin, &[&a])]).await;
    let other = free_port();
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", other))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_slow_endpoint_gets_504_after_the_request_timeout() {
    let a = backend("a").await;
    a.delay_ms.store(2_000, std::sync::atomic::Ordering::SeqCst);
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[&a]);
    r.timeouts.request = trimtab_api::Duration::from_millis(200);
    let _sidecar = sidecar(vec![r]).await;
    let started = std::time::Instant::now();
    let (status, _, body) = get(&client(), port, "/").await;
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert!(
        body.contains("timeouts.request (200ms)") && body.contains(&a.address()),
        "{body}"
    );
}

#[tokio::test]
async fn the_request_timeout_holds_for_each_request_of_a_connection() {
    let a = backend("a").await;
    let port = free_port();
    let mut r = route("r", port, Algorithm::RoundRobin, &[&a]);
    r.timeouts.request = trimtab_api::Duration::from_millis(300);
    let _sidecar = sidecar(vec![r]).await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let set_delay = |ms| a.delay_ms.store(ms, std::sync::atomic::Ordering::SeqCst);

    assert_eq!(exchange_on(&mut stream, "/").await.0, 200);
    // The first request's deadline passes while this one runs: this one has its own.
    tokio::time::sleep(Duration::from_millis(200)).await;
    set_delay(200);
    assert_eq!(exchange_on(&mut stream, "/").await.0, 200);
    // Right after, a request slower than the limit is cut at the limit.
    set_delay(2_000);
    let started = std::time::Instant::now();
    let (status, body) = exchange_on(&mut stream, "/").await;
    assert_eq!(status, 504, "{body}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(290) && waited < Duration::from_millis(1_500),
        "cut after {waited:?}"
    );
    // After an idle spell longer than the limit, the next request is not cut at once.
    tokio::time::sleep(Duration::from_millis(400)).await;
    set_delay(100);
    assert_eq!(exchange_on(&mut stream, "/").await.0, 200);
}
