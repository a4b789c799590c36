//! Workload models: how many users run, and when they start.
//!
//! - **Closed** (`users`, `rampUp`): a fixed population; user `k` of `m` starts at
//!   `rampUp · k / m` and starts a new session whenever its last one ends.
//! - **Open** (`arrivalRate`, `maxUsers`): sessions arrive as a Poisson process whose
//!   rate ramps linearly to the target (Lewis–Shedler thinning), whatever the target's
//!   speed; arrivals beyond `maxUsers` running sessions are counted as dropped, not
//!   queued, so a slow target cannot quietly lower the offered load.
//!
//! The schedule itself (ramp offsets, next arrival, parsing the rate) is pure; the
//! spawning loop around it is the only I/O. Every loop ends at the deadline. While the
//! guard holds the load ([`super::gate`]), the closed ramp pauses and open arrivals
//! above the ceiling are dropped.

use std::{
    ops::Range,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::SmallRng};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use trimtab_api::load_test::Workload;

use super::{
    shard::Shard,
    user::{Shared, User, user_seed},
};

/// A workload that cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkloadError {
    /// Both or neither model.
    #[error("workload: set exactly one of users (closed model) or arrivalRate (open model)")]
    Model,
    /// The rate does not parse.
    #[error(
        "workload.arrivalRate {input:?}: expected sessions per unit such as 500/s, 30/m or 1000/h"
    )]
    Rate {
        /// What was given.
        input: String,
    },
}

/// The model this process runs, already cut to its shard.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// A fixed population.
    Closed {
        /// This shard's user ids.
        ids: Range<u64>,
        /// Linear ramp of the population.
        ramp_up: Duration,
    },
    /// Poisson arrivals.
    Open {
        /// This shard's sessions per second at full rate.
        per_second: f64,
        /// This shard's cap on concurrent sessions.
        max_users: u64,
        /// Linear ramp of the rate.
        ramp_up: Duration,
    },
}

impl Plan {
    /// This shard's share of a workload.
    pub fn for_shard(workload: &Workload, shard: Shard) -> Result<Self, WorkloadError> {
        let ramp_up = workload.ramp_up.get();
        match (workload.users, &workload.arrival_rate) {
            (Some(users), None) => Ok(Self::Closed {
                ids: shard.user_ids(users),
                ramp_up,
            }),
            (None, Some(rate)) => Ok(Self::Open {
                per_second: shard.share(parse_rate(rate)?),
                max_users: workload
                    .max_users
                    .map(|cap| shard.share_of_count(cap).max(1))
                    .unwrap_or(u64::MAX),
                ramp_up,
            }),
            _ => Err(WorkloadError::Model),
        }
    }

    /// The users (closed) or the cap (open), for the progress bar.
    pub fn target_users(&self) -> u64 {
        match self {
            Self::Closed { ids, .. } => ids.end - ids.start,
            Self::Open { max_users, .. } => *max_users,
        }
    }
}

/// `500/s`, `30/m`, `1000/h`, `2.5/s` → sessions per second.
pub fn parse_rate(input: &str) -> Result<f64, WorkloadError> {
    let error = || WorkloadError::Rate {
        input: input.to_owned(),
    };
    let (count, unit) = input.trim().split_once('/').ok_or_else(error)?;
    let count: f64 = count.trim().parse().map_err(|_| error())?;
    let per = match unit.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(error()),
    };
    if !count.is_finite() || count <= 0.0 {
        return Err(error());
    }
    Ok(count / per)
}

