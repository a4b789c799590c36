//! The gate every request of a run passes: how many users may be sending (the guard's
//! ceiling while it holds the load) and whether anyone may (its abort switch).
//!
//! Holding works like pt-online-schema-change pausing its copy: users above the
//! ceiling park before their next request instead of sending it, and unpark when the
//! ceiling rises again. A parked user is not active, so the count of active users is
//! the load the target sees. While nothing holds the load the gate costs one atomic
//! load per request.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

/// No ceiling.
pub const UNLIMITED: u64 = u64::MAX;

/// The run's ceiling on active users and its stop switch.
#[derive(Debug)]
pub struct Gate {
    ceiling: AtomicU64,
    raised: Notify,
    stop: CancellationToken,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            ceiling: AtomicU64::new(UNLIMITED),
            raised: Notify::new(),
            stop: CancellationToken::new(),
        }
    }
}

/// What a user was told at the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go on; the user was never parked.
    Now,
    /// Go on; the user was parked and resumed at this instant (its next request is
    /// due now, not when it was due before parking, or the hold would show up as
    /// latency).
    Resumed(Instant),
    /// The run stopped (aborted, or the deadline passed while parked).
    Stopped,
}

impl Gate {
    /// The ceiling now ([`UNLIMITED`] when nothing holds the load).
    pub fn ceiling(&self) -> u64 {
        self.ceiling.load(Relaxed)
    }

    /// Holds the load at `users` active users (or lifts the hold with [`UNLIMITED`]).
    pub fn set_ceiling(&self, users: u64) {
        let before = self.ceiling.swap(users, Relaxed);
        if users > before {
            self.raised.notify_waiters();
        }
    }

    /// Stops every user before its next request.
    pub fn abort(&self) {
        self.stop.cancel();
    }

    /// Whether the run was aborted.
    pub fn is_aborted(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves when the run is aborted.
    pub async fn aborted(&self) {
        self.stop.cancelled().await;
    }

    /// Sleeps until `at`; false when the run was aborted meanwhile. The sleep itself
    /// is not cut short: a sleeping user sends nothing, and not registering a million
    /// sleepers with the stop switch keeps the hot path free of its lock.
    pub async fn sleep_until(&self, at: Instant) -> bool {
        // Without think time the next request is already due: registering a timer
        // would only cost a driver wake-up per request.
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        } else {
            // Still a yield point once the task's budget is spent, as the sleep was,
            // so a user whose requests fail instantly cannot starve the others.
            tokio::task::consume_budget().await;
        }
        !self.is_aborted()
    }

    /// Called by an active user (counted in `active`) before each request: parks it
    /// while more users are active than the ceiling allows, until `deadline`.
    pub async fn admit(&self, active: &AtomicU64, deadline: Instant) -> Admission {
        if self.is_aborted() {
            return Admission::Stopped;
        }
        if self.ceiling() == UNLIMITED {
            return Admission::Now;
        }
        // Leave only if the count is still above the ceiling when this user takes
        // itself out, so concurrent users do not all park at once.
        loop {
            let now = active.load(Relaxed);
            if now <= self.ceiling() {
                return Admission::Now;
            }
            if active
                .compare_exchange(now, now - 1, Relaxed, Relaxed)
                .is_ok()
            {
                break;
            }
        }
        loop {
            // Registered before the check, so a raise between the check and the
            // await still wakes this user.
            let raised = self.raised.notified();
            let now = active.load(Relaxed);
            if now < self.ceiling()
                && active
                    .compare_exchange(now, now + 1, Relaxed, Relaxed)
                    .is_ok()
            {
                return Admission::Resumed(Instant::now());
            }
            tokio::select! {
                () = raised => {}
                () = self.stop.cancelled() => break,
                () = tokio::time::sleep_until(deadline) => break,
                // Users that finish elsewhere free room without raising the ceiling.
                () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            }
        }
        // Counted as active again so the caller's bookkeeping stays balanced.
        active.fetch_add(1, Relaxed);
        Admission::Stopped
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    #[tokio::test]
    async fn users_above_the_ceiling_park_and_resume_when_it_rises() {
        let gate = Arc::new(Gate::default());
        let active = Arc::new(AtomicU64::new(10));
        let deadline = Instant::now() + Duration::from_secs(60);
        assert_eq!(gate.admit(&active, deadline).await, Admission::Now);

        gate.set_ceiling(7);
        let mut parked = Vec::new();
        for _ in 0..10 {
            let (gate, active) = (gate.clone(), active.clone());
            parked.push(tokio::spawn(
                async move { gate.admit(&active, deadline).await },
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(active.load(Relaxed), 7, "exactly three users parked");

        gate.set_ceiling(UNLIMITED);
        let mut resumed = 0;
        for p in parked {
            if matches!(p.await.expect("admit"), Admission::Resumed(_)) {
                resumed += 1;
            }
        }
        assert_eq!(resumed, 3);
        assert_eq!(active.load(Relaxed), 10);
    }

    #[tokio::test]
    async fn abort_releases_parked_users_and_stops_sleepers() {
        let gate = Arc::new(Gate::default());
        let active = Arc::new(AtomicU64::new(2));
        let deadline = Instant::now() + Duration::from_secs(60);
        gate.set_ceiling(1);
        let parked = {
            let (gate, active) = (gate.clone(), active.clone());
            tokio::spawn(async move { gate.admit(&active, deadline).await })
        };
        let sleeper = {
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.sleep_until(Instant::now() + Duration::from_secs(1))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        gate.abort();
        assert_eq!(parked.await.expect("admit"), Admission::Stopped);
        assert!(!sleeper.await.expect("sleep"));
        assert_eq!(active.load(Relaxed), 2, "counts stay balanced");
        assert_eq!(gate.admit(&active, deadline).await, Admission::Stopped);
    }
}
