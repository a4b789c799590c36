//! cpuWeighted: weighted round robin over live weights, picked with gRFC A58's static
//! stride scheduler ("Client-side weighted round robin LB policy", the scheduler gRPC
//! uses since 1.55). Weights come from the config (the operator's weight controller)
//! and are refined in the sidecar from ORCA `endpoint-load-metrics` response headers by
//! [`crate::balancer::weights`]; every update rebuilds the scheduler, which is swapped
//! in with `arc-swap`. A pick is one atomic increment and arithmetic — no lock.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use arc_swap::ArcSwap;
use rand::Rng;

use super::{Balance, Target};

/// A58's `kMaxWeight`: weights are scaled so that the largest is this.
const MAX_SCALED_WEIGHT: u64 = 0xFFFF;
/// A58's `kOffset`, spreading the endpoints' phases apart.
const OFFSET: u64 = MAX_SCALED_WEIGHT / 2;
/// A58 clamps weights to at least this fraction of the largest, which bounds the
/// number of skipped slots per pick.
const MIN_RATIO: f64 = 0.01;

/// gRFC A58's static stride scheduler over live weights.
#[derive(Debug)]
pub struct CpuWeighted {
    scaled: ArcSwap<Vec<u64>>,
    sequence: AtomicU64,
}

impl CpuWeighted {
    /// A scheduler over the initial `weights`.
    pub fn new(weights: &[u32]) -> Self {
        let weights: Vec<f64> = weights.iter().map(|w| f64::from(*w)).collect();
        Self {
            scaled: ArcSwap::from_pointee(scale(&weights)),
            sequence: AtomicU64::new(0),
        }
    }

    /// Replaces the weights (one per endpoint, in endpoint order).
    pub fn set_weights(&self, weights: &[f64]) {
        self.scaled.store(Arc::new(scale(weights)));
    }
}

/// A58's scaling: the largest weight becomes [`MAX_SCALED_WEIGHT`]; zero or missing
/// weights take the mean of the others, and none falls below [`MIN_RATIO`] of the largest.
fn scale(weights: &[f64]) -> Vec<u64> {
    let positive: Vec<f64> = weights
        .iter()
        .copied()
        .filter(|w| *w > 0.0 && w.is_finite())
        .collect();
    if positive.is_empty() {
        return vec![MAX_SCALED_WEIGHT; weights.len()];
    }
    let mean = positive.iter().sum::<f64>() / positive.len() as f64;
    let max = positive.iter().copied().fold(f64::MIN, f64::max);
    weights
        .iter()
        .map(|w| {
            let w = if *w > 0.0 && w.is_finite() { *w } else { mean };
            let ratio = (w / max).max(MIN_RATIO);
            ((ratio * MAX_SCALED_WEIGHT as f64).round() as u64).clamp(1, MAX_SCALED_WEIGHT)
        })
        .collect()
}

impl Balance for CpuWeighted {
    fn pick<T: Target, R: Rng + ?Sized>(
        &self,
        endpoints: &[T],
        eligible: &[usize],
        rng: &mut R,
    ) -> Option<usize> {
        if eligible.is_empty() {
            return None;
        }
        let scaled = self.scaled.load();
        let n = scaled.len().min(endpoints.len()) as u64;
        if n > 0 {
            // With MIN_RATIO, an endpoint is chosen at least once per 1/MIN_RATIO
            // generations; the bound only matters when few endpoints are eligible.
            let bound = n * (1.0 / MIN_RATIO) as u64 * 2;
            for _ in 0..bound {
                let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
                let index = seq % n;
                let generation = seq / n;
                let weight = scaled[index as usize];
                let phase = (weight.wrapping_mul(generation) + index * OFFSET) % MAX_SCALED_WEIGHT;
                if phase >= MAX_SCALED_WEIGHT - weight
                    && eligible.binary_search(&(index as usize)).is_ok()
                {
                    return Some(index as usize);
                }
            }
        }
        Some(eligible[rng.random_range(0..eligible.len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::*;

    #[test]
    fn splits_traffic_by_weight_1_2_4() {
        let eps = endpoints(&[1, 2, 4]);
        let b = CpuWeighted::new(&[1, 2, 4]);
        let counts = histogram(&b, &eps, &[0, 1, 2], 7000);
        for (count, expected) in counts.iter().zip([1000, 2000, 4000]) {
            assert!(count.abs_diff(expected) <= 20, "{counts:?}");
        }
    }

    #[test]
    fn new_weights_take_effect_at_once() {
        let eps = endpoints(&[1, 1]);
        let b = CpuWeighted::new(&[1, 1]);
        b.set_weights(&[3.0, 1.0]);
        let counts = histogram(&b, &eps, &[0, 1], 4000);
        assert!(counts[0].abs_diff(3000) <= 20, "{counts:?}");
    }

    #[test]
    fn unknown_weights_take_the_mean() {
        assert_eq!(scale(&[0.0, 2.0, 2.0]), vec![MAX_SCALED_WEIGHT; 3]);
        assert_eq!(scale(&[0.0, 0.0]), vec![MAX_SCALED_WEIGHT; 2]);
    }

    #[test]
    fn tiny_weights_are_clamped_to_one_percent_of_the_largest() {
        let scaled = scale(&[1.0, 1_000_000.0]);
        assert_eq!(
            scaled[0],
            (MAX_SCALED_WEIGHT as f64 * MIN_RATIO).round() as u64
        );
    }
}
