//! The cpuWeighted weight updater of one route: every `weighting.interval` it turns
//! the endpoints' latest ORCA load reports (or, without `rps_fractional`, the request
//! rate the sidecar itself saw) into samples, runs the pure
//! [`crate::balancer::weights::compute`], and publishes the weights and load states.
//! Without any fresh report the config's weights stand untouched. An endpoint ejected
//! for load is let back in at `minWeight` once an interval passes without a report
//! from it (it cannot report without traffic), so ejection lasts one interval at a
//! time rather than until its last report expires.

use std::sync::{Arc, atomic::Ordering};

use trimtab_api::balancer_policy::{Algorithm, EndpointState};

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
    // Fixed for the route's lifetime (a new config starts a new updater).
    let expiry = u64::try_from(cfg.sample_expiry.get().as_millis()).unwrap_or(u64::MAX);
    let seconds = interval.as_secs_f64();
    let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    // The config's weights (1 each for static endpoints, the operator's 0–maxWeight
    // otherwise) scaled to the range `compute` works in; starting from raw 1s would
    // leave the step limit crawling up from the bottom for a dozen intervals.
    let config_weights: Vec<u32> = route.endpoints.iter().map(|e| e.load.weight()).collect();
    let mut previous: Vec<Weighted> = weights::initial(&config_weights, &cfg)
        .into_iter()
        .zip(route.endpoints.iter())
        .map(|(w, e)| Weighted {
            state: e.load_state(),
            ..w
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
        let samples: Vec<Option<Sample>> = route
            .endpoints
            .iter()
            .zip(last_counts.iter_mut())
            .zip(&previous)
            .map(|((e, last), prev)| {
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
                // An ejected endpoint gets no requests, so it sends no reports: the one
                // that ejected it would otherwise keep it out until it expires. With
                // nothing newer than an interval, it comes back at minWeight, and its
                // next reports decide.
                if prev.state == EndpointState::Ejected && now.saturating_sub(at) > interval_ms {
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
