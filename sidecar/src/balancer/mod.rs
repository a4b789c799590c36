//! Choosing an endpoint for each request: one small trait, [`Balance`], and one strategy
//! per `spec.algorithm`, each a pure function of the endpoints' [`EndpointLoad`]s and a
//! random source, so that each is tested alone with a fixed seed.
//!
//! Strategies never see ejected, unhealthy or saturated endpoints: the caller passes the
//! indices of the eligible ones. The request path takes no locks: counters are atomics
//! and the cpuWeighted schedule sits behind `arc-swap`.

mod cpu_weighted;
mod least_connections;
mod least_request;
mod load;
pub mod peak_ewma;
mod round_robin;
mod weighted_round_robin;
pub mod weights;

use rand::Rng;
use trimtab_api::balancer_policy::Algorithm;

pub use cpu_weighted::CpuWeighted;
pub use least_connections::LeastConnections;
pub use least_request::LeastRequest;
pub use load::{EndpointLoad, Target};
pub use peak_ewma::PeakEwma;
pub use round_robin::RoundRobin;
pub use weighted_round_robin::WeightedRoundRobin;

/// A balancing strategy.
pub trait Balance {
    /// Picks one of `eligible` (indices into `endpoints`, ascending), or `None` when
    /// `eligible` is empty.
    fn pick<T: Target, R: Rng + ?Sized>(
        &self,
        endpoints: &[T],
        eligible: &[usize],
        rng: &mut R,
    ) -> Option<usize>;
}

/// The strategy of one route, chosen by `spec.algorithm`.
#[derive(Debug)]
pub enum Balancer {
    /// See [`RoundRobin`].
    RoundRobin(RoundRobin),
    /// See [`WeightedRoundRobin`].
    WeightedRoundRobin(WeightedRoundRobin),
    /// See [`LeastConnections`].
    LeastConnections(LeastConnections),
    /// See [`LeastRequest`].
    LeastRequest(LeastRequest),
    /// See [`PeakEwma`].
    PeakEwma(PeakEwma),
    /// See [`CpuWeighted`].
    CpuWeighted(CpuWeighted),
}

impl Balancer {
    /// The strategy for `algorithm` over endpoints with the configured `weights`.
    pub fn new(algorithm: Algorithm, weights: &[u32]) -> Self {
        match algorithm {
            Algorithm::RoundRobin => Self::RoundRobin(RoundRobin::default()),
            Algorithm::WeightedRoundRobin => {
                Self::WeightedRoundRobin(WeightedRoundRobin::new(weights))
            }
            Algorithm::LeastConnections => Self::LeastConnections(LeastConnections::default()),
            Algorithm::LeastRequest => Self::LeastRequest(LeastRequest::default()),
            Algorithm::PeakEwma => Self::PeakEwma(PeakEwma),
            Algorithm::CpuWeighted => Self::CpuWeighted(CpuWeighted::new(weights)),
        }
    }
}

impl Balance for Balancer {
    fn pick<T: Target, R: Rng + ?Sized>(
        &self,
        endpoints: &[T],
        eligible: &[usize],
        rng: &mut R,
    ) -> Option<usize> {
        match self {
            Self::RoundRobin(b) => b.pick(endpoints, eligible, rng),
            Self::WeightedRoundRobin(b) => b.pick(endpoints, eligible, rng),
            Self::LeastConnections(b) => b.pick(endpoints, eligible, rng),
            Self::LeastRequest(b) => b.pick(endpoints, eligible, rng),
            Self::PeakEwma(b) => b.pick(endpoints, eligible, rng),
            Self::CpuWeighted(b) => b.pick(endpoints, eligible, rng),
        }
    }
}

/// Two distinct uniformly random members of `eligible` (power of two choices), or the
/// only one twice.
fn two_choices<R: Rng + ?Sized>(eligible: &[usize], rng: &mut R) -> (usize, usize) {
    let n = eligible.len();
    let a = rng.random_range(0..n);
    if n == 1 {
        return (eligible[a], eligible[a]);
    }
    // Draw from the n-1 others and skip over `a`: distinct without a retry loop.
    let mut b = rng.random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    (eligible[a], eligible[b])
}

#[cfg(test)]
pub(crate) mod test_support {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    /// A fixed-seed random source, so distribution tests are exact and repeatable.
    pub fn seeded() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    pub fn endpoints(weights: &[u32]) -> Vec<EndpointLoad> {
        // One clock origin, as a route gives its endpoints: idle endpoints tie.
        let origin = std::time::Instant::now();
        weights
            .iter()
            .map(|w| EndpointLoad::new_at(*w, origin))
            .collect()
    }

    /// How often each endpoint is picked in `n` picks.
    pub fn histogram(
        b: &impl Balance,
        endpoints: &[EndpointLoad],
        eligible: &[usize],
        n: usize,
    ) -> Vec<usize> {
        let mut rng = seeded();
        let mut counts = vec![0; endpoints.len()];
        for _ in 0..n {
            let i = b
                .pick(endpoints, eligible, &mut rng)
                .expect("an eligible endpoint");
            counts[i] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::*, *};

    #[test]
    fn every_strategy_returns_none_without_eligible_endpoints() {
        let eps = endpoints(&[1, 1]);
        let mut rng = seeded();
        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::WeightedRoundRobin,
            Algorithm::LeastConnections,
            Algorithm::LeastRequest,
            Algorithm::PeakEwma,
            Algorithm::CpuWeighted,
        ] {
            let b = Balancer::new(algorithm, &[1, 1]);
            assert_eq!(b.pick(&eps, &[], &mut rng), None, "{algorithm:?}");
        }
    }

    #[test]
    fn every_strategy_picks_only_eligible_endpoints() {
        let eps = endpoints(&[3, 1, 2, 5]);
        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::WeightedRoundRobin,
            Algorithm::LeastConnections,
            Algorithm::LeastRequest,
            Algorithm::PeakEwma,
            Algorithm::CpuWeighted,
        ] {
            let b = Balancer::new(algorithm, &[3, 1, 2, 5]);
            let counts = histogram(&b, &eps, &[1, 2], 200);
            assert_eq!(counts[0] + counts[3], 0, "{algorithm:?}: {counts:?}");
            assert!(counts[1] > 0 && counts[2] > 0, "{algorithm:?}: {counts:?}");
        }
    }

    #[test]
    fn two_choices_are_distinct() {
        let mut rng = seeded();
        for _ in 0..1000 {
            let (a, b) = two_choices(&[4, 7, 9], &mut rng);
            assert_ne!(a, b);
        }
        assert_eq!(two_choices(&[5], &mut rng), (5, 5));
    }
}
