//! Sharding: which users and how much arrival rate this runner process owns.
//!
//! A LoadTest runs as an Indexed Job; pod `i` of `n` takes a disjoint, contiguous
//! range of user ids (closed model) or every `n`-th arrival (open model), so the pods
//! together run exactly the workload the spec asks for, and a user id names one bot
//! across the whole test (its seed, its journey, its entries in failure reports).

use std::{fmt, ops::Range, str::FromStr};

/// This process's slot among `count` runners, `index` counted from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This runner, `0..count`.
    pub index: u32,
    /// All runners.
    pub count: u32,
}

/// A `--shard` value that is not `i/n` with `i < n`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardError {
    /// Not two numbers around a slash.
    #[error("shard {input:?}: expected INDEX/COUNT such as 0/4")]
    Syntax {
        /// What was given.
        input: String,
    },
    /// The index is outside the runners.
    #[error("shard {index}/{count}: expected an index from 0 to count - 1 and count >= 1")]
    Range {
        /// The index given.
        index: u32,
        /// The count given.
        count: u32,
    },
}

impl Shard {
    /// The whole test in one process.
    pub const WHOLE: Self = Self { index: 0, count: 1 };

    /// A shard, checked.
    pub fn new(index: u32, count: u32) -> Result<Self, ShardError> {
        if count == 0 || index >= count {
            return Err(ShardError::Range { index, count });
        }
        Ok(Self { index, count })
    }

    /// Closed model: this shard's user ids out of `0..total`. Contiguous ranges whose
    /// sizes differ by at most one, so the shards partition the ids exactly.
    pub fn user_ids(&self, total: u64) -> Range<u64> {
        let (i, n) = (u128::from(self.index), u128::from(self.count));
        let total = u128::from(total);
        // Fits: both bounds are at most `total`, a u64.
        let start = (total * i / n) as u64;
        let end = (total * (i + 1) / n) as u64;
        start..end
    }

    /// Open model: the user id of this shard's `seq`-th arrival. Shards interleave
    /// (`index`, `index + count`, …) so ids never collide however long the test runs.
    pub fn arrival_id(&self, seq: u64) -> u64 {
        seq.saturating_mul(u64::from(self.count))
            .saturating_add(u64::from(self.index))
    }

    /// This shard's part of a rate or a cap that is split evenly.
    pub fn share(&self, whole: f64) -> f64 {
        whole / f64::from(self.count)
    }

    /// This shard's part of a whole-number cap: the same split as [`Shard::user_ids`].
    pub fn share_of_count(&self, whole: u64) -> u64 {
        let ids = self.user_ids(whole);
        ids.end - ids.start
    }
}

impl Default for Shard {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl FromStr for Shard {
    type Err = ShardError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let syntax = || ShardError::Syntax {
            input: input.to_owned(),
        };
        let (index, count) = input.trim().split_once('/').ok_or_else(syntax)?;
        let index = index.trim().parse().map_err(|_| syntax())?;
        let count = count.trim().parse().map_err(|_| syntax())?;
        Self::new(index, count)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn shards_partition_user_ids_exactly() {
        for total in [0, 1, 7, 100, 2000, 1_000_003] {
            for count in [1, 2, 3, 4, 7, 20] {
                let mut next = 0;
                for index in 0..count {
                    let ids = Shard::new(index, count).expect("valid").user_ids(total);
                    assert_eq!(ids.start, next, "total {total} shard {index}/{count}");
                    let size = ids.end - ids.start;
                    assert!(
                        size == total / u64::from(count) || size == total / u64::from(count) + 1
                    );
                    next = ids.end;
                }
                assert_eq!(next, total);
            }
        }
    }

    #[test]
    fn arrival_ids_never_collide_between_shards() {
        let count = 5;
        let mut seen = HashSet::new();
        for index in 0..count {
            let shard = Shard::new(index, count).expect("valid");
            for seq in 0..1000 {
                assert!(seen.insert(shard.arrival_id(seq)));
            }
        }
        assert_eq!(seen.len(), 5000);
        assert!((0..5000).all(|id| seen.contains(&id)));
    }

    #[test]
    fn shares_add_up_to_the_whole() {
        let count = 3;
        let shards: Vec<_> = (0..count)
            .map(|i| Shard::new(i, count).expect("valid"))
            .collect();
        let rate: f64 = shards.iter().map(|s| s.share(500.0)).sum();
        assert!((rate - 500.0).abs() < 1e-9);
        let cap: u64 = shards.iter().map(|s| s.share_of_count(1000)).sum();
        assert_eq!(cap, 1000);
    }

    #[test]
    fn parses_index_slash_count_and_refuses_the_rest() {
        assert_eq!("2/4".parse(), Ok(Shard { index: 2, count: 4 }));
        assert_eq!(
            "4/4".parse::<Shard>(),
            Err(ShardError::Range { index: 4, count: 4 })
        );
        assert_eq!(
            "0/0".parse::<Shard>(),
            Err(ShardError::Range { index: 0, count: 0 })
        );
        assert!(matches!(
            "2".parse::<Shard>(),
            Err(ShardError::Syntax { .. })
        ));
        assert!(matches!(
            "a/b".parse::<Shard>(),
            Err(ShardError::Syntax { .. })
        ));
    }
}
