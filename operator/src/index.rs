//! The in-memory index the config server answers from: policy → selector and resolved
//! route. The controllers write it; sidecar subscriptions read it and never reach the
//! API server on their request path (Linkerd's policy-controller does the same).

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    hash::{Hash, Hasher},
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use kube::core::{Selector, SelectorExt};
use tokio::sync::watch;
use trimtab_api::sidecar_config::{Route, SidecarConfig};

/// `namespace/name` of a policy.
pub type PolicyKey = (String, String);

/// How many recent changes [`PolicyIndex::touches`] can look back on; a long poll that
/// fell further behind recomputes its config.
const CHANGE_LOG: usize = 4096;

/// One change, as far as the pods it can affect: those of `namespace` matched by the
/// policy's client selector before or after it.
#[derive(Clone, Debug)]
struct Change {
    version: u64,
    namespace: String,
    selectors: Vec<Selector>,
}

/// One indexed policy.
#[derive(Clone, Debug)]
struct Entry {
    selector: Selector,
    route: Route,
    /// Hash of `route`, so a pod's ETag is computed without serializing routes.
    hash: u64,
    /// The index version at which this route last changed: the policy's configVersion.
    changed: u64,
}

/// What one pod is served: its config, and an ETag that changes exactly when the
/// config's routes do.
#[derive(Clone, Debug, PartialEq)]
pub struct PodConfig {
    /// The routes of every matching policy, with the index version.
    pub config: SidecarConfig,
    /// A quoted HTTP entity tag over the matched routes.
    pub etag: String,
    /// The matched policies with the hash of the route each contributed.
    pub policies: Vec<(PolicyKey, u64)>,
}

#[derive(Debug, Default)]
struct State {
    /// Milliseconds since the Unix epoch of the last change, bumped by at least one: a
    /// restarted or standby operator stamps later versions than the one it replaces,
    /// so a sidecar never sees its version go back.
    version: u64,
    /// The first full list of policies is in.
    synced: bool,
    policies: BTreeMap<PolicyKey, Entry>,
    /// UIDs of deleted policies, so that a reconcile still in flight when its policy
    /// was deleted cannot publish it again. Cleared after each re-list.
    deleted: HashSet<String>,
    /// The most recent changes, oldest first.
    log: VecDeque<Change>,
    /// Every change after this version is in `log`.
    log_floor: u64,
}

/// Policies by key, with a version that increases on every change and a channel that
/// announces it.
#[derive(Debug, Clone)]
pub struct PolicyIndex {
    state: Arc<RwLock<State>>,
    changes: Arc<watch::Sender<u64>>,
}

impl Default for PolicyIndex {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            changes: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl PolicyIndex {
    /// Stores `route` for the policy `key` (whose object has `uid`), applying to pods
    /// matched by `selector`. Returns the version at which this route last changed —
    /// unchanged input changes nothing and wakes nobody — or `None` when that policy was
    /// deleted meanwhile.
    pub fn upsert(
        &self,
        key: PolicyKey,
        uid: &str,
        selector: Selector,
        route: Route,
    ) -> Option<u64> {
        let version = {
            let mut state = self.write();
            if state.deleted.contains(uid) {
                return None;
            }
            let unchanged = state
                .policies
                .get(&key)
                .is_some_and(|e| e.route == route && e.selector == selector);
            if unchanged {
                // Nothing to announce: waking every long poll for an unchanged route
                // costs each of them a full match over the index.
                return state.policies.get(&key).map(|e| e.changed);
            }
            let changed = state.bump();
            let hash = hash_of(&route);
            let mut selectors = vec![selector.clone()];
            selectors.extend(state.policies.get(&key).map(|e| e.selector.clone()));
            state.record(&key.0, selectors);
            state.policies.insert(
                key,
                Entry {
                    selector,
                    route,
                    hash,
                    changed,
                },
            );
            changed
        };
        self.changes.send_replace(version);
        Some(version)
    }

    /// Withdraws the route of `key`, e.g. when it no longer resolves.
    pub fn remove(&self, key: &PolicyKey) {
        let version = {
            let mut state = self.write();
            let Some(removed) = state.policies.remove(key) else {
                return;
            };
            state.bump();
            state.record(&key.0, vec![removed.selector]);
            state.version
        };
        self.changes.send_replace(version);
    }

