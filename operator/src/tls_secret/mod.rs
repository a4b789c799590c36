//! The operator's own CA and serving certificate, kept in one Secret
//! (`TRIMTAB_TLS_SECRET`) when cert-manager is not used.
//!
//! - Every replica, at start, reads the Secret, or creates it when absent. Two replicas
//!   starting at once both try; the one whose create fails with 409 reads the winner's,
//!   so all serve the same certificate.
//! - Every replica then follows the Secret (get, then a watch on that one name: the
//!   chart grants `get` and `watch` on it, not `list`) and swaps a renewed certificate
//!   into its TLS config without a restart.
//! - Only the leader renews: with a third of the lifetime left, or when the served names
//!   changed, it signs a new serving certificate with the same CA and writes it with
//!   server-side apply guarded by the resourceVersion it read.
//!
//! The CA itself is never rotated here: injected sidecars carry it, so rotating it is a
//! manual, documented step (docs/install.md), as with Linkerd's trust anchors.

pub mod issue;

use std::time::{Duration, SystemTime};

use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use tokio::sync::watch;

use self::issue::{Bundle, IssueError};
use crate::{
    config_server::tls::{CertSwap, TlsError},
    leader::Leadership,
};

/// The field manager of the operator's writes.
const FIELD_MANAGER: &str = "trimtab-operator";
/// How long to wait before retrying a failed API call or a broken watch.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The Secret could not be read, created or written.
#[derive(Debug, thiserror::Error)]
pub enum TlsSecretError {
    /// The API server refused or could not be reached.
    #[error("Secret {name}: {action}: {source}")]
    Api {
        /// The Secret.
        name: String,
        /// `reading`, `creating`, `writing`.
        action: &'static str,
        /// The client's error.
        source: kube::Error,
    },
    /// A certificate could not be made.
    #[error("Secret {name}: {source}")]
    Issue {
        /// The Secret.
        name: String,
        /// Why.
        source: IssueError,
    },
    /// The certificate in the Secret does not load into rustls.
    #[error("Secret {name}: {source}")]
    Tls {
        /// The Secret.
        name: String,
        /// Why.
        source: TlsError,
    },
}

/// One Secret and what its serving certificate must cover.
#[derive(Debug, Clone)]
pub struct TlsSecret {
    api: Api<Secret>,
    name: String,
    names: Vec<String>,
    lifetime: Duration,
}

impl TlsSecret {
    /// The Secret `name` of `api`'s namespace, for a certificate covering `names` that
    /// lasts `lifetime`.
    pub fn new(api: Api<Secret>, name: &str, names: Vec<String>, lifetime: Duration) -> Self {
        Self {
            api,
            name: name.to_owned(),
            names,
            lifetime,
        }
    }

