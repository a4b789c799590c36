//! The admin port: `/metrics` (Prometheus), `/live`, `/ready` (ready once a config is
//! loaded), and `/config` (the active config as JSON; a resolved config holds
//! addresses and settings, never secrets).

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;
use trimtab_api::{balancer_policy::EndpointState, sidecar_config::SidecarConfig};

use crate::{balancer::weights::balance_score, route::now_ms, sidecar::Shared};

/// Serves the admin endpoints on `listener` until the process ends.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    serve_fn(listener, move |req| handle(&shared, req)).await;
}

/// Serves small in-memory answers (metrics, probes) from `handle`, HTTP/1.1 or h2c,
/// until the process ends; only GET and HEAD reach `handle`.
pub async fn serve_fn<F>(listener: TcpListener, handle: F)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let http = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let handle = Arc::new(handle);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let handle = Arc::clone(&handle);
        let http = Arc::clone(&http);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = if req.method() == Method::GET || req.method() == Method::HEAD {
                    handle(&req)
                } else {
                    text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into())
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn handle(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" if shared.is_ready() => text(StatusCode::OK, "ready\n".into()),
        "/ready" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no config loaded yet\n".into(),
        ),
        "/config" => {
            let snapshot = shared.snapshot();
            // Keys the operator read from Secrets are blanked: `/config` shows sources only.
            let shown = snapshot.config.as_ref().map(SidecarConfig::redacted);
            match serde_json::to_vec_pretty(&shown) {
                Ok(json) => with_type(
                    Response::new(Full::new(Bytes::from(json))),
                    "application/json",
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("config does not serialize: {e}\n"),
                ),
            }
        }
        "/metrics" => {
            refresh_gauges(shared);
            match shared.metrics.encode() {
                Ok(body) => with_type(
                    Response::new(Full::new(Bytes::from(body))),
                    "text/plain; version=0.0.4",
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /live, /ready or /config\n".into(),
        ),
    }
}

/// Sets the gauges that describe state rather than count events, at scrape time.
fn refresh_gauges(shared: &Shared) {
    let metrics = &shared.metrics;
    let now = now_ms();
    for route in shared.snapshot().routes.values() {
        let mut traffic = Vec::with_capacity(route.endpoints.len());
        let mut load = Vec::with_capacity(route.endpoints.len());
        let any_report = route.endpoints.iter().any(|e| e.latest_load_report().3 > 0);
        for endpoint in &route.endpoints {
            let labels = [route.id.as_str(), endpoint.address.as_str()];
            let weight = endpoint.load.weight();
            metrics
                .weight
                .with_label_values(&labels)
                .set(f64::from(weight));
            let state = endpoint.effective_state(now);
            for candidate in [
                EndpointState::Active,
                EndpointState::Throttled,
                EndpointState::Ejected,
                EndpointState::Unhealthy,
            ] {
                let name = format!("{candidate:?}");
                metrics
                    .state
                    .with_label_values(&[labels[0], labels[1], name.as_str()])
                    .set(i64::from(candidate == state));
            }
            let (utilization, _, _, at) = endpoint.latest_load_report();
            if at > 0 {
                metrics
                    .utilization
                    .with_label_values(&labels)
                    .set(utilization);
            }
            let responses = endpoint
                .responses
                .load(std::sync::atomic::Ordering::Relaxed) as f64;
            traffic.push(responses);
            // Load share: reported utilization, or else traffic per unit of weight.
            load.push(if any_report {
                utilization
            } else {
                responses / f64::from(weight.max(1))
            });
        }
        if let Some(score) = balance_score(&traffic, &load) {
            metrics
                .balance_score
                .with_label_values(&[route.id.as_str()])
                .set(score);
        }
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = with_type(
        Response::new(Full::new(Bytes::from(body))),
        "text/plain; charset=utf-8",
    );
    *response.status_mut() = status;
    response
}

/// `response` with its content type set.
pub fn with_type(
    mut response: Response<Full<Bytes>>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    response
        .headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}