    /// Forgets a deleted policy for good: a late upsert of the same object is ignored.
    pub fn delete(&self, key: &PolicyKey, uid: &str) {
        self.write().deleted.insert(uid.to_owned());
        self.remove(key);
    }

    /// Keeps only the policies for which `keep` is true (after a re-list, the ones that
    /// still exist).
    pub fn retain(&self, mut keep: impl FnMut(&PolicyKey) -> bool) {
        let version = {
            let mut state = self.write();
            state.deleted.clear();
            state.synced = true;
            let gone: Vec<PolicyKey> = state
                .policies
                .keys()
                .filter(|k| !keep(k))
                .cloned()
                .collect();
            if gone.is_empty() {
                return;
            }
            state.bump();
            for key in gone {
                if let Some(removed) = state.policies.remove(&key) {
                    state.record(&key.0, vec![removed.selector]);
                }
            }
            state.version
        };
        self.changes.send_replace(version);
    }

    /// The config for a pod in `namespace` with `labels`: every route of that
    /// namespace's policies whose client selector matches, ordered by policy name. No
    /// other namespace's policy (nor its secrets) can reach the pod.
    pub fn config_for(&self, namespace: &str, labels: &BTreeMap<String, String>) -> PodConfig {
        let state = self.read();
        let matched: Vec<_> = state
            .policies
            .iter()
            .filter(|((ns, _), e)| ns == namespace && e.selector.matches(labels))
            .collect();
        let mut etag = std::collections::hash_map::DefaultHasher::new();
        for (key, entry) in &matched {
            key.hash(&mut etag);
            entry.hash.hash(&mut etag);
        }
        PodConfig {
            etag: format!("\"{:016x}\"", etag.finish()),
            policies: matched
                .iter()
                .map(|(key, e)| ((*key).clone(), e.hash))
                .collect(),
            config: SidecarConfig {
                version: state.version,
                routes: matched.into_iter().map(|(_, e)| e.route.clone()).collect(),
            },
        }
    }

