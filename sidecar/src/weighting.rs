//! The cpuWeighted weight updater of one route: every `weighting.interval` it turns
//! the endpoints' latest ORCA load reports (or, without `rps_fractional`, the request
//! rate the sidecar itself saw) into samples, runs the pure
//! [`crate::balancer::weights::compute`], and publishes the weights and load states.
//! Without any fresh report the config's weights stand untouched.

use std::sync::{Arc, atomic::Ordering};

use trimtab_api::balancer_policy::Algorithm;

use crate::{
    balancer::{
        Balancer,
        weights::{self, Sample, Weighted},
    },
    route::{RouteRuntime, now_ms},
};

/// Starts the updater for a cpuWeighted route; other algorithms need none.
pub fn start(route: Arc<RouteRuntime>) {
    if route.config.algorithm == Algorithm::CpuWeighted {
        tokio::spawn(update_loop(route));
    }
}

async fn update_loop(route: Arc<RouteRuntime>) {
    let cfg = route.config.weighting.clone();
    let interval = cfg.interval.get();
    let mut previous: Vec<Weighted> = route
        .endpoints
        .iter()
        .map(|e| Weighted {
            weight: f64::from(e.load.weight()),
            state: e.load_state(),
        })
        .collect();
    let mut last_counts: Vec<(u64, u64)> = route
        .endpoints
        .iter()
        .map(|e| {
            (
                e.responses.load(Ordering::Relaxed),
                e.failures.load(Ordering::Relaxed),
            )
        })
        .collect();
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if route.retired.load(Ordering::Relaxed) {
            return;
        }
        let now = now_ms();
        let expiry = u64::try_from(cfg.sample_expiry.get().as_millis()).unwrap_or(u64::MAX);
        let seconds = interval.as_secs_f64();
        let samples: Vec<Option<Sample>> = route
            .endpoints
            .iter()
            .zip(last_counts.iter_mut())
            .map(|(e, last)| {
                let counts = (
                    e.responses.load(Ordering::Relaxed),
                    e.failures.load(Ordering::Relaxed),
                );
                let seen_qps = counts.0.saturating_sub(last.0) as f64 / seconds;
                let seen_eps = counts.1.saturating_sub(last.1) as f64 / seconds;
                *last = counts;
                let (utilization, qps, eps, at) = e.latest_load_report();
                if at == 0 || now.saturating_sub(at) > expiry {
                    return None;
                }
                Some(Sample {
                    utilization,
                    qps: if qps > 0.0 { qps } else { seen_qps },
                    eps: if qps > 0.0 { eps } else { seen_eps },
                })
            })
            .collect();
        if samples.iter().all(Option::is_none) {
            // No endpoint reports its load: the config's weights (the operator's) stand.
            continue;
        }
        let next = weights::compute(&previous, &samples, &cfg);
        for (endpoint, w) in route.endpoints.iter().zip(&next) {
            endpoint.load.set_weight(w.weight.round() as u32);
            endpoint.set_load_state(w.state);
        }
        if let Balancer::CpuWeighted(b) = &route.balancer {
            b.set_weights(&next.iter().map(|w| w.weight).collect::<Vec<_>>());
        }
        tracing::debug!(route = %route.id, weights = ?next, "cpuWeighted weights updated");
        previous = next;
    }
}
