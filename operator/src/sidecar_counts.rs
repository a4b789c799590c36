//! `status.sidecars` across replicas. A sidecar long-polls whichever replica the Service
//! picks, so each replica knows only its own subscribers. Every replica therefore
//! publishes its counts in a ConfigMap of its own (owned by its Pod, so it goes when the
//! replica does), and every replica sums its own counts with the fresh ones of the
//! others; the leader writes the sums into the policies' status.
//!
//! The sums are recomputed when a sidecar's holdings change (debounced), when another
//! replica publishes, and every [`TALLY_EVERY`] (so a silent replica's counts expire);
//! the policies whose sums changed are sent to the controller to be reconciled.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Pod},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use trimtab_api::balancer_policy::SidecarCounts;

use crate::{config_server::subscribers::Subscribers, index::PolicyIndex, index::PolicyKey};

/// Label on every replica's counts ConfigMap; its value is the replica's name.
pub const LABEL: &str = "trimtab.dev/sidecar-counts";
/// The ConfigMap key holding [`ReplicaCounts`] as JSON.
pub const DATA_KEY: &str = "counts.json";
/// How often the counts are recomputed without any other cause.
pub const TALLY_EVERY: Duration = Duration::from_secs(5);
/// How long after a holdings change the counts are recomputed, so a thousand sidecars
/// reconnecting cost one recount and one status write per policy.
const DEBOUNCE: Duration = Duration::from_secs(1);
/// An unchanged ConfigMap is republished this often, as a sign of life.
const HEARTBEAT: Duration = Duration::from_secs(30);
/// Counts not republished for this long belong to a replica that stopped (a partitioned
/// node keeps its Pod, and so its ConfigMap): they are no longer added.
pub const STALE_AFTER: Duration = Duration::from_secs(90);

/// Which replica this is, where its ConfigMap goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// The operator's namespace.
    pub namespace: String,
    /// The replica's Pod name (`TRIMTAB_POD_NAME`).
    pub name: String,
}

impl Replica {
    /// The name of this replica's counts ConfigMap.
    pub fn config_map_name(&self) -> String {
        format!("trimtab-sidecars-{}", self.name)
    }
}

/// One replica's counts, as published.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCounts {
    /// Unix milliseconds of the publication.
    pub published_ms: u64,
    /// `namespace/name` → `[connected, upToDate]`.
    pub policies: BTreeMap<String, [u32; 2]>,
}

impl ReplicaCounts {
    /// `counts` as published at `now_ms`.
    pub fn new(counts: &BTreeMap<PolicyKey, SidecarCounts>, now_ms: u64) -> Self {
        Self {
            published_ms: now_ms,
            policies: counts
                .iter()
                .map(|((ns, name), c)| (format!("{ns}/{name}"), [c.connected, c.up_to_date]))
                .collect(),
        }
    }

    /// Read from a ConfigMap; the error names the ConfigMap and the JSON position.
    pub fn from_config_map(cm: &ConfigMap) -> Result<Self, CountsError> {
        let name = cm.name_any();
        let data = cm
            .data
            .as_ref()
            .and_then(|d| d.get(DATA_KEY))
            .ok_or_else(|| CountsError::Missing(name.clone()))?;
        serde_json::from_str(data).map_err(|source| CountsError::Malformed { name, source })
    }
}

/// Why another replica's counts were not added.
#[derive(Debug, thiserror::Error)]
pub enum CountsError {
    /// The ConfigMap has no `counts.json`.
    #[error("ConfigMap {0} has no data.{DATA_KEY}")]
    Missing(String),
    /// `counts.json` is not what a replica writes.
    #[error("ConfigMap {name} data.{DATA_KEY}: {source}")]
    Malformed {
        /// The ConfigMap.
        name: String,
        /// Where parsing failed.
        source: serde_json::Error,
    },
}

/// This replica's counts plus the fresh counts of the others: the pure part.
pub fn totals<'a>(
    own: &BTreeMap<PolicyKey, SidecarCounts>,
    others: impl IntoIterator<Item = &'a ReplicaCounts>,
    now_ms: u64,
) -> BTreeMap<PolicyKey, SidecarCounts> {
    let mut sum = own.clone();
    let stale_ms = u64::try_from(STALE_AFTER.as_millis()).unwrap_or(u64::MAX);
    for other in others {
        if now_ms.saturating_sub(other.published_ms) > stale_ms {
            continue;
        }
        for (key, [connected, up_to_date]) in &other.policies {
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            let entry = sum.entry((ns.to_owned(), name.to_owned())).or_default();
            entry.connected = entry.connected.saturating_add(*connected);
            entry.up_to_date = entry.up_to_date.saturating_add(*up_to_date);
        }
    }
    sum
}

