//! Leader election with a coordination.k8s.io Lease (kube-lease-manager).
//!
//! Every replica watches, indexes and serves config from a warm index; only the lease
//! holder writes status and Events (Linkerd's policy-controller does the same), so two
//! replicas never fight over a status and a failover loses no state.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;

/// The Lease every replica competes for.
pub const LEASE_NAME: &str = "trimtab-operator";
/// How long a lease lasts without renewal: the longest a dead leader blocks writes.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// Renewal starts this long before expiry.
pub const LEASE_GRACE: Duration = Duration::from_secs(5);

/// Whether this replica may write. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Leadership {
    state: watch::Receiver<bool>,
}

impl Leadership {
    /// Competes for `LEASE_NAME` in `namespace` as `identity`, in the background.
    pub async fn elect(
        client: Client,
        namespace: &str,
        identity: &str,
        duration: Duration,
        grace: Duration,
    ) -> Result<Self, LeaseManagerError> {
        let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(duration.as_secs())
            .with_grace(grace.as_secs())
            .with_field_manager("trimtab-operator")
            .build()
            .await?;
        let (state, task) = manager.watch().await;
        tokio::spawn(async move {
            if let Ok(Err(e)) = task.await {
                tracing::error!(error = %e, "leader election stopped");
            }
        });
        Ok(Self { state })
    }

    /// A replica that always leads: a single operator, or a test.
    pub fn always() -> Self {
        let (sender, state) = watch::channel(true);
        // The receiver keeps the last value after the sender is gone.
        drop(sender);
        Self { state }
    }

    /// Whether this replica holds the lease now.
    pub fn is_leader(&self) -> bool {
        *self.state.borrow()
    }

    /// Waits until leadership changes; returns the new value. Once election has
    /// stopped (or for [`Self::always`]) it never changes again, and this never returns:
    /// loops that wait on it must not spin.
    pub async fn changed(&mut self) -> bool {
        if self.state.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        *self.state.borrow_and_update()
    }
}
