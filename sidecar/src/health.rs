//! Active HTTP health checks: every `interval`, GET `path` on each endpoint with a
//! `timeout`; `unhealthyThreshold` failures in a row take it out of rotation,
//! `healthyThreshold` passes bring it back. Probes run per route generation and stop
//! when a reload retires it.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use rand::Rng;
use trimtab_api::balancer_policy::HealthCheck;

use crate::{
    route::{Endpoint, RouteRuntime},
    weighting,
};

/// A probe's result folded into the streak: the new streak and whether the endpoint
/// is healthy after it. Pure.
pub fn next_state(healthy: bool, streak: i32, passed: bool, cfg: &HealthCheck) -> (i32, bool) {
    let streak = if passed {
        streak.max(0).saturating_add(1)
    } else {
        streak.min(0).saturating_sub(1)
    };
    let healthy = if healthy {
        !(streak < 0 && streak.unsigned_abs() >= cfg.unhealthy_threshold)
    } else {
        streak > 0 && streak.unsigned_abs() >= cfg.healthy_threshold
    };
    (streak, healthy)
}

/// Starts the route's background work: health probes when configured (otherwise every
/// endpoint counts as healthy) and the cpuWeighted weight updater.
pub fn start(route: Arc<RouteRuntime>) {
    match route.config.health_check.clone() {
        Some(cfg) => {
            for endpoint in &route.endpoints {
                tokio::spawn(probe_loop(
                    Arc::clone(&route),
                    Arc::clone(endpoint),
                    cfg.clone(),
                ));
            }
        }
        None => route.endpoints.iter().for_each(|e| e.set_healthy(true)),
    }
    weighting::start(route);
}

async fn probe_loop(route: Arc<RouteRuntime>, endpoint: Arc<Endpoint>, cfg: HealthCheck) {
    let interval = cfg.interval.get();
    // Spread the first probes so that endpoints are not all probed at the same instant.
    let first = rand::rng().random_range(0..=interval.as_millis().min(1000) as u64);
    tokio::time::sleep(Duration::from_millis(first)).await;
    while !route.retired.load(Ordering::Relaxed) {
        let passed = probe(&route, &endpoint, &cfg).await;
        let before = endpoint.is_healthy();
        let (streak, healthy) = next_state(
            before,
            endpoint.probe_streak.load(Ordering::Relaxed),
            passed,
            &cfg,
        );
        endpoint.probe_streak.store(streak, Ordering::Relaxed);
        if healthy != before {
            endpoint.set_healthy(healthy);
            if healthy {
                tracing::info!(route = %route.id, endpoint = %endpoint.address, "endpoint healthy again");
            } else {
                tracing::warn!(route = %route.id, endpoint = %endpoint.address, path = %cfg.path, "endpoint unhealthy: health checks failing");
            }
        }
        tokio::time::sleep(interval).await;
    }
}

async fn probe(route: &RouteRuntime, endpoint: &Endpoint, cfg: &HealthCheck) -> bool {
    let Ok(uri) = Uri::builder().path_and_query(cfg.path.as_str()).build() else {
        return false;
    };
    let Ok(request) = Request::get(uri).body(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    ) else {
        return false;
    };
    let sent = endpoint
        .pool
        .send(request, route.config.timeouts.connect.get());
    let response = tokio::time::timeout(cfg.timeout.get(), sent).await;
    matches!(response, Ok(Ok(r)) if r.status().is_success() || r.status().is_redirection())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_unhealthy_after_threshold_failures_and_healthy_after_threshold_passes() {
        let cfg = HealthCheck {
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            ..HealthCheck::default()
        };
        let (mut streak, mut healthy) = (0, true);
        for expected in [true, true, false] {
            (streak, healthy) = next_state(healthy, streak, false, &cfg);
            assert_eq!(healthy, expected);
        }
        (streak, healthy) = next_state(healthy, streak, true, &cfg);
        assert!(!healthy);
        (_, healthy) = next_state(healthy, streak, true, &cfg);
        assert!(healthy);
    }
}
