//! The operator's admin server: `/metrics` for Prometheus, `/live` and `/ready` for the
//! kubelet's probes.

use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

/// A running admin server.
#[derive(Debug)]
pub struct AdminServer {
    /// Where it listens.
    pub local_addr: SocketAddr,
}

/// Binds `addr` and serves in the background.
pub async fn serve(addr: SocketAddr, registry: Registry) -> std::io::Result<AdminServer> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| respond(req, registry.clone()));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(AdminServer { local_addr })
}

async fn respond(
    req: Request<Incoming>,
    registry: Registry,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match req.uri().path() {
        "/live" | "/ready" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/metrics" => {
            let mut buffer = Vec::new();
            match TextEncoder::new().encode(&registry.gather(), &mut buffer) {
                Ok(()) => (
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    Bytes::from(buffer),
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    Bytes::from(format!("encoding metrics: {e}\n")),
                ),
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found: try /metrics, /live or /ready\n"),
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    Ok(response)
}
