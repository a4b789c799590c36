//! The in-memory index the config server answers from: policy → selector and resolved
//! route. The controllers write it; sidecar subscriptions read it and never reach the
//! API server on their request path (Linkerd's policy-controller does the same).

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, RwLock},
};

use kube::core::{Selector, SelectorExt};
use tokio::sync::watch;
use trimtab_api::sidecar_config::{Route, SidecarConfig};

/// `namespace/name` of a policy.
pub type PolicyKey = (String, String);

/// One indexed policy.
#[derive(Clone, Debug)]
struct Entry {
    selector: Selector,
    route: Route,
}

#[derive(Debug, Default)]
struct State {
    /// Bumped on every change, so a sidecar's config version only increases.
    version: u64,
    policies: BTreeMap<PolicyKey, Entry>,
    /// UIDs of deleted policies, so that a reconcile still in flight when its policy
    /// was deleted cannot publish it again. Cleared after each re-list.
    deleted: HashSet<String>,
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
    /// matched by `selector`. Returns the index version that holds it — unchanged input
    /// changes nothing — or `None` when that policy was deleted meanwhile.
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
            if !unchanged {
                state.version += 1;
                state.policies.insert(key, Entry { selector, route });
            }
            state.version
        };
        self.changes.send_replace(version);
        Some(version)
    }

    /// Withdraws the route of `key`, e.g. when it no longer resolves.
    pub fn remove(&self, key: &PolicyKey) {
        let version = {
            let mut state = self.write();
            if state.policies.remove(key).is_none() {
                return;
            }
            state.version += 1;
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
            let before = state.policies.len();
            state.policies.retain(|k, _| keep(k));
            if state.policies.len() == before {
                return;
            }
            state.version += 1;
            state.version
        };
        self.changes.send_replace(version);
    }

    /// The config for a pod in `namespace` with `labels`: every route of that
    /// namespace's policies whose client selector matches, ordered by policy name.
    pub fn config_for(&self, namespace: &str, labels: &BTreeMap<String, String>) -> SidecarConfig {
        let state = self.read();
        SidecarConfig {
            version: state.version,
            routes: state
                .policies
                .iter()
                .filter(|((ns, _), e)| ns == namespace && e.selector.matches(labels))
                .map(|(_, e)| e.route.clone())
                .collect(),
        }
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
