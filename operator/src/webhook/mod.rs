//! The sidecar-injection webhook: the API server sends pod creations that opted in
//! (`trimtab.dev/inject: "true"` on the pod or its namespace; the chart's
//! MutatingWebhookConfiguration selects them) to `POST /mutate-pods` on the config
//! server's HTTPS port, and gets back a JSON patch adding the sidecar.
//!
//! - [`inject`]: the decision and the patch, pure.
//! - [`overrides`]: per-pod annotations that change the sidecar's image, resources, logs.
//! - [`review`]: AdmissionReview in, AdmissionReview out.
//! - [`ca_bundle`]: the leader keeps the webhook configuration's `caBundle` equal to the
//!   CA that signs the serving certificate.

pub mod ca_bundle;
pub mod inject;
pub mod overrides;
pub mod review;

use std::sync::Arc;

use arc_swap::ArcSwap;
use kube::core::{DynamicObject, admission::AdmissionReview};
use prometheus::{IntCounterVec, Opts, Registry};

pub use self::inject::InjectionSettings;
use self::review::{Outcome, ReviewError};

/// The injector the config server routes `/mutate-pods` to. Its settings change only
/// when the CA does ([`Injector::set_ca_pem`]).
#[derive(Debug)]
pub struct Injector {
    settings: ArcSwap<InjectionSettings>,
    admissions: IntCounterVec,
}

impl Injector {
    /// An injector with `settings`, counting admissions in `registry`.
    pub fn new(
        settings: InjectionSettings,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let admissions = IntCounterVec::new(
            Opts::new(
                "trimtab_operator_admissions_total",
                "Pod admissions answered by the injection webhook, by outcome \
                 (injected, skipped, denied, error)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(admissions.clone()))?;
        Ok(Self {
            settings: ArcSwap::from_pointee(settings),
            admissions,
        })
    }

    /// The settings in use.
    pub fn settings(&self) -> Arc<InjectionSettings> {
        self.settings.load_full()
    }

    /// Pods admitted from now on carry `ca_pem` (after a CA change in the TLS Secret).
    pub fn set_ca_pem(&self, ca_pem: &str) {
        self.settings.rcu(|current| {
            let mut next = InjectionSettings::clone(current);
            next.ca_pem = ca_pem.to_owned();
            next
        });
    }

    /// Answers one AdmissionReview body, counting the outcome.
    pub fn review(&self, body: &[u8]) -> Result<AdmissionReview<DynamicObject>, ReviewError> {
        let result = review::review(body, &self.settings.load());
        let outcome = match &result {
            Ok((_, outcome)) => *outcome,
            Err(_) => Outcome::Error,
        };
        self.admissions.with_label_values(&[outcome.label()]).inc();
        result.map(|(review, _)| review)
    }
}