    /// The Secret's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn api_error(&self, action: &'static str) -> impl FnOnce(kube::Error) -> TlsSecretError {
        let name = self.name.clone();
        move |source| TlsSecretError::Api {
            name,
            action,
            source,
        }
    }

    fn issue_error(&self, source: IssueError) -> TlsSecretError {
        TlsSecretError::Issue {
            name: self.name.clone(),
            source,
        }
    }

    /// Reads the bundle, creating the Secret when it is absent and replacing its content
    /// when it holds no usable bundle (an empty Secret someone created for us).
    pub async fn ensure(&self) -> Result<Bundle, TlsSecretError> {
        loop {
            match self
                .api
                .get_opt(&self.name)
                .await
                .map_err(self.api_error("reading"))?
            {
                Some(secret) => match issue::from_secret(&secret) {
                    Ok(bundle) => return Ok(bundle),
                    Err(e) => {
                        tracing::warn!(secret = %self.name, error = %e, "TLS Secret unusable; issuing a new CA and certificate");
                        let bundle =
                            issue::new_bundle(&self.names, SystemTime::now(), self.lifetime)
                                .map_err(|e| self.issue_error(e))?;
                        match self.write(&bundle, secret.metadata.resource_version).await {
                            Ok(()) => return Ok(bundle),
                            // Someone else wrote first: read theirs.
                            Err(TlsSecretError::Api {
                                source: kube::Error::Api(status),
                                ..
                            }) if status.code == 409 => continue,
                            Err(e) => return Err(e),
                        }
                    }
                },
                None => {
                    let bundle = issue::new_bundle(&self.names, SystemTime::now(), self.lifetime)
                        .map_err(|e| self.issue_error(e))?;
                    let secret = issue::to_secret(&self.name, &bundle);
                    match self.api.create(&PostParams::default(), &secret).await {
                        Ok(_) => {
                            tracing::info!(secret = %self.name, "created the TLS Secret: a new CA and serving certificate");
                            return Ok(bundle);
                        }
                        // Another replica created it between our get and create.
                        Err(kube::Error::Api(status)) if status.code == 409 => continue,
                        Err(e) => return Err(self.api_error("creating")(e)),
                    }
                }
            }
        }
    }

    /// Server-side apply of `bundle`, refused (409) unless the Secret is still at
    /// `resource_version`.
    async fn write(
        &self,
        bundle: &Bundle,
        resource_version: Option<String>,
    ) -> Result<(), TlsSecretError> {
        let mut secret = issue::to_secret(&self.name, bundle);
        secret.metadata.resource_version = resource_version;
        let mut object = serde_json::to_value(&secret).unwrap_or_default();
        object["apiVersion"] = "v1".into();
        object["kind"] = "Secret".into();
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(object),
            )
            .await
            .map(|_| ())
            .map_err(self.api_error("writing"))
    }

    /// Follows the Secret for the life of the process: each new serving certificate is
    /// swapped into `swap`, each new CA published on `ca`.
    pub async fn follow(self, swap: CertSwap, ca: watch::Sender<String>) {
        let field = format!("metadata.name={}", self.name);
        loop {
            let secret = match self.api.get_opt(&self.name).await {
                Ok(Some(secret)) => secret,
                Ok(None) => {
                    tracing::warn!(secret = %self.name, "TLS Secret deleted; recreating it");
                    if let Err(e) = self.ensure().await {
                        tracing::warn!(error = %e, "TLS Secret not recreated");
                    }
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(secret = %self.name, error = %e, "reading the TLS Secret failed");
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
            };
            self.take(&secret, &swap, &ca);
            let Some(version) = secret.metadata.resource_version.clone() else {
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            };
            let params = WatchParams::default().fields(&field).timeout(290);
            let events = match self.api.watch(&params, &version).await {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(secret = %self.name, error = %e, "watching the TLS Secret failed");
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
            };
            let mut events = events.boxed();
            loop {
                match events.try_next().await {
                    Ok(Some(WatchEvent::Added(secret) | WatchEvent::Modified(secret))) => {
                        self.take(&secret, &swap, &ca);
                    }
                    Ok(Some(WatchEvent::Deleted(_))) => break,
                    Ok(Some(WatchEvent::Bookmark(_))) => {}
                    Ok(Some(WatchEvent::Error(e))) => {
                        // 410 Gone and the like: start again from a fresh read.
                        tracing::debug!(secret = %self.name, error = ?e, "TLS Secret watch ended");
                        break;
                    }
                    // The server closed the watch (its timeout): read and watch again.
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(secret = %self.name, error = %e, "TLS Secret watch broke");
                        tokio::time::sleep(RETRY_AFTER).await;
                        break;
                    }
                }
            }
        }
    }

    fn take(&self, secret: &Secret, swap: &CertSwap, ca: &watch::Sender<String>) {
        let bundle = match issue::from_secret(secret) {
            Ok(bundle) => bundle,
            Err(e) => {
                tracing::warn!(secret = %self.name, error = %e, "TLS Secret unusable; keeping the current certificate");
                return;
            }
        };
        match swap.replace(&bundle.tls_crt, &bundle.tls_key) {
            Ok(true) => {
                tracing::info!(secret = %self.name, "serving certificate reloaded from the TLS Secret");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(secret = %self.name, error = %e, "renewed certificate not loaded; keeping the current one");
            }
        }
        ca.send_if_modified(|current| {
            let changed = *current != bundle.ca_crt;
            if changed {
                current.clone_from(&bundle.ca_crt);
            }
            changed
        });
    }

    /// Renews the serving certificate while this replica leads, checking `every`.
    pub async fn renew(self, mut leadership: Leadership, every: Duration) {
        loop {
            if leadership.is_leader()
                && let Err(e) = self.renew_once(SystemTime::now()).await
            {
                tracing::warn!(error = %e, "renewing the serving certificate failed; retrying");
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = leadership.changed() => {}
            }
        }
    }

    /// Re-issues the serving certificate if [`issue::renewal`] says so; whether it did.
    pub async fn renew_once(&self, now: SystemTime) -> Result<bool, TlsSecretError> {
        let Some(secret) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.api_error("reading"))?
        else {
            self.ensure().await?;
            return Ok(true);
        };
        let Ok(bundle) = issue::from_secret(&secret) else {
            self.ensure().await?;
            return Ok(true);
        };
        let Some(why) = issue::renewal(&bundle.serving, &self.names, now) else {
            return Ok(false);
        };
        let renewed = issue::reissue(
            &bundle.ca_crt,
            &bundle.ca_key,
            &self.names,
            now,
            self.lifetime,
        )
        .map_err(|e| self.issue_error(e))?;
        self.write(&renewed, secret.metadata.resource_version)
            .await?;
        tracing::info!(secret = %self.name, reason = ?why, "serving certificate renewed");
        Ok(true)
    }
}
