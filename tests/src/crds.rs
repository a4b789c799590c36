//! Installing Trimtab's CRDs into a test cluster the way a user does: `kubectl apply -f crds/`.

use std::{path::PathBuf, time::Duration};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;

use crate::cluster::TestCluster;

/// Why the CRDs could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// kubectl could not be run or refused the files.
    #[error("kubectl apply -f crds/ failed: {0}")]
    Kubectl(String),
    /// The API server could not be asked about a CRD.
    #[error("reading CRD {name}: {source}")]
    Read {
        /// The CRD's name.
        name: &'static str,
        /// The client error.
        source: kube::Error,
    },
    /// The CRD never became Established.
    #[error("CRD {name} not Established after 30s; its conditions: {conditions}")]
    NotEstablished {
        /// The CRD's name.
        name: &'static str,
        /// Its status conditions, for the reader.
        conditions: String,
    },
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The names of the CRDs in `crds/`.
pub const CRD_NAMES: [&str; 2] = ["balancerpolicies.trimtab.dev", "loadtests.trimtab.dev"];

/// Applies `crds/` with the cluster's kubectl and waits until every CRD is Established
/// (its API is served), so the test can create resources right away.
pub async fn install(cluster: &TestCluster) -> Result<(), InstallError> {
    let output = cluster
        .kubectl()
        .args(["apply", "-f"])
        .arg(repo_root().join("crds"))
        .output()
        .map_err(|e| InstallError::Kubectl(e.to_string()))?;
    if !output.status.success() {
        return Err(InstallError::Kubectl(
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ));
    }
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client());
    for name in CRD_NAMES {
        let mut waited = Duration::ZERO;
        loop {
            let crd = crds
                .get(name)
                .await
                .map_err(|source| InstallError::Read { name, source })?;
            if is_established(&crd) {
                break;
            }
            if waited > Duration::from_secs(30) {
                return Err(InstallError::NotEstablished {
                    name,
                    conditions: format!("{:?}", crd.status),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            waited += Duration::from_millis(100);
        }
    }
    Ok(())
}

/// Whether the API server serves the CRD's API.
pub fn is_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}
