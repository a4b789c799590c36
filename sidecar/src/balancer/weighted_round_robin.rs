//! Smooth weighted round robin, as nginx does it (`ngx_http_upstream_get_peer` in
//! `ngx_http_upstream_round_robin.c`): each pick adds every peer's weight to its
//! `current`, takes the largest, and subtracts the total from it. Weights 5,1,1 give
//! a,a,b,a,c,a,a — heavy endpoints are interleaved, never sent a burst.
//!
//! nginx updates `current` under the upstream's lock. Here the cycle is computed once,
//! when the config arrives, and picks walk it with an atomic cursor: the same sequence,
//! and no lock on the request path.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

use super::{Balance, Target};

/// The longest precomputed cycle; larger weight sums are scaled down to fit, keeping
/// their ratios to within rounding.
pub const MAX_CYCLE: u64 = 4096;

/// Smooth weighted round robin over a precomputed nginx cycle.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    cycle: Vec<usize>,
    cursor: AtomicUsize,
}

impl WeightedRoundRobin {
    /// The cycle for `weights` (one per endpoint). Weight 0 gets no traffic; if every
    /// weight is 0 all endpoints count as equal.
    pub fn new(weights: &[u32]) -> Self {
        Self {
            cycle: smooth_cycle(weights),
            cursor: AtomicUsize::new(0),
        }
    }
}

/// One full nginx smooth-WRR cycle for `weights`.
pub fn smooth_cycle(weights: &[u32]) -> Vec<usize> {
    let mut weights: Vec<u64> = weights.iter().map(|w| u64::from(*w)).collect();
    if weights.iter().all(|w| *w == 0) {
        weights.iter_mut().for_each(|w| *w = 1);
    }
    let g = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
    if g > 1 {
        weights.iter_mut().for_each(|w| *w /= g);
    }
    let total: u64 = weights.iter().sum();
    if total > MAX_CYCLE {
        // Keep every nonzero weight at least 1 so no endpoint silently loses all traffic.
        weights
            .iter_mut()
            .filter(|w| **w > 0)
            .for_each(|w| *w = (*w * MAX_CYCLE / total).max(1));
    }
    let total: i64 = weights.iter().map(|w| *w as i64).sum();
    let mut current = vec![0_i64; weights.len()];
    let mut cycle = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best);
    }
    cycle
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Balance for WeightedRoundRobin {
    fn pick<T: Target, R: Rng + ?Sized>(
        &self,
        _: &[T],
        eligible: &[usize],
        rng: &mut R,
    ) -> Option<usize> {
        if eligible.is_empty() {
            return None;
        }
        // Walk the cycle past ineligible endpoints: the eligible keep their relative shares.
        for _ in 0..self.cycle.len() {
            let pos = self.cursor.fetch_add(1, Ordering::Relaxed) % self.cycle.len();
            let candidate = self.cycle[pos];
            if eligible.binary_search(&candidate).is_ok() {
                return Some(candidate);
            }
        }
        // Only weight-0 endpoints are eligible: better them than a failed request.
        Some(eligible[rng.random_range(0..eligible.len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::*;

    #[test]
    fn weights_5_1_1_give_the_nginx_sequence_a_a_b_a_c_a_a() {
        assert_eq!(smooth_cycle(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        let eps = endpoints(&[5, 1, 1]);
        let wrr = WeightedRoundRobin::new(&[5, 1, 1]);
        let mut rng = seeded();
        let picks: Vec<_> = (0..14)
            .filter_map(|_| wrr.pick(&eps, &[0, 1, 2], &mut rng))
            .collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn splits_traffic_by_weight() {
        let eps = endpoints(&[1, 2, 4]);
        let wrr = WeightedRoundRobin::new(&[1, 2, 4]);
        assert_eq!(histogram(&wrr, &eps, &[0, 1, 2], 700), [100, 200, 400]);
    }

    #[test]
    fn large_weights_are_scaled_into_a_bounded_cycle() {
        let cycle = smooth_cycle(&[10_000, 9_999, 1]);
        assert!(cycle.len() as u64 <= MAX_CYCLE + 3, "{}", cycle.len());
        assert!(cycle.contains(&2));
    }

    #[test]
    fn weight_zero_gets_no_traffic_while_others_are_eligible() {
        let eps = endpoints(&[0, 1]);
        let wrr = WeightedRoundRobin::new(&[0, 1]);
        assert_eq!(histogram(&wrr, &eps, &[0, 1], 10), [0, 10]);
        assert_eq!(histogram(&wrr, &eps, &[0], 3), [3, 0]);
    }

    #[test]
    fn skipping_an_ineligible_endpoint_keeps_the_others_ratio() {
        let eps = endpoints(&[1, 2, 4]);
        let wrr = WeightedRoundRobin::new(&[1, 2, 4]);
        assert_eq!(histogram(&wrr, &eps, &[0, 2], 500), [100, 0, 400]);
    }
}