/// The policies whose counts differ between `old` and `new` (present in either).
pub fn changed(
    old: &BTreeMap<PolicyKey, SidecarCounts>,
    new: &BTreeMap<PolicyKey, SidecarCounts>,
) -> BTreeSet<PolicyKey> {
    let keys: BTreeSet<&PolicyKey> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect()
}

/// The current sums, read by the reconciler.
#[derive(Debug, Clone, Default)]
pub struct SidecarTotals(Arc<RwLock<BTreeMap<PolicyKey, SidecarCounts>>>);

impl SidecarTotals {
    /// The sums for one policy (zero when no sidecar holds it).
    pub fn get(&self, key: &PolicyKey) -> SidecarCounts {
        self.read().get(key).cloned().unwrap_or_default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<PolicyKey, SidecarCounts>> {
        // Writers replace the whole map: a panicked one left the previous map intact.
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn replace(&self, new: BTreeMap<PolicyKey, SidecarCounts>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = new;
    }
}

/// Everything the counting task reads and writes.
#[derive(Debug)]
pub struct Counting {
    /// This replica's sidecars.
    pub subscribers: Subscribers,
    /// Where "current" route hashes come from.
    pub index: PolicyIndex,
    /// Hints that a sidecar's holdings changed.
    pub hints: mpsc::Receiver<PolicyKey>,
    /// Where the sums go.
    pub totals: SidecarTotals,
    /// Policies whose sums changed, to be reconciled.
    pub triggers: mpsc::Sender<PolicyKey>,
}

/// Counts until the process ends. Without `replica` (a single local process) nothing is
/// published and only this replica's sidecars are counted.
pub async fn run(client: Client, replica: Option<Replica>, pods: Store<Pod>, counting: Counting) {
    let Counting {
        subscribers,
        index,
        mut hints,
        totals: shared,
        triggers,
    } = counting;
    let (store, writer) = reflector::store::<ConfigMap>();
    let mut others_changed = match &replica {
        Some(r) => watcher(
            Api::<ConfigMap>::namespaced(client.clone(), &r.namespace),
            watcher::Config::default().labels(LABEL),
        )
        .default_backoff()
        .reflect(writer)
        .touched_objects()
        .boxed(),
        None => futures_util::stream::pending().boxed(),
    };
    let mut tick = tokio::time::interval(TALLY_EVERY);
    let mut published: Option<(ReplicaCounts, tokio::time::Instant)> = None;
    let mut last_totals = BTreeMap::new();
    loop {
        tokio::select! {
            hint = hints.recv() => {
                if hint.is_none() {
                    return;
                }
                tokio::time::sleep(DEBOUNCE).await;
                while hints.try_recv().is_ok() {}
            }
            event = others_changed.next() => {
                if let Some(Err(e)) = event {
                    tracing::debug!(error = %e, "watching other replicas' sidecar counts");
                }
            }
            _ = tick.tick() => {}
        }
        let own = subscribers.tally(|key| index.route_hash(key));
        let now_ms = unix_ms();
        let others: Vec<ReplicaCounts> = store
            .state()
            .iter()
            .filter(|cm| Some(cm.name_any()) != replica.as_ref().map(Replica::config_map_name))
            .filter_map(|cm| match ReplicaCounts::from_config_map(cm) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring another replica's sidecar counts");
                    None
                }
            })
            .collect();
        let new_totals = totals(&own, &others, now_ms);
        let changed = changed(&last_totals, &new_totals);
        shared.replace(new_totals.clone());
        last_totals = new_totals;
        for key in changed {
            // A full channel means a reconcile of everything is already queued behind.
            let _ = triggers.try_send(key);
        }

        let Some(replica) = &replica else { continue };
        let mine = ReplicaCounts::new(&own, now_ms);
        let due = match &published {
            Some((last, at)) => last.policies != mine.policies || at.elapsed() >= HEARTBEAT,
            None => true,
        };
        if due {
            match publish(&client, replica, &pods, &mine).await {
                Ok(()) => published = Some((mine, tokio::time::Instant::now())),
                Err(e) => tracing::warn!(error = %e, "publishing this replica's sidecar counts"),
            }
        }
    }
}

