//! Least request, as Envoy's LEAST_REQUEST load balancer does it: with equal weights,
//! the power of two choices (pick two at random, send to the one with fewer active
//! requests; Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing");
//! with unequal weights, a weighted random pick by
//! `weight / (active_requests + 1) ^ active_request_bias`.

use rand::Rng;

use super::{Balance, Target, two_choices};

/// Envoy's default `active_request_bias`: 1.0 makes the weight inversely proportional to
/// the active requests; 0.0 would ignore them and degrade to weighted random.
pub const ACTIVE_REQUEST_BIAS: f64 = 1.0;

/// P2C over active requests, weighted as Envoy weights it.
#[derive(Debug)]
pub struct LeastRequest {
    bias: f64,
}

impl Default for LeastRequest {
    fn default() -> Self {
        Self {
            bias: ACTIVE_REQUEST_BIAS,
        }
    }
}

impl Balance for LeastRequest {
    fn pick<T: Target, R: Rng + ?Sized>(
        &self,
        endpoints: &[T],
        eligible: &[usize],
        rng: &mut R,
    ) -> Option<usize> {
        let first = *eligible.first()?;
        let first_weight = endpoints[first].load().weight();
        if eligible
            .iter()
            .all(|&i| endpoints[i].load().weight() == first_weight)
        {
            let (a, b) = two_choices(eligible, rng);
            return Some(
                if endpoints[b].load().active() < endpoints[a].load().active() {
                    b
                } else {
                    a
                },
            );
        }
        let effective = |i: usize| {
            let load = endpoints[i].load();
            f64::from(load.weight()) / (f64::from(load.active()) + 1.0).powf(self.bias)
        };
        let total: f64 = eligible.iter().map(|&i| effective(i)).sum();
        if total <= 0.0 {
            return Some(eligible[rng.random_range(0..eligible.len())]);
        }
        let mut point = rng.random_range(0.0..total);
        for &i in eligible {
            point -= effective(i);
            if point < 0.0 {
                return Some(i);
            }
        }
        eligible.last().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::*;

    #[test]
    fn prefers_the_less_busy_of_two_random_endpoints() {
        let eps = endpoints(&[1, 1, 1]);
        for _ in 0..10 {
            eps[0].start();
        }
        let counts = histogram(&LeastRequest::default(), &eps, &[0, 1, 2], 3000);
        // Endpoint 0 loses every comparison it is in, and can only win against itself.
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[1].abs_diff(counts[2]) < 300, "{counts:?}");
    }

    #[test]
    fn spreads_idle_endpoints_about_evenly() {
        let eps = endpoints(&[1, 1, 1, 1]);
        let counts = histogram(&LeastRequest::default(), &eps, &[0, 1, 2, 3], 4000);
        for c in counts {
            assert!((850..1150).contains(&c), "{c}");
        }
    }

    #[test]
    fn unequal_weights_split_by_weight_over_active_requests() {
        let eps = endpoints(&[1, 3]);
        let counts = histogram(&LeastRequest::default(), &eps, &[0, 1], 4000);
        assert!((800..1200).contains(&counts[0]), "{counts:?}");
        // Three requests in flight on the heavy endpoint: 3/(3+1) against 1/1, so the
        // light endpoint now gets 1/1.75 = 57% of new requests.
        for _ in 0..3 {
            eps[1].start();
        }
        let counts = histogram(&LeastRequest::default(), &eps, &[0, 1], 4000);
        assert!((2100..2500).contains(&counts[0]), "{counts:?}");
    }
}
