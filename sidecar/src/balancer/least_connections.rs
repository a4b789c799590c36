//! Least connections: the eligible endpoint with the fewest requests in flight per unit
//! of weight (nginx `least_conn`, HAProxy `leastconn`). Ties go round robin, as nginx's
//! do, so an idle pool is not all sent to the first endpoint.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

use super::{Balance, Target};

/// Fewest active requests per weight; ties broken by a rotating start.
#[derive(Debug, Default)]
pub struct LeastConnections {
    next: AtomicUsize,
}

impl Balance for LeastConnections {
    fn pick<T: Target, R: Rng + ?Sized>(
        &self,
        endpoints: &[T],
        eligible: &[usize],
        _: &mut R,
    ) -> Option<usize> {
        if eligible.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = eligible.len();
        let mut best = eligible[start % n];
        for k in 1..n {
            let candidate = eligible[(start + k) % n];
            let (c, b) = (endpoints[candidate].load(), endpoints[best].load());
            // nginx: peer.conns * best.weight < best.conns * peer.weight (weights ≥ 1 here).
            let (cw, bw) = (u64::from(c.weight().max(1)), u64::from(b.weight().max(1)));
            if u64::from(c.active()) * bw < u64::from(b.active()) * cw {
                best = candidate;
            }
        }
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::*;

    #[test]
    fn picks_the_endpoint_with_fewest_active_requests() {
        let eps = endpoints(&[1, 1, 1]);
        for _ in 0..3 {
            eps[0].start();
            eps[2].start();
        }
        eps[1].start();
        assert_eq!(
            histogram(&LeastConnections::default(), &eps, &[0, 1, 2], 10),
            [0, 10, 0]
        );
    }

    #[test]
    fn rotates_among_equally_loaded_endpoints() {
        let eps = endpoints(&[1, 1, 1]);
        assert_eq!(
            histogram(&LeastConnections::default(), &eps, &[0, 1, 2], 300),
            [100; 3]
        );
    }

    #[test]
    fn fills_endpoints_evenly_as_requests_stay_open() {
        let eps = endpoints(&[1, 1]);
        let lc = LeastConnections::default();
        let mut rng = seeded();
        for _ in 0..10 {
            let i = lc.pick(&eps, &[0, 1], &mut rng).expect("eligible");
            eps[i].start();
        }
        assert_eq!((eps[0].active(), eps[1].active()), (5, 5));
    }
}