/// Server-side applies this replica's ConfigMap, owned by its Pod when the Pod is known.
async fn publish(
    client: &Client,
    replica: &Replica,
    pods: &Store<Pod>,
    counts: &ReplicaCounts,
) -> Result<(), kube::Error> {
    let owner = pods
        .get(&ObjectRef::new(&replica.name).within(&replica.namespace))
        .and_then(|pod| pod.uid())
        .map(|uid| OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: replica.name.clone(),
            uid,
            ..OwnerReference::default()
        });
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(replica.config_map_name());
    cm.metadata.namespace = Some(replica.namespace.clone());
    cm.metadata.labels = Some(BTreeMap::from([(LABEL.to_owned(), replica.name.clone())]));
    cm.metadata.owner_references = owner.map(|o| vec![o]);
    let json = serde_json::to_string(counts).unwrap_or_default();
    cm.data = Some(BTreeMap::from([(DATA_KEY.to_owned(), json)]));
    let mut apply = serde_json::to_value(&cm).unwrap_or_default();
    apply["apiVersion"] = "v1".into();
    apply["kind"] = "ConfigMap".into();
    Api::<ConfigMap>::namespaced(client.clone(), &replica.namespace)
        .patch(
            &replica.config_map_name(),
            &PatchParams::apply(crate::balancer_policy::FIELD_MANAGER).force(),
            &Patch::Apply(&apply),
        )
        .await
        .map(|_| ())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u32, u32)]) -> BTreeMap<PolicyKey, SidecarCounts> {
        pairs
            .iter()
            .map(|(name, connected, up_to_date)| {
                (
                    ("shop".to_owned(), (*name).to_owned()),
                    SidecarCounts {
                        connected: *connected,
                        up_to_date: *up_to_date,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn totals_add_fresh_replicas_and_drop_stale_ones() {
        let own = counts(&[("api", 2, 2)]);
        let fresh = ReplicaCounts::new(&counts(&[("api", 3, 1), ("web", 1, 1)]), 100_000);
        let stale = ReplicaCounts::new(&counts(&[("api", 50, 50)]), 1_000);
        let sum = totals(&own, [&fresh, &stale], 100_000 + 1_000);
        assert_eq!(sum, counts(&[("api", 5, 3), ("web", 1, 1)]));

        // Once the fresh one is silent for STALE_AFTER, only our own remain.
        let later = 100_000 + STALE_AFTER.as_millis() as u64 + 1;
        assert_eq!(totals(&own, [&fresh], later), own);
    }

    #[test]
    fn changed_names_policies_that_appeared_disappeared_or_moved() {
        let old = counts(&[("api", 2, 2), ("gone", 1, 1), ("same", 1, 0)]);
        let new = counts(&[("api", 2, 1), ("new", 1, 1), ("same", 1, 0)]);
        let names: Vec<_> = changed(&old, &new).into_iter().map(|k| k.1).collect();
        assert_eq!(names, ["api", "gone", "new"]);
    }

    #[test]
    fn counts_round_trip_through_a_config_map_and_bad_data_names_it() {
        let published = ReplicaCounts::new(&counts(&[("api", 2, 1)]), 42);
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("trimtab-sidecars-op-1".into());
        cm.data = Some(BTreeMap::from([(
            DATA_KEY.to_owned(),
            serde_json::to_string(&published).expect("serializes"),
        )]));
        assert_eq!(
            ReplicaCounts::from_config_map(&cm).expect("reads"),
            published
        );

        cm.data = Some(BTreeMap::from([(
            DATA_KEY.to_owned(),
            "{\"publishedMs\": \"x\"}".into(),
        )]));
        let e = ReplicaCounts::from_config_map(&cm)
            .expect_err("malformed")
            .to_string();
        assert!(
            e.contains("trimtab-sidecars-op-1") && e.contains("column"),
            "{e}"
        );
        cm.data = None;
        let e = ReplicaCounts::from_config_map(&cm)
            .expect_err("missing")
            .to_string();
        assert!(e.contains("counts.json"), "{e}");
    }
}
