//! Think time: the pause between a response and a user's next request.
//!
//! Real users do not fire requests back to back; the pause shapes the load far more
//! than the number of users does. Sampling is a pure function of the distribution and
//! the user's RNG, so one seed replays one user's pauses exactly.

use std::time::Duration;

use rand::Rng;
use trimtab_api::load_test::{Distribution, ThinkTime};

/// A think-time spec that cannot be sampled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ThinkTimeError {
    /// Uniform needs both ends.
    #[error("a uniform think time needs min and max")]
    UniformBounds,
    /// Constant, exponential and normal need a mean.
    #[error("{distribution} think times need mean")]
    Mean {
        /// The distribution named in the spec.
        distribution: &'static str,
    },
    /// Normal needs a spread.
    #[error("a normal think time needs stddev")]
    Stddev,
    /// The bounds are the wrong way round.
    #[error("min {min:?} exceeds max {max:?}")]
    Bounds {
        /// The lower bound given.
        min: Duration,
        /// The upper bound given.
        max: Duration,
    },
}

/// A validated think-time distribution, ready to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Think {
    distribution: Distribution,
    mean: Duration,
    stddev: Duration,
    min: Duration,
    max: Duration,
}

impl Think {
    /// No pause at all: what a scenario without any think time gets.
    pub const ZERO: Self = Self {
        distribution: Distribution::Constant,
        mean: Duration::ZERO,
        stddev: Duration::ZERO,
        min: Duration::ZERO,
        max: Duration::MAX,
    };

    /// Validates a spec: the fields each distribution needs, and `min <= max`.
    pub fn compile(spec: &ThinkTime) -> Result<Self, ThinkTimeError> {
        let min = spec.min.map(|d| d.get()).unwrap_or(Duration::ZERO);
        let max = spec.max.map(|d| d.get()).unwrap_or(Duration::MAX);
        if min > max {
            return Err(ThinkTimeError::Bounds { min, max });
        }
        let name = match spec.distribution {
            Distribution::Constant => "constant",
            Distribution::Uniform => "uniform",
            Distribution::Exponential => "exponential",
            Distribution::Normal => "normal",
        };
        let mean = match (spec.distribution, spec.mean) {
            (Distribution::Uniform, _) => {
                if spec.min.is_none() || spec.max.is_none() {
                    return Err(ThinkTimeError::UniformBounds);
                }
                Duration::ZERO
            }
            (_, Some(mean)) => mean.get(),
            (_, None) => return Err(ThinkTimeError::Mean { distribution: name }),
        };
        let stddev = match (spec.distribution, spec.stddev) {
            (Distribution::Normal, None) => return Err(ThinkTimeError::Stddev),
            (_, stddev) => stddev.map(|d| d.get()).unwrap_or(Duration::ZERO),
        };
        Ok(Self {
            distribution: spec.distribution,
            mean,
            stddev,
            min,
            max,
        })
    }

    /// One pause, clamped to `[min, max]`.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        let secs = match self.distribution {
            Distribution::Constant => self.mean.as_secs_f64(),
            Distribution::Uniform => {
                let (lo, hi) = (self.min.as_secs_f64(), self.max.as_secs_f64());
                lo + (hi - lo) * rng.random::<f64>()
            }
            // Inverse transform sampling: -mean·ln(U), U in (0, 1].
            Distribution::Exponential => {
                let u = 1.0 - rng.random::<f64>();
                -self.mean.as_secs_f64() * u.ln()
            }
            // Box–Muller: one standard normal from two uniforms.
            Distribution::Normal => {
                let u1 = 1.0 - rng.random::<f64>();
                let u2 = rng.random::<f64>();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                self.mean.as_secs_f64() + z * self.stddev.as_secs_f64()
            }
        };
        let pause = Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(self.max);
        pause.clamp(self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::SmallRng};
    use trimtab_api::duration::Duration as SpecDuration;

    use super::*;

    fn spec(distribution: Distribution) -> ThinkTime {
        ThinkTime {
            distribution,
            mean: None,
            stddev: None,
            min: None,
            max: None,
        }
    }

    fn ms(n: u64) -> Option<SpecDuration> {
        Some(SpecDuration::from_millis(n))
    }

    #[test]
    fn constant_is_always_the_mean() {
        let think = Think::compile(&ThinkTime {
            mean: ms(250),
            ..spec(Distribution::Constant)
        })
        .expect("valid");
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..10 {
            assert_eq!(think.sample(&mut rng), Duration::from_millis(250));
        }
    }

    #[test]
    fn exponential_has_the_mean_and_respects_max() {
        let think = Think::compile(&ThinkTime {
            mean: ms(1000),
            max: ms(10_000),
            ..spec(Distribution::Exponential)
        })
        .expect("valid");
        let mut rng = SmallRng::seed_from_u64(7);
        let n = 20_000;
        let samples: Vec<Duration> = (0..n).map(|_| think.sample(&mut rng)).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(10)));
        let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / f64::from(n);
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn uniform_stays_between_min_and_max() {
        let think = Think::compile(&ThinkTime {
            min: ms(100),
            max: ms(200),
            ..spec(Distribution::Uniform)
        })
        .expect("valid");
        let mut rng = SmallRng::seed_from_u64(3);
        for _ in 0..1000 {
            let d = think.sample(&mut rng);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
        }
    }

    #[test]
    fn normal_is_clamped_to_its_bounds() {
        let think = Think::compile(&ThinkTime {
            mean: ms(100),
            stddev: ms(100),
            min: ms(50),
            max: ms(150),
            ..spec(Distribution::Normal)
        })
        .expect("valid");
        let mut rng = SmallRng::seed_from_u64(5);
        for _ in 0..1000 {
            let d = think.sample(&mut rng);
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(150));
        }
    }

    #[test]
    fn refuses_specs_missing_what_the_distribution_needs() {
        assert_eq!(
            Think::compile(&spec(Distribution::Uniform)),
            Err(ThinkTimeError::UniformBounds)
        );
        assert_eq!(
            Think::compile(&spec(Distribution::Exponential)),
            Err(ThinkTimeError::Mean {
                distribution: "exponential"
            })
        );
        assert_eq!(
            Think::compile(&ThinkTime {
                mean: ms(1),
                ..spec(Distribution::Normal)
            }),
            Err(ThinkTimeError::Stddev)
        );
        assert!(matches!(
            Think::compile(&ThinkTime {
                mean: ms(1),
                min: ms(5),
                max: ms(1),
                ..spec(Distribution::Constant)
            }),
            Err(ThinkTimeError::Bounds { .. })
        ));
    }

    #[test]
    fn same_seed_same_pauses() {
        let think = Think::compile(&ThinkTime {
            mean: ms(500),
            ..spec(Distribution::Exponential)
        })
        .expect("valid");
        let a: Vec<_> = {
            let mut rng = SmallRng::seed_from_u64(42);
            (0..5).map(|_| think.sample(&mut rng)).collect()
        };
        let mut rng = SmallRng::seed_from_u64(42);
        let b: Vec<_> = (0..5).map(|_| think.sample(&mut rng)).collect();
        assert_eq!(a, b);
    }
}
