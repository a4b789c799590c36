//! Round robin: each eligible endpoint in turn (nginx's and Envoy's ROUND_ROBIN without
//! weights).

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

use super::{Balance, Target};

/// Each eligible endpoint in turn; one shared atomic cursor, no lock.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Balance for RoundRobin {
    fn pick<T: Target, R: Rng + ?Sized>(
        &self,
        _: &[T],
        eligible: &[usize],
        _: &mut R,
    ) -> Option<usize> {
        if eligible.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % eligible.len();
        Some(eligible[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::*;

    #[test]
    fn visits_endpoints_in_turn() {
        let eps = endpoints(&[1, 1, 1]);
        let rr = RoundRobin::default();
        let mut rng = seeded();
        let picks: Vec<_> = (0..6)
            .filter_map(|_| rr.pick(&eps, &[0, 1, 2], &mut rng))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn splits_traffic_evenly() {
        let eps = endpoints(&[1, 1, 1, 1]);
        assert_eq!(
            histogram(&RoundRobin::default(), &eps, &[0, 1, 2, 3], 400),
            [100; 4]
        );
    }
}
