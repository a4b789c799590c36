//! The sidecars this replica serves: which pod, when it last asked, and which route of
//! each policy it holds — what `status.sidecars` counts.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use trimtab_api::balancer_policy::SidecarCounts;

use crate::index::PolicyKey;

/// A sidecar with no request in flight is still connected this long after its last
/// one ended (it is between two long-polls, or backing off briefly).
pub const CONNECTED_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Subscriber {
    in_flight: u32,
    last_seen: Instant,
    /// Route hash per policy, as last sent (or confirmed by a matching ETag).
    holds: HashMap<PolicyKey, u64>,
}

/// Subscribers by pod UID, and a channel that names policies whose counts may have
/// changed, so the controller rewrites their status.
#[derive(Debug, Clone)]
pub struct Subscribers {
    pods: Arc<Mutex<HashMap<String, Subscriber>>>,
    changed: mpsc::Sender<PolicyKey>,
}

/// Marks a request in flight; dropping it marks the end.
#[derive(Debug)]
pub struct InFlight {
    subscribers: Subscribers,
    uid: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(s) = self.subscribers.lock().get_mut(&self.uid) {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.last_seen = Instant::now();
        }
    }
}

impl Subscribers {
    /// Subscribers and the receiving end of their change hints (bounded: a hint that
    /// does not fit is dropped, the next resync catches up).
    pub fn new() -> (Self, mpsc::Receiver<PolicyKey>) {
        let (changed, hints) = mpsc::channel(1024);
        (
            Self {
                pods: Arc::default(),
                changed,
            },
            hints,
        )
    }

    /// A request from pod `uid` began.
    pub fn begin(&self, uid: &str) -> InFlight {
        let mut pods = self.lock();
        let s = pods.entry(uid.to_owned()).or_insert_with(|| Subscriber {
            in_flight: 0,
            last_seen: Instant::now(),
            holds: HashMap::new(),
        });
        s.in_flight += 1;
        s.last_seen = Instant::now();
        InFlight {
            subscribers: self.clone(),
            uid: uid.to_owned(),
        }
    }

    /// Pod `uid` now holds exactly these routes.
    pub fn holds(&self, uid: &str, policies: &[(PolicyKey, u64)]) {
        let mut changed = Vec::new();
        if let Some(s) = self.lock().get_mut(uid) {
            let now: HashMap<PolicyKey, u64> = policies.iter().cloned().collect();
            changed.extend(
                now.iter()
                    .filter(|(k, h)| s.holds.get(*k) != Some(*h))
                    .map(|(k, _)| k.clone()),
            );
            changed.extend(s.holds.keys().filter(|k| !now.contains_key(*k)).cloned());
            s.holds = now;
        }
        for key in changed {
            let _ = self.changed.try_send(key);
        }
    }

    /// Per policy: the connected sidecars holding it, and how many of them hold the
    /// route whose hash `current` gives. Forgets sidecars gone for long.
    ///
    /// Counted from what each sidecar was sent, not by matching selectors: one pass over
    /// the sidecars, however many policies there are.
    pub fn tally(
        &self,
        current: impl Fn(&PolicyKey) -> Option<u64>,
    ) -> BTreeMap<PolicyKey, SidecarCounts> {
        let now = Instant::now();
        let mut pods = self.lock();
        pods.retain(|_, s| {
            s.in_flight > 0 || now.duration_since(s.last_seen) < 6 * CONNECTED_GRACE
        });
        let mut counts: BTreeMap<PolicyKey, SidecarCounts> = BTreeMap::new();
        let connected = pods
            .values()
            .filter(|s| s.in_flight > 0 || now.duration_since(s.last_seen) < CONNECTED_GRACE);
        for s in connected {
            for (key, held) in &s.holds {
                let c = counts.entry(key.clone()).or_default();
                c.connected += 1;
                if current(key) == Some(*held) {
                    c.up_to_date += 1;
                }
            }
        }
        counts
    }

    /// Sidecars with a request in flight or seen within the grace period.
    pub fn connected(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|s| s.in_flight > 0 || now.duration_since(s.last_seen) < CONNECTED_GRACE)
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subscriber>> {
        // Every write leaves a consistent map: a panicked holder changed nothing half-way.
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tally_follows_what_each_connected_sidecar_holds() {
        let (subs, mut hints) = Subscribers::new();
        let api: PolicyKey = ("shop".into(), "api".into());
        let other: PolicyKey = ("elsewhere".into(), "api".into());

        let a = subs.begin("a");
        let _b = subs.begin("b");
        let _c = subs.begin("c");
        subs.holds("a", &[(api.clone(), 7)]);
        assert_eq!(hints.try_recv().ok(), Some(api.clone()));
        subs.holds("b", &[(api.clone(), 6)]);
        subs.holds("c", &[(other.clone(), 1)]);
        let tally = subs.tally(|k| (k == &api).then_some(7).or(Some(1)));
        assert_eq!((tally[&api].connected, tally[&api].up_to_date), (2, 1));
        assert_eq!((tally[&other].connected, tally[&other].up_to_date), (1, 1));

        // A new route: nobody holds it yet.
        assert_eq!(subs.tally(|_| Some(8))[&api].up_to_date, 0);
        // The sidecar between two polls still counts.
        drop(a);
        assert_eq!(subs.tally(|_| Some(7))[&api].connected, 2);
        assert_eq!(subs.connected(), 3);
    }
}
