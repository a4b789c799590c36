//! The pool against a backend that writes bytes by hand: framing, reuse and failure
//! cases a well-behaved server (hyper, nginx) never produces.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::{ClientError, ConnectionPool, ExchangeError, PooledBody};

const CONNECT: Duration = Duration::from_secs(2);

/// A backend on 127.0.0.1 that runs `script` on every accepted connection (with the
/// connection's index) and counts connections.
async fn scripted<F, Fut>(script: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let address = listener.local_addr().expect("local address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let index = counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(script(index, stream));
        }
    });
    (address, accepted)
}

/// Reads one request head (through the blank line) and returns it.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path).body(Empty::new()).expect("a request")
}

async fn collect(
    response: http::Response<PooledBody>,
) -> Result<(Bytes, Option<http::HeaderMap>), super::BodyError> {
    let collected = response.into_body().collect().await?;
    let trailers = collected.trailers().cloned();
    Ok((collected.to_bytes(), trailers))
}

#[tokio::test]
async fn a_chunked_response_with_trailers_arrives_whole_and_the_connection_is_reused() {
    let (address, accepted) = scripted(|_, mut stream| async move {
        while read_head(&mut stream).await.is_some() {
            let reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                5\r\nhello\r\n7;ext=x\r\n, world\r\n0\r\nGrpc-Status: 0\r\n\r\n";
            // In small pieces, so that every state of the decoder waits for bytes.
            for piece in reply.chunks(3) {
                if stream.write_all(piece).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    for _ in 0..3 {
        let response = pool.send(get("/"), CONNECT).await.expect("a response");
        let (body, trailers) = collect(response).await.expect("a whole body");
        assert_eq!(body, "hello, world");
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_response_body_streams_before_the_endpoint_has_sent_all_of_it() {
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let wait = Arc::new(tokio::sync::Mutex::new(Some(wait)));
    let (address, _) = scripted(move |_, mut stream| {
        let wait = Arc::clone(&wait);
        async move {
            read_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
                .await;
            if let Some(wait) = wait.lock().await.take() {
                let _ = wait.await;
            }
            let _ = stream.write_all(b"-last").await;
        }
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    let response = pool.send(get("/"), CONNECT).await.expect("a response");
    let mut body = response.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert_eq!(first.into_data().expect("data"), "first");
    go.send(()).expect("the backend waits");
    let rest = body.collect().await.expect("the rest").to_bytes();
    assert_eq!(rest, "-last");
}

#[tokio::test]
async fn a_body_of_unknown_length_is_sent_chunked_and_a_known_one_with_its_length() {
    let (heads, mut received) = mpsc::unbounded_channel::<String>();
    let (address, _) = scripted(move |_, mut stream| {
        let heads = heads.clone();
        async move {
            // Reads everything up to the end of the body each framing implies.
            let mut seen = Vec::new();
            let mut buffer = [0_u8; 1024];
            loop {
                let text = String::from_utf8_lossy(&seen).into_owned();
                let complete = text.ends_with("0\r\n\r\n")
                    || (text.contains("content-length: 11") && text.ends_with("hello world"));
                if complete {
                    let _ = heads.send(text);
                    seen.clear();
                    let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                    continue;
                }
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buffer[..n]),
                }
            }
        }
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    let frames = futures_util::stream::iter(
        ["hello", " ", "world"]
            .map(|s| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(s)))),
    );
    let streamed = Request::post("/up")
        .body(StreamBody::new(frames))
        .expect("a request");
    let response = pool.send(streamed, CONNECT).await.expect("a response");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let wire = received.recv().await.expect("the request");
    assert!(wire.starts_with("POST /up HTTP/1.1\r\n"), "{wire}");
    assert!(wire.contains("transfer-encoding: chunked\r\n"), "{wire}");
    assert!(
        wire.ends_with("\r\n\r\n5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"),
        "{wire:?}"
    );

    let known = Request::put("/up")
        .body(Full::new(Bytes::from("hello world")))
        .expect("a request");
    let response = pool.send(known, CONNECT).await.expect("a response");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let wire = received.recv().await.expect("the request");
    assert!(wire.starts_with("PUT /up HTTP/1.1\r\n"), "{wire}");
    assert!(
        wire.ends_with("content-length: 11\r\n\r\nhello world"),
        "{wire:?}"
    );
    assert!(!wire.contains("transfer-encoding"), "{wire}");
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let (address, _) = scripted(|_, mut stream| async move {
        read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    let response = pool.send(get("/"), CONNECT).await.expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!response.headers().contains_key("link"));
    assert_eq!(collect(response).await.expect("a body").0, "ok");
}

#[tokio::test]
async fn an_answer_before_the_request_body_is_over_is_returned_and_the_connection_closed() {
    let (address, accepted) = scripted(|_, mut stream| async move {
        read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 3\r\n\r\nno\n")
            .await;
        // Keeps the connection open without reading the body.
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    // A body that never ends: only the early answer can finish this exchange.
    let (_sender, frames) = mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    let endless = StreamBody::new(tokio_stream_from(frames));
    let request = Request::post("/").body(endless).expect("a request");
    let response = tokio::time::timeout(Duration::from_secs(3), pool.send(request, CONNECT))
        .await
        .expect("no wait for the body")
        .expect("a response");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(collect(response).await.expect("a body").0, "no\n");
    assert_eq!(
        pool.idle(),
        0,
        "the unsent rest makes the connection unusable"
    );
    let _ = accepted;
}

/// An mpsc receiver as a stream.
fn tokio_stream_from<T>(mut receiver: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

#[tokio::test]
async fn connection_close_and_http_1_0_responses_are_not_reused() {
    let replies: [&'static [u8]; 3] = [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na",
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb",
        b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    ];
    let (address, accepted) = scripted(move |index, mut stream| async move {
        read_head(&mut stream).await;
        let _ = stream.write_all(replies[index % 3]).await;
        let _ = stream.shutdown().await;
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let response = pool.send(get("/"), CONNECT).await.expect("a response");
        bodies.push(collect(response).await.expect("a body").0);
        assert_eq!(pool.idle(), 0);
    }
    assert_eq!(bodies, ["a", "b", "until close"]);
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_saying_how_much_is_missing() {
    let (address, _) = scripted(|index, mut stream| async move {
        read_head(&mut stream).await;
        let reply: &[u8] = if index == 0 {
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
        } else {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        };
        let _ = stream.write_all(reply).await;
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    let response = pool.send(get("/"), CONNECT).await.expect("a response");
    let error = collect(response).await.expect_err("cut short");
    assert_eq!(
        error.to_string(),
        "connection closed by the endpoint with 7 bytes of the body unread"
    );
    let response = pool.send(get("/"), CONNECT).await.expect("a response");
    let error = collect(response).await.expect_err("cut short");
    assert_eq!(
        error.to_string(),
        "connection closed by the endpoint before the chunked body's last chunk"
    );
    assert_eq!(pool.idle(), 0);
}

#[tokio::test]
async fn malformed_responses_are_errors_naming_what_is_wrong() {
    let (address, _) = scripted(|index, mut stream| async move {
        read_head(&mut stream).await;
        let reply: &[u8] = match index {
            0 => b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabcd",
            1 => b"220 smtp.example ESMTP\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\nContent-Le",
        };
        let _ = stream.write_all(reply).await;
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    let mut messages = Vec::new();
    for _ in 0..3 {
        let error = pool.send(get("/"), CONNECT).await.expect_err("malformed");
        messages.push(error.to_string());
    }
    assert!(
        messages[0].contains("content-length \"3, 4\""),
        "{}",
        messages[0]
    );
    assert!(
        messages[1].contains("malformed response head"),
        "{}",
        messages[1]
    );
    assert_eq!(
        messages[2],
        "connection closed by the endpoint after 27 bytes of the response head"
    );
}

#[tokio::test]
async fn an_endpoint_that_sends_more_than_its_response_is_not_reused() {
    let (address, accepted) = scripted(|_, mut stream| async move {
        while read_head(&mut stream).await.is_some() {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
                .await;
        }
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    for _ in 0..2 {
        let response = pool.send(get("/"), CONNECT).await.expect("a response");
        assert_eq!(collect(response).await.expect("a body").0, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_close_that_crosses_a_request_resends_a_get_but_not_a_post() {
    // Each connection answers one request, then drops the next one unanswered: the
    // close races the request, as an endpoint's idle timeout does.
    let (address, accepted) = scripted(|_, mut stream| async move {
        read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
        read_head(&mut stream).await;
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    let response = pool.send(get("/"), CONNECT).await.expect("a response");
    collect(response).await.expect("a body");
    let response = pool
        .send(get("/"), CONNECT)
        .await
        .expect("resent on a new connection");
    collect(response).await.expect("a body");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let post = Request::post("/")
        .body(Empty::<Bytes>::new())
        .expect("a request");
    let error = pool.send(post, CONNECT).await.expect_err("not resent");
    assert!(
        matches!(
            &error,
            ClientError::Exchange(ExchangeError::Closed { received: 0 })
        ),
        "{error:?}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_megabyte_goes_up_and_another_comes_back_on_one_connection() {
    const SIZE: usize = 1024 * 1024;
    let (address, accepted) = scripted(|_, mut stream| async move {
        while let Some(head) = read_head(&mut stream).await {
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            let mut body = vec![0_u8; length];
            if stream.read_exact(&mut body).await.is_err() {
                return;
            }
            let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
            let reply =
                format!("HTTP/1.1 200 OK\r\nX-Sum: {sum}\r\nContent-Length: {SIZE}\r\n\r\n");
            let payload: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
            if stream.write_all(reply.as_bytes()).await.is_err()
                || stream.write_all(&payload).await.is_err()
            {
                return;
            }
        }
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    for _ in 0..2 {
        // 128 frames of 8 KiB with the length known: sent as they come, not gathered.
        let frames = futures_util::stream::iter((0..128).map(|i| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![(i % 7) as u8; 8192])))
        }));
        let body = BodyExt::boxed(StreamBody::new(frames));
        let request = Request::post("/echo")
            .header("content-length", SIZE.to_string())
            .body(body)
            .expect("a request");
        let response = pool.send(request, CONNECT).await.expect("a response");
        let expected: u64 = (0..128_u64).map(|i| (i % 7) * 8192).sum();
        assert_eq!(response.headers()["x-sum"], expected.to_string().as_str());
        let (body, _) = collect(response).await.expect("the whole body");
        assert_eq!(body.len(), SIZE);
        assert!(body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_streamed_body_shorter_than_its_declared_length_is_an_error_saying_so() {
    let (address, _) = scripted(|_, mut stream| async move {
        read_head(&mut stream).await;
        // Waits for the ten bytes announced, which never come.
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let pool = ConnectionPool::new(&address.to_string(), 8);
    let frames = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(
        Bytes::from_static(b"abc"),
    ))]);
    let request = Request::post("/")
        .header("content-length", "10")
        .body(StreamBody::new(frames))
        .expect("a request");
    let error = tokio::time::timeout(Duration::from_secs(3), pool.send(request, CONNECT))
        .await
        .expect("no wait for an answer")
        .expect_err("short body");
    assert_eq!(
        error.to_string(),
        "request body had 3 bytes where 10 were announced"
    );
}
