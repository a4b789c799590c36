//! Passive outlier detection, as Envoy's: an endpoint that fails `consecutiveErrors`
//! requests in a row (5xx responses or transport failures) is ejected for
//! `baseEjectionTime × ejections`, never more than `maxEjectionPercent` of a route's
//! endpoints at once. The decisions are pure functions; [`OutlierState`] holds the
//! per-endpoint atomics the request path updates.

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

use trimtab_api::balancer_policy::OutlierDetection;

/// What one finished request says about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Any response below 500.
    Success,
    /// A 5xx response, or no response at all (connect failure, reset, timeout).
    Failure,
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Leave the endpoint in rotation.
    Keep,
    /// Eject it for this long.
    Eject(Duration),
}

/// Whether `consecutive_failures` ejects the endpoint, given how many of the route's
/// `total` endpoints are ejected already and how often this one was (`ejections`,
/// including this one).
pub fn decide(
    consecutive_failures: u32,
    ejections: u32,
    ejected_now: usize,
    total: usize,
    cfg: &OutlierDetection,
) -> Decision {
    if cfg.consecutive_errors == 0 || consecutive_failures < cfg.consecutive_errors {
        return Decision::Keep;
    }
    // Envoy's max_ejection_percent: the ejection must not take the share over the cap.
    if (ejected_now + 1) * 100 > total * cfg.max_ejection_percent as usize {
        return Decision::Keep;
    }
    Decision::Eject(
        cfg.base_ejection_time
            .get()
            .saturating_mul(ejections.max(1)),
    )
}

/// The ejection count for a new ejection: one more than before, less one for every
/// `base` of good behaviour since the previous ejection ended (so an endpoint that
/// recovered for good starts over at `base` again, as Envoy decrements its multiplier).
pub fn next_ejection_count(
    previous: u32,
    since_last_ejection_ended: Duration,
    base: Duration,
) -> u32 {
    let forgiven = if base.is_zero() {
        u32::MAX
    } else {
        u32::try_from(since_last_ejection_ended.as_nanos() / base.as_nanos()).unwrap_or(u32::MAX)
    };
    previous.saturating_sub(forgiven) + 1
}

/// Whether fewer than `panic_threshold_percent` of the endpoints are usable, in which
/// case the route balances over all of them (Envoy's healthy panic threshold): better
/// some requests to a struggling endpoint than every request to the few left.
pub fn in_panic(usable: usize, total: usize, panic_threshold_percent: u32) -> bool {
    total > 0 && usable * 100 < total * panic_threshold_percent as usize
}

/// Per-endpoint outlier state; all atomics, times in milliseconds since process start.
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
}

impl OutlierState {
    /// Whether the endpoint is ejected at `now_ms`.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// How often the endpoint has been ejected (with forgiveness applied at ejection).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Records one outcome; returns the ejection time when this failure ejects the
    /// endpoint. `ejected_now` and `total` describe the route at this moment.
    pub fn record(
        &self,
        outcome: Outcome,
        now_ms: u64,
        ejected_now: usize,
        total: usize,
        cfg: &OutlierDetection,
    ) -> Option<Duration> {
        if outcome == Outcome::Success {
            // Read before writing: most responses succeed, and a store on every one
            // would bounce the cache line between cores for nothing.
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if self.is_ejected(now_ms) {
            return None;
        }
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let since_end = Duration::from_millis(now_ms.saturating_sub(until));
        let count = next_ejection_count(self.ejections(), since_end, cfg.base_ejection_time.get());
        match decide(failures, count, ejected_now, total, cfg) {
            Decision::Keep => None,
            Decision::Eject(for_how_long) => {
                let new_until =
                    now_ms + u64::try_from(for_how_long.as_millis()).unwrap_or(u64::MAX / 2);
                // Only one of several racing failures performs the ejection.
                if self
                    .ejected_until_ms
                    .compare_exchange(until, new_until, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
                {
                    return None;
                }
                self.ejections.store(count, Ordering::Relaxed);
                self.consecutive_failures.store(0, Ordering::Relaxed);
                Some(for_how_long)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use trimtab_api::Duration as ApiDuration;

    use super::*;

    fn cfg(consecutive_errors: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_errors,
            base_ejection_time: ApiDuration::from_secs(30),
            max_ejection_percent: 50,
            panic_threshold_percent: 50,
        }
    }

    #[test]
    fn ejects_endpoint_after_five_consecutive_failures() {
        let state = OutlierState::default();
        let c = cfg(5);
        for _ in 0..4 {
            assert_eq!(state.record(Outcome::Failure, 1000, 0, 4, &c), None);
        }
        assert_eq!(
            state.record(Outcome::Failure, 1000, 0, 4, &c),
            Some(Duration::from_secs(30))
        );
        assert!(state.is_ejected(1000 + 29_999));
        assert!(!state.is_ejected(1000 + 30_000));
    }

    #[test]
    fn a_success_resets_the_count() {
        let state = OutlierState::default();
        let c = cfg(3);
        state.record(Outcome::Failure, 0, 0, 4, &c);
        state.record(Outcome::Failure, 0, 0, 4, &c);
        state.record(Outcome::Success, 0, 0, 4, &c);
        assert_eq!(state.record(Outcome::Failure, 0, 0, 4, &c), None);
    }

    #[test]
    fn repeated_ejections_last_longer() {
        let state = OutlierState::default();
        let c = cfg(1);
        assert_eq!(
            state.record(Outcome::Failure, 0, 0, 4, &c),
            Some(Duration::from_secs(30))
        );
        // Fails again right after coming back: twice as long.
        assert_eq!(
            state.record(Outcome::Failure, 30_001, 0, 4, &c),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn good_behaviour_forgives_earlier_ejections() {
        assert_eq!(
            next_ejection_count(3, Duration::from_secs(0), Duration::from_secs(30)),
            4
        );
        assert_eq!(
            next_ejection_count(3, Duration::from_secs(65), Duration::from_secs(30)),
            2
        );
        assert_eq!(
            next_ejection_count(3, Duration::from_secs(3600), Duration::from_secs(30)),
            1
        );
    }

    #[test]
    fn never_ejects_more_than_max_ejection_percent() {
        let c = cfg(1);
        // Two of four ejected already: a third would be 75% > 50%.
        assert_eq!(decide(1, 1, 2, 4, &c), Decision::Keep);
        assert_eq!(
            decide(1, 1, 1, 4, &c),
            Decision::Eject(Duration::from_secs(30))
        );
    }

    #[test]
    fn zero_consecutive_errors_turns_detection_off() {
        assert_eq!(decide(1000, 1, 0, 4, &cfg(0)), Decision::Keep);
    }

    #[test]
    fn panics_below_the_threshold() {
        assert!(in_panic(1, 4, 50));
        assert!(!in_panic(2, 4, 50));
        assert!(!in_panic(0, 0, 50));
    }
}
