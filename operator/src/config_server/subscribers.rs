//! The sidecars this replica serves: which pod, when it last asked, and which route of
//! each policy it holds — what `status.sidecars` counts.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kube::core::{Selector, SelectorExt};
use tokio::sync::mpsc;
use trimtab_api::balancer_policy::SidecarCounts;

use crate::index::PolicyKey;

/// A sidecar with no request in flight is still connected this long after its last
/// one ended (it is between two long-polls, or backing off briefly).
pub const CONNECTED_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Subscriber {
    namespace: String,
    labels: BTreeMap<String, String>,
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
    pub fn begin(&self, uid: &str, namespace: &str, labels: &BTreeMap<String, String>) -> InFlight {
        let mut pods = self.lock();
        let s = pods.entry(uid.to_owned()).or_insert_with(|| Subscriber {
            namespace: namespace.to_owned(),
            labels: BTreeMap::new(),
            in_flight: 0,
            last_seen: Instant::now(),
            holds: HashMap::new(),
        });
        s.in_flight += 1;
        s.last_seen = Instant::now();
        s.labels.clone_from(labels);
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

    /// Sidecars of `key`'s namespace matching `selector` that are connected, and how
    /// many of them hold the route with `current` hash. Forgets sidecars gone for long.
    pub fn counts(
        &self,
        key: &PolicyKey,
        selector: &Selector,
        current: Option<u64>,
    ) -> SidecarCounts {
        let now = Instant::now();
        let mut pods = self.lock();
        pods.retain(|_, s| {
            s.in_flight > 0 || now.duration_since(s.last_seen) < 6 * CONNECTED_GRACE
        });
        let mut counts = SidecarCounts::default();
        for s in pods.values().filter(|s| {
            s.namespace == key.0
                && (s.in_flight > 0 || now.duration_since(s.last_seen) < CONNECTED_GRACE)
                && selector.matches(&s.labels)
        }) {
            counts.connected += 1;
            if current.is_some() && s.holds.get(key).copied() == current {
                counts.up_to_date += 1;
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
    async fn counts_follow_what_each_matching_sidecar_holds() {
        let (subs, mut hints) = Subscribers::new();
        let web = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let key: PolicyKey = ("shop".into(), "api".into());
        let selector = Selector::from_iter([("app".to_owned(), "web".to_owned())]);

        let a = subs.begin("a", "shop", &web);
        let _b = subs.begin("b", "shop", &web);
        let _c = subs.begin("c", "elsewhere", &web);
        subs.holds("a", &[(key.clone(), 7)]);
        assert_eq!(hints.try_recv().ok(), Some(key.clone()));
        let counts = subs.counts(&key, &selector, Some(7));
        assert_eq!((counts.connected, counts.up_to_date), (2, 1));

        // A new route: nobody holds it yet.
        assert_eq!(subs.counts(&key, &selector, Some(8)).up_to_date, 0);
        // The sidecar between two polls still counts.
        drop(a);
        assert_eq!(subs.counts(&key, &selector, Some(7)).connected, 2);
        assert_eq!(subs.connected(), 3);
    }
}
