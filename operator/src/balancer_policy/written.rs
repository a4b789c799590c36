//! The statuses this replica wrote, for the stretch when its policy store has not seen
//! them yet.
//!
//! A reconcile compares the status it computes with the policy's status in the store
//! and writes only when they differ. The store is fed by a watch, and when the API
//! server is busy the watch can trail the writes by seconds. Comparing with the store
//! alone then rewrites the same status every interval, each rewrite makes the server
//! busier and the watch later still: at 1,000 policies on a 1 s interval this spiralled
//! into 60 writes/s of which four in five changed nothing. So the status written last
//! is remembered and taken as the truth for [`TRUSTED_FOR`]; after that (or once the
//! store has caught up) the store is the truth again, so a status someone else changed
//! is corrected within that time.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use trimtab_api::balancer_policy::BalancerPolicyStatus;

use crate::index::PolicyKey;

/// How long a written status is taken to be on its way to the store.
pub const TRUSTED_FOR: Duration = Duration::from_secs(30);

/// Statuses written by this replica, per policy, with when.
#[derive(Debug, Default)]
pub struct WrittenStatuses {
    written: Mutex<HashMap<PolicyKey, (BalancerPolicyStatus, Instant)>>,
}

impl WrittenStatuses {
    /// The status to build on and compare with: the one written last if it is recent,
    /// otherwise `stored`, the store's copy (none yet: the default).
    pub fn known(
        &self,
        policy: &PolicyKey,
        stored: Option<&BalancerPolicyStatus>,
        now: Instant,
    ) -> BalancerPolicyStatus {
        match self.lock().get(policy) {
            Some((status, at)) if now.saturating_duration_since(*at) < TRUSTED_FOR => {
                status.clone()
            }
            _ => stored.cloned().unwrap_or_default(),
        }
    }

    /// Remembers `status` as written for `policy` at `now`, and forgets statuses too
    /// old to be trusted (deleted policies among them).
    pub fn remember(&self, policy: PolicyKey, status: BalancerPolicyStatus, now: Instant) {
        let mut written = self.lock();
        written.retain(|_, (_, at)| now.saturating_duration_since(*at) < TRUSTED_FOR);
        written.insert(policy, (status, now));
    }

    /// Forgets what was written for `policy`: after a failed write, nothing is known
    /// to be on its way.
    pub fn forget(&self, policy: &PolicyKey) {
        self.lock().remove(policy);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PolicyKey, (BalancerPolicyStatus, Instant)>> {
        // Each use is one lookup, insert or retain: a panicked holder left it consistent.
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(version: u64) -> BalancerPolicyStatus {
        BalancerPolicyStatus {
            config_version: Some(version),
            ..BalancerPolicyStatus::default()
        }
    }

    #[test]
    fn a_recent_write_is_trusted_over_a_lagging_store_and_then_not() {
        let written = WrittenStatuses::default();
        let key: PolicyKey = ("shop".into(), "web".into());
        let t0 = Instant::now();
        assert_eq!(written.known(&key, Some(&status(1)), t0), status(1));
        written.remember(key.clone(), status(2), t0);
        assert_eq!(
            written.known(&key, Some(&status(1)), t0 + Duration::from_secs(5)),
            status(2)
        );
        // Past TRUSTED_FOR, the store's copy wins: someone else's write is corrected.
        assert_eq!(
            written.known(&key, Some(&status(1)), t0 + TRUSTED_FOR),
            status(1)
        );
        written.remember(key.clone(), status(3), t0);
        written.forget(&key);
        assert_eq!(written.known(&key, Some(&status(1)), t0), status(1));
    }

    #[test]
    fn old_entries_are_dropped_when_new_ones_come() {
        let written = WrittenStatuses::default();
        let t0 = Instant::now();
        written.remember(("shop".into(), "gone".into()), status(1), t0);
        written.remember(("shop".into(), "web".into()), status(1), t0 + TRUSTED_FOR);
        assert_eq!(written.lock().len(), 1);
    }
}
