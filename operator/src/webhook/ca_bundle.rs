//! Keeps `caBundle` of every webhook in the operator's MutatingWebhookConfiguration
//! equal to the CA of its TLS Secret, so the API server trusts the serving certificate.
//!
//! Only the leader writes. It checks when it becomes leader, when the CA changes, and
//! every [`CHECK_EVERY`]: the chart grants `get` and `patch` on that one configuration,
//! not `watch`, and a periodic check also repairs a configuration that `kubectl apply`
//! or a GitOps tool recreated without the caBundle.

use std::time::Duration;

use k8s_openapi::{ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::leader::Leadership;

/// How often the leader compares the caBundle with the CA.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);

/// The webhooks of `configuration` whose caBundle is not `ca_pem`.
pub fn stale_webhooks(configuration: &MutatingWebhookConfiguration, ca_pem: &str) -> Vec<String> {
    configuration
        .webhooks
        .iter()
        .flatten()
        .filter(|w| {
            w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca_pem.as_bytes())
        })
        .map(|w| w.name.clone())
        .collect()
}

/// A strategic merge patch setting the caBundle of `webhooks` (the list merges by
/// `name`, so nothing else of the configuration is touched).
pub fn patch(webhooks: &[String], ca_pem: &str) -> Value {
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    json!({"webhooks": webhooks.iter().map(|name| json!({
        "name": name,
        "clientConfig": {"caBundle": bundle},
    })).collect::<Vec<_>>()})
}

/// Patches the caBundle of configuration `name` when it differs from `ca_pem`; returns
/// the webhooks patched. A configuration that does not exist (injection off, or being
/// reinstalled) is not an error.
pub async fn reconcile(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca_pem: &str,
) -> Result<Vec<String>, kube::Error> {
    let Some(configuration) = api.get_opt(name).await? else {
        tracing::debug!(
            configuration = name,
            "webhook configuration absent; nothing to patch"
        );
        return Ok(Vec::new());
    };
    let stale = stale_webhooks(&configuration, ca_pem);
    if !stale.is_empty() {
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Strategic(patch(&stale, ca_pem)),
        )
        .await?;
        tracing::info!(configuration = name, webhooks = ?stale, "webhook caBundle updated");
    }
    Ok(stale)
}

/// The leader's loop: runs for the life of the process.
pub async fn keep_current(
    client: Client,
    name: String,
    mut ca: watch::Receiver<String>,
    mut leadership: Leadership,
    every: Duration,
) {
    let api = Api::<MutatingWebhookConfiguration>::all(client);
    loop {
        let ca_pem = ca.borrow_and_update().clone();
        if leadership.is_leader()
            && !ca_pem.is_empty()
            && let Err(e) = reconcile(&api, &name, &ca_pem).await
        {
            tracing::warn!(configuration = %name, error = %e, "patching the webhook caBundle failed");
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = leadership.changed() => {}
            changed = ca.changed() => {
                if changed.is_err() {
                    // The CA can no longer change: keep checking on the timer only.
                    tokio::time::sleep(every).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configuration(bundles: &[Option<&str>]) -> MutatingWebhookConfiguration {
        serde_json::from_value(json!({
            "metadata": {"name": "trimtab-sidecar-injector"},
            "webhooks": bundles.iter().enumerate().map(|(i, b)| {
                let mut client = json!({"url": "https://127.0.0.1:8443/mutate-pods"});
                if let Some(b) = b {
                    client["caBundle"] = json!(ByteString(b.as_bytes().to_vec()));
                }
                json!({"name": format!("hook{i}.trimtab.dev"), "clientConfig": client,
                       "sideEffects": "None", "admissionReviewVersions": ["v1"]})
            }).collect::<Vec<_>>()
        }))
        .expect("configuration")
    }

    #[test]
    fn only_webhooks_without_the_current_ca_are_stale() {
        let c = configuration(&[None, Some("OLD"), Some("CA")]);
        assert_eq!(
            stale_webhooks(&c, "CA"),
            ["hook0.trimtab.dev", "hook1.trimtab.dev"]
        );
        assert!(stale_webhooks(&configuration(&[Some("CA")]), "CA").is_empty());
    }

    #[test]
    fn the_patch_sets_only_the_ca_bundle_of_the_named_webhooks() {
        let p = patch(&["hook0.trimtab.dev".into()], "CA");
        assert_eq!(
            p,
            json!({"webhooks": [{"name": "hook0.trimtab.dev", "clientConfig": {"caBundle": "Q0E="}}]})
        );
    }
}
