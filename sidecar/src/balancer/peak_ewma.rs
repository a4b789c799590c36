//! Peak EWMA, as tower's `load::PeakEwma` and linkerd2-proxy's balancer do it: P2C over
//! cost = rtt_estimate × (pending + 1). The RTT estimate jumps up to any slower sample
//! at once (the *peak*) and otherwise moves toward new samples as an exponentially
//! weighted moving average whose weight depends on the time since the last sample; it
//! also decays toward zero while the endpoint is idle, so that a slow endpoint is
//! tried again.

use std::time::{Duration, Instant};

use rand::Rng;

use super::{Balance, Target, two_choices};

/// The RTT assumed for an endpoint with no samples yet (linkerd2-proxy's
/// `EWMA_DEFAULT_RTT`): low enough that new endpoints are tried soon.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// The EWMA time constant (linkerd2-proxy's `EWMA_DECAY`): a sample this old weighs 1/e.
pub const DECAY: Duration = Duration::from_secs(10);

/// P2C over peak-EWMA latency × pending requests.
#[derive(Debug, Default)]
pub struct PeakEwma;

/// The estimate after a new `rtt` sample, `elapsed` after the previous update (tower's
/// `RttEstimate::update`).
pub fn update(estimate_ns: f64, rtt_ns: f64, elapsed: Duration, decay: Duration) -> f64 {
    if rtt_ns > estimate_ns {
        return rtt_ns;
    }
    let w = (-(elapsed.as_nanos() as f64) / decay.as_nanos() as f64).exp();
    estimate_ns * w + rtt_ns * (1.0 - w)
}

/// The estimate decayed toward zero over `elapsed` without samples.
pub fn decay(estimate_ns: f64, elapsed: Duration, decay: Duration) -> f64 {
    update(estimate_ns, 0.0, elapsed, decay)
}

/// tower's cost: the latency estimate scaled by the queue one more request would join.
pub fn cost(rtt_estimate_ns: f64, pending: u32) -> f64 {
    rtt_estimate_ns * (f64::from(pending) + 1.0)
}

impl PeakEwma {
    fn pick_at<T: Target, R: Rng + ?Sized>(
        &self,
        endpoints: &[T],
        eligible: &[usize],
        rng: &mut R,
        now: Instant,
    ) -> Option<usize> {
        if eligible.is_empty() {
            return None;
        }
        let (a, b) = two_choices(eligible, rng);
        let cost_of = |i: usize| {
            let load = endpoints[i].load();
            cost(load.rtt_estimate_at(now), load.active())
        };
        Some(if cost_of(b) < cost_of(a) { b } else { a })
    }
}

impl Balance for PeakEwma {
    fn pick<T: Target, R: Rng + ?Sized>(
        &self,
        endpoints: &[T],
        eligible: &[usize],
        rng: &mut R,
    ) -> Option<usize> {
        self.pick_at(endpoints, eligible, rng, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::{EndpointLoad, test_support::*};

    #[test]
    fn a_slower_sample_raises_the_estimate_at_once() {
        assert_eq!(update(10.0, 50.0, Duration::ZERO, DECAY), 50.0);
    }

    #[test]
    fn a_faster_sample_moves_the_estimate_by_elapsed_time() {
        // One decay constant later, the old estimate weighs 1/e.
        let next = update(100.0, 0.0, DECAY, DECAY);
        assert!((next - 100.0 / std::f64::consts::E).abs() < 1e-9, "{next}");
        assert_eq!(update(100.0, 20.0, Duration::ZERO, DECAY), 100.0);
    }

    #[test]
    fn cost_grows_with_pending_requests() {
        assert_eq!(cost(30.0, 0), 30.0);
        assert_eq!(cost(30.0, 3), 120.0);
    }

    #[test]
    fn sends_most_traffic_to_the_faster_endpoint() {
        let origin = Instant::now();
        let eps: Vec<_> = (0..3).map(|_| EndpointLoad::new_at(1, origin)).collect();
        let now = origin + Duration::from_millis(10);
        eps[0].observe_rtt_at(Duration::from_millis(200), now);
        eps[1].observe_rtt_at(Duration::from_millis(5), now);
        eps[2].observe_rtt_at(Duration::from_millis(5), now);
        let mut rng = seeded();
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[PeakEwma
                .pick_at(&eps, &[0, 1, 2], &mut rng, now)
                .expect("eligible")] += 1;
        }
        // The slow endpoint only wins when P2C draws it against itself: never.
        assert_eq!(counts[0], 0, "{counts:?}");
    }

    #[test]
    fn pending_requests_outweigh_a_small_latency_edge() {
        let origin = Instant::now();
        let eps: Vec<_> = (0..2).map(|_| EndpointLoad::new_at(1, origin)).collect();
        let now = origin + Duration::from_millis(1);
        eps[0].observe_rtt_at(Duration::from_millis(10), now);
        eps[1].observe_rtt_at(Duration::from_millis(12), now);
        for _ in 0..4 {
            eps[0].start();
        }
        let mut rng = seeded();
        assert_eq!(PeakEwma.pick_at(&eps, &[0, 1], &mut rng, now), Some(1));
    }

    #[test]
    fn an_idle_slow_endpoint_is_tried_again_after_the_estimate_decays() {
        let origin = Instant::now();
        let load = EndpointLoad::new_at(1, origin);
        load.observe_rtt_at(Duration::from_secs(1), origin);
        let later = origin + DECAY * 5;
        assert!(load.rtt_estimate_at(later) < 1e9 * 0.01);
    }
}