    /// Whether a change after version `since` may alter the config of a pod in
    /// `namespace` with `labels` (always "maybe" once those changes left the log), and
    /// the current version. Every change wakes every long poll; this lets a woken poll
    /// skip the full match when the change was for other pods.
    pub fn touches(
        &self,
        since: u64,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> (bool, u64) {
        let state = self.read();
        if since < state.log_floor {
            return (true, state.version);
        }
        let touched = state
            .log
            .iter()
            .rev()
            .take_while(|c| c.version > since)
            .any(|c| c.namespace == namespace && c.selectors.iter().any(|s| s.matches(labels)));
        (touched, state.version)
    }

    /// The hash of the route `key` currently publishes, if any.
    pub fn route_hash(&self, key: &PolicyKey) -> Option<u64> {
        self.read().policies.get(key).map(|e| e.hash)
    }

    /// Whether the first full list of policies has been indexed: before it, a pod's
    /// config could be missing policies that exist.
    pub fn is_synced(&self) -> bool {
        self.read().synced
    }

    /// The current version.
    pub fn version(&self) -> u64 {
        self.read().version
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A writer that panicked left consistent data behind: every write is one insert.
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Logs a change at the current version.
    fn record(&mut self, namespace: &str, selectors: Vec<Selector>) {
        self.log.push_back(Change {
            version: self.version,
            namespace: namespace.to_owned(),
            selectors,
        });
        while self.log.len() > CHANGE_LOG {
            if let Some(oldest) = self.log.pop_front() {
                self.log_floor = oldest.version;
            }
        }
    }

    fn bump(&mut self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.version = now.max(self.version + 1);
        self.version
    }
}

/// A stable hash of a route (same binary, same hash: replicas agree on ETags).
fn hash_of(route: &Route) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    // A Route always serializes; an empty buffer would only make every ETag equal.
    serde_json::to_vec(route)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trimtab_api::{BalancerPolicy, sidecar_config::Endpoint};

    fn route(name: &str, port: u16, address: &str) -> Route {
        let policy: BalancerPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "trimtab.dev/v1alpha1",
            "kind": "BalancerPolicy",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {
                "clients": {"podSelector": {"matchLabels": {"app": "web"}}},
                "listener": {"port": port},
                "endpoints": [address],
            },
        }))
        .expect("policy");
        Route::resolved(&policy, "ns", vec![Endpoint::new(address)])
    }

    fn selector(app: &str) -> Selector {
        Selector::from_iter([("app".to_owned(), app.to_owned())])
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_owned(), app.to_owned())])
    }

    #[test]
    fn touches_only_pods_a_change_can_reach_and_says_maybe_past_the_log() {
        let index = PolicyIndex::default();
        let key = |n: &str| ("ns".to_owned(), n.to_owned());
        let seen = index.config_for("ns", &labels("web")).config.version;

        // Another namespace, another selector: a woken web poll need not recompute.
        index.upsert(
            ("other".into(), "a".into()),
            "u0",
            selector("web"),
            route("a", 1, "10.0.0.1:80"),
        );
        index.upsert(key("b"), "u1", selector("db"), route("b", 2, "10.0.0.2:80"));
        let (touched, now) = index.touches(seen, "ns", &labels("web"));
        assert!(!touched);
        assert!(index.touches(seen, "ns", &labels("db")).0);

        // Moving b's selector away from web pods touches them (the old selector counts).
        index.upsert(
            key("c"),
            "u2",
            selector("web"),
            route("c", 3, "10.0.0.3:80"),
        );
        let (touched, after_c) = index.touches(now, "ns", &labels("web"));
        assert!(touched);
        index.upsert(key("c"), "u2", selector("db"), route("c", 3, "10.0.0.3:80"));
        assert!(index.touches(after_c, "ns", &labels("web")).0);
        index.remove(&key("b"));
        assert!(index.touches(index.version() - 1, "ns", &labels("db")).0);

        // A poll that fell behind the log cannot know: it recomputes.
        let behind = index.version();
        for i in 0..=CHANGE_LOG {
            let port = u16::try_from(i % 60_000).unwrap_or_default();
            index.upsert(
                key("churn"),
                "u3",
                selector("db"),
                route("churn", port, "10.0.0.4:80"),
            );
        }
        assert!(index.touches(behind, "ns", &labels("web")).0);
        assert!(!index.touches(index.version(), "ns", &labels("web")).0);
    }

    #[test]
    fn a_pod_gets_only_its_namespaces_matching_routes_and_the_etag_follows_them() {
        let index = PolicyIndex::default();
        let key = |n: &str| ("ns".to_owned(), n.to_owned());
        index.upsert(
            key("a"),
            "1",
            selector("web"),
            route("a", 15001, "10.0.0.1:80"),
        );
        index.upsert(
            key("b"),
            "2",
            selector("other"),
            route("b", 15002, "10.0.0.2:80"),
        );
        index.upsert(
            ("elsewhere".into(), "c".into()),
            "3",
            selector("web"),
            route("c", 15003, "10.0.0.3:80"),
        );
        let first = index.config_for("ns", &labels("web"));
        assert_eq!(first.config.routes.len(), 1);
        assert_eq!(first.config.routes[0].name, "a");

        // A change to a policy the pod does not match leaves its ETag alone.
        index.upsert(
            key("b"),
            "2",
            selector("other"),
            route("b", 15002, "10.0.0.9:80"),
        );
        assert_eq!(index.config_for("ns", &labels("web")).etag, first.etag);

        // A change to its own policy changes it, and the version only grows.
        index.upsert(
            key("a"),
            "1",
            selector("web"),
            route("a", 15001, "10.0.0.7:80"),
        );
        let second = index.config_for("ns", &labels("web"));
        assert_ne!(second.etag, first.etag);
        assert!(second.config.version > first.config.version);

        // Putting the old route back gives back the old ETag: the ETag names content.
        index.upsert(
            key("a"),
            "1",
            selector("web"),
            route("a", 15001, "10.0.0.1:80"),
        );
        assert_eq!(index.config_for("ns", &labels("web")).etag, first.etag);
    }

    #[test]
    fn versions_are_wall_clock_so_a_new_index_starts_above_an_old_one() {
        let old = PolicyIndex::default();
        for i in 0..100 {
            old.upsert(
                ("ns".into(), "a".into()),
                "1",
                selector("web"),
                route("a", 15001, &format!("10.0.0.{i}:80")),
            );
        }
        let new = PolicyIndex::default();
        new.upsert(
            ("ns".into(), "a".into()),
            "1",
            selector("web"),
            route("a", 15001, "10.0.0.1:80"),
        );
        // 100 changes within a millisecond each push the old one ahead by at most 100.
        assert!(new.version() + 100 >= old.version());
        assert!(new.version() > 1_700_000_000_000);
    }
}