/// When user `k` of `m` starts during a linear ramp.
pub fn ramp_offset(k: u64, m: u64, ramp_up: Duration) -> Duration {
    if m == 0 {
        return Duration::ZERO;
    }
    let nanos = ramp_up.as_nanos() * u128::from(k) / u128::from(m);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The next open-model arrival after `elapsed`: candidates come at the full rate and
/// are kept with probability `rate(t) / full rate` (Lewis–Shedler thinning), which
/// gives a Poisson process whose rate ramps linearly over `ramp_up`.
pub fn next_arrival<R: Rng + ?Sized>(
    rng: &mut R,
    elapsed: Duration,
    per_second: f64,
    ramp_up: Duration,
) -> Duration {
    let mut t = elapsed.as_secs_f64();
    let ramp = ramp_up.as_secs_f64();
    loop {
        let u = 1.0 - rng.random::<f64>();
        t += -u.ln() / per_second;
        let share = if ramp > 0.0 { (t / ramp).min(1.0) } else { 1.0 };
        if rng.random::<f64>() < share {
            return Duration::try_from_secs_f64(t).unwrap_or(Duration::MAX);
        }
    }
}

/// How often a held ramp looks whether it may go on.
const HOLD_POLL: Duration = Duration::from_millis(100);

/// Runs the plan until the deadline (or an abort); returns when every user has
/// stopped.
pub async fn run(shared: Arc<Shared>, plan: Plan, shard: Shard, start: Instant) {
    let tracker = TaskTracker::new();
    match plan {
        Plan::Closed { ids, ramp_up } => {
            let m = ids.end - ids.start;
            // Time spent holding shifts the rest of the ramp: it resumes where it
            // stopped instead of starting every user it missed at once.
            let mut held = Duration::ZERO;
            for (k, id) in ids.enumerate() {
                let mut at = start + held + ramp_offset(k as u64, m, ramp_up);
                if at >= shared.deadline || !shared.gate.sleep_until(at).await {
                    break;
                }
                let hold_started = Instant::now();
                while shared.recorder.live.active_users.load(Relaxed) >= shared.gate.ceiling() {
                    if shared.gate.is_aborted() || Instant::now() >= shared.deadline {
                        break;
                    }
                    tokio::time::sleep(HOLD_POLL).await;
                }
                if hold_started.elapsed() >= HOLD_POLL {
                    held += hold_started.elapsed();
                    at = Instant::now();
                }
                if at >= shared.deadline || shared.gate.is_aborted() {
                    break;
                }
                let shared = shared.clone();
                tracker.spawn(async move {
                    shared.recorder.live.active_users.fetch_add(1, Relaxed);
                    let mut user = User::new(id, shared.seed);
                    user.run_closed(&shared, at).await;
                    shared.recorder.live.active_users.fetch_sub(1, Relaxed);
                });
            }
        }
        Plan::Open {
            per_second,
            max_users,
            ramp_up,
        } => {
            // One arrival stream per shard, seeded apart from every user's stream.
            let mut rng = SmallRng::seed_from_u64(user_seed(
                shared.seed ^ 0xA5A5_A5A5_A5A5_A5A5,
                u64::from(shard.index),
            ));
            let mut elapsed = Duration::ZERO;
            let mut seq = 0u64;
            // A zero rate (a shard of a tiny rate) sends nothing rather than spinning.
            let mut running = per_second > 0.0;
            while running {
                elapsed = next_arrival(&mut rng, elapsed, per_second, ramp_up);
                let at = start + elapsed;
                if at >= shared.deadline || !shared.gate.sleep_until(at).await {
                    running = false;
                    continue;
                }
                let id = shard.arrival_id(seq);
                seq += 1;
                // While the guard holds, its ceiling caps sessions like maxUsers does.
                let cap = max_users.min(shared.gate.ceiling());
                if shared.recorder.live.active_users.load(Relaxed) >= cap {
                    shared.recorder.dropped(id);
                    continue;
                }
                shared.recorder.live.active_users.fetch_add(1, Relaxed);
                let shared = shared.clone();
                tracker.spawn(async move {
                    let mut user = User::new(id, shared.seed);
                    user.session(&shared, at).await;
                    shared.recorder.live.active_users.fetch_sub(1, Relaxed);
                });
            }
        }
    }
    tracker.close();
    // After an abort nobody sends again (the gate stops each user before its next
    // request), so the run ends now rather than when the last think time is over.
    tokio::select! {
        () = tracker.wait() => {}
        () = shared.gate.aborted() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_per_second_minute_and_hour() {
        assert_eq!(parse_rate("500/s"), Ok(500.0));
        assert_eq!(parse_rate("30/m"), Ok(0.5));
        assert_eq!(parse_rate("3600/h"), Ok(1.0));
        assert!(parse_rate("500").is_err());
        assert!(parse_rate("500/d").is_err());
        assert!(parse_rate("0/s").is_err());
    }

    #[test]
    fn ramp_spreads_users_evenly_and_starts_the_first_at_once() {
        let ramp = Duration::from_secs(10);
        assert_eq!(ramp_offset(0, 4, ramp), Duration::ZERO);
        assert_eq!(ramp_offset(2, 4, ramp), Duration::from_secs(5));
        assert_eq!(ramp_offset(3, 4, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn arrivals_average_the_rate_after_the_ramp() {
        let mut rng = SmallRng::seed_from_u64(11);
        let mut t = Duration::ZERO;
        let mut n = 0;
        while t < Duration::from_secs(100) {
            t = next_arrival(&mut rng, t, 50.0, Duration::ZERO);
            n += 1;
        }
        assert!((4700..5300).contains(&n), "{n} arrivals in 100 s at 50/s");
    }

    #[test]
    fn arrivals_during_a_linear_ramp_are_half_the_full_rate() {
        let mut rng = SmallRng::seed_from_u64(12);
        let mut t = Duration::ZERO;
        let mut n = 0;
        loop {
            t = next_arrival(&mut rng, t, 100.0, Duration::from_secs(100));
            if t >= Duration::from_secs(100) {
                break;
            }
            n += 1;
        }
        // ∫₀¹⁰⁰ 100·t/100 dt = 5000.
        assert!((4700..5300).contains(&n), "{n} arrivals during the ramp");
    }

    #[test]
    fn shards_split_the_closed_population_and_the_open_rate() {
        let closed: Workload =
            serde_json::from_value(serde_json::json!({"users": 10, "duration": "1m"}))
                .expect("workload");
        let plan = Plan::for_shard(&closed, Shard::new(1, 3).expect("shard")).expect("plan");
        assert_eq!(
            plan,
            Plan::Closed {
                ids: 3..6,
                ramp_up: Duration::ZERO
            }
        );
        let open: Workload = serde_json::from_value(
            serde_json::json!({"arrivalRate": "300/s", "maxUsers": 90, "duration": "1m"}),
        )
        .expect("workload");
        let plan = Plan::for_shard(&open, Shard::new(0, 3).expect("shard")).expect("plan");
        assert_eq!(
            plan,
            Plan::Open {
                per_second: 100.0,
                max_users: 30,
                ramp_up: Duration::ZERO
            }
        );
    }
}
