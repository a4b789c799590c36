//! The operator's admin server: `/metrics` for Prometheus, `/live` and `/ready` for the
//! kubelet's probes. Ready means the config server can answer: policies and pods are
//! listed, so a sidecar sent to this replica gets its whole config.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

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

/// Whether this replica is ready to serve.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Binds `addr` and serves in the background.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: Readiness,
) -> std::io::Result<AdminServer> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (registry, ready) = (registry.clone(), Arc::clone(&ready));
            tokio::spawn(async move {
                let service =
                    service_fn(move |req| respond(req, registry.clone(), Arc::clone(&ready)));
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
    ready: Readiness,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match req.uri().path() {
        "/live" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/ready" if ready() => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            Bytes::from_static(b"not ready: policies and pods are not listed yet\n"),
        ),
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
