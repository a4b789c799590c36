//! The operator's certificate authority and serving certificate, and the renewal
//! decision, as pure functions of the time and the names: no I/O.
//!
//! What the Secret holds (`kubernetes.io/tls`):
//! - `ca.crt`, `ca.key`: a CA made once, valid [`CA_LIFETIME`]; the webhook's
//!   `caBundle` and every injected sidecar trust it.
//! - `tls.crt`, `tls.key`: the serving certificate it signs for the Service's DNS names
//!   (and any extra names), valid `lifetime`, renewed when less than a third of it is left.
//! - annotations [`NOT_BEFORE`], [`NOT_AFTER`], [`NAMES`]: what the serving certificate
//!   was issued for, so that the renewal decision needs no X.509 parser.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use k8s_openapi::{ByteString, api::core::v1::Secret, jiff::Timestamp};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// How long the CA is valid. Its rotation is a documented manual step (docs/install.md):
/// every injected sidecar carries it.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The serving certificate's default lifetime.
pub const SERVING_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Certificates start this far in the past: a node whose clock is a little behind
/// still accepts them.
const BACKDATE: Duration = Duration::from_secs(300);
/// The CA's common name. Renewal signs with an issuer rebuilt from it and the CA key, so
/// it must never change.
const CA_COMMON_NAME: &str = "trimtab-operator CA";

/// When the serving certificate became valid (RFC 3339).
pub const NOT_BEFORE: &str = "trimtab.dev/serving-cert-not-before";
/// When it expires (RFC 3339).
pub const NOT_AFTER: &str = "trimtab.dev/serving-cert-not-after";
/// The names it was issued for, comma-separated.
pub const NAMES: &str = "trimtab.dev/serving-cert-names";

/// The CA certificate (PEM) in the Secret.
pub const CA_CRT: &str = "ca.crt";
/// The CA key (PEM, PKCS#8).
pub const CA_KEY: &str = "ca.key";
/// The serving certificate (PEM).
pub const TLS_CRT: &str = "tls.crt";
/// Its key (PEM, PKCS#8).
pub const TLS_KEY: &str = "tls.key";

/// A certificate could not be made, or the Secret does not hold a usable set.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// rcgen refused.
    #[error("making a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A key of the Secret is missing or not PEM text.
    #[error("key {key} of the TLS Secret: {reason}")]
    Field {
        /// The data key or annotation.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// What the Secret holds.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    /// CA certificate, PEM.
    pub ca_crt: String,
    /// CA key, PEM.
    pub ca_key: String,
    /// Serving certificate, PEM.
    pub tls_crt: String,
    /// Serving key, PEM.
    pub tls_key: String,
    /// What the serving certificate was issued for.
    pub serving: Serving,
}

impl std::fmt::Debug for Bundle {
    // Keys never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("serving", &self.serving)
            .finish_non_exhaustive()
    }
}

/// The serving certificate's names and validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    /// DNS names and IP addresses.
    pub names: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Why the serving certificate must be re-issued, if it must.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Less than a third of its lifetime is left (or it has expired).
    Expiring,
    /// The operator now serves other names (a flag changed).
    NamesChanged,
}

/// The DNS names a Service is reached by, the form the API server uses (`.svc`) first.
pub fn service_names(service: &str, namespace: &str, cluster_domain: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc.{cluster_domain}"),
    ]
}

fn authority_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "trimtab");
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A new CA and a serving certificate for `names`, valid from `now`.
pub fn new_bundle(
    names: &[String],
    now: SystemTime,
    lifetime: Duration,
) -> Result<Bundle, IssueError> {
    let ca_key = KeyPair::generate()?;
    let mut params = authority_params();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_LIFETIME).into();
    let ca_crt = params.self_signed(&ca_key)?.pem();
    reissue(&ca_crt, &ca_key.serialize_pem(), names, now, lifetime)
}

/// The same CA, a new serving certificate for `names`, valid from `now`.
pub fn reissue(
    ca_crt: &str,
    ca_key: &str,
    names: &[String],
    now: SystemTime,
    lifetime: Duration,
) -> Result<Bundle, IssueError> {
    let issuer = Issuer::new(
        authority_params(),
        KeyPair::from_pem(ca_key).map_err(|e| IssueError::Field {
            key: CA_KEY,
            reason: e.to_string(),
        })?,
    );
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut subject = DistinguishedName::new();
    subject.push(
        DnType::CommonName,
        names.first().map_or("trimtab-operator", String::as_str),
    );
    params.distinguished_name = subject;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let not_before = now - BACKDATE;
    let not_after = now + lifetime;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let tls_crt = params.signed_by(&key, &issuer)?.pem();
    Ok(Bundle {
        ca_crt: ca_crt.to_owned(),
        ca_key: ca_key.to_owned(),
        tls_crt,
        tls_key: key.serialize_pem(),
        serving: Serving {
            names: names.to_vec(),
            // Whole seconds: what the annotations keep.
            not_before: whole_seconds(not_before),
            not_after: whole_seconds(not_after),
        },
    })
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    let since = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs())
}

/// Whether the serving certificate must be re-issued at `now` for `names`. Renewal
/// starts with a third of the lifetime left, as cert-manager's default `renewBefore`
/// does: several check intervals, and a leader failover, fit in that margin.
pub fn renewal(serving: &Serving, names: &[String], now: SystemTime) -> Option<Renewal> {
    if serving.names != names {
        return Some(Renewal::NamesChanged);
    }
    let lifetime = serving
        .not_after
        .duration_since(serving.not_before)
        .unwrap_or(Duration::ZERO);
    let renew_at = serving.not_before + lifetime * 2 / 3;
    (now >= renew_at).then_some(Renewal::Expiring)
}

/// The Secret's data and annotations for `bundle`.
pub fn to_secret(name: &str, bundle: &Bundle) -> Secret {
    let data = [
        (CA_CRT, &bundle.ca_crt),
        (CA_KEY, &bundle.ca_key),
        (TLS_CRT, &bundle.tls_crt),
        (TLS_KEY, &bundle.tls_key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    let annotations = BTreeMap::from([
        (NOT_BEFORE.to_owned(), timestamp(bundle.serving.not_before)),
        (NOT_AFTER.to_owned(), timestamp(bundle.serving.not_after)),
        (NAMES.to_owned(), bundle.serving.names.join(",")),
    ]);
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(annotations),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "trimtab-operator".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

fn timestamp(t: SystemTime) -> String {
    Timestamp::try_from(t).map_or_else(|_| String::new(), |t| t.to_string())
}

/// Reads a bundle back from the Secret.
pub fn from_secret(secret: &Secret) -> Result<Bundle, IssueError> {
    let data = secret.data.as_ref();
    let text = |key: &'static str| -> Result<String, IssueError> {
        let bytes = data.and_then(|d| d.get(key)).ok_or(IssueError::Field {
            key,
            reason: "missing".into(),
        })?;
        let text = String::from_utf8(bytes.0.clone()).map_err(|_| IssueError::Field {
            key,
            reason: "not UTF-8 PEM".into(),
        })?;
        if !text.contains("-----BEGIN ") {
            return Err(IssueError::Field {
                key,
                reason: "holds no PEM block".into(),
            });
        }
        Ok(text)
    };
    let annotations = secret.metadata.annotations.as_ref();
    let time = |key: &'static str| -> Result<SystemTime, IssueError> {
        let value = annotations
            .and_then(|a| a.get(key))
            .ok_or(IssueError::Field {
                key,
                reason: "missing".into(),
            })?;
        value
            .parse::<Timestamp>()
            .map(SystemTime::from)
            .map_err(|e| IssueError::Field {
                key,
                reason: format!("{value:?} is not an RFC 3339 time: {e}"),
            })
    };
    let names = annotations
        .and_then(|a| a.get(NAMES))
        .map(|n| {
            n.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(Bundle {
        ca_crt: text(CA_CRT)?,
        ca_key: text(CA_KEY)?,
        tls_crt: text(TLS_CRT)?,
        tls_key: text(TLS_KEY)?,
        serving: Serving {
            names,
            not_before: time(NOT_BEFORE)?,
            not_after: time(NOT_AFTER)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{
        RootCertStore,
        client::{WebPkiServerVerifier, danger::ServerCertVerifier},
    };
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn names() -> Vec<String> {
        let mut names = service_names("trimtab-operator", "trimtab-system", "cluster.local");
        names.push("127.0.0.1".into());
        names
    }

    /// Verifies `bundle`'s serving certificate for `name` at `at` against its CA, as a
    /// client (the API server, a sidecar) would.
    fn verify(bundle: &Bundle, name: &str, at: SystemTime) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(bundle.ca_crt.as_bytes()).expect("ca pem"))
            .expect("ca");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
        let leaf = CertificateDer::from_pem_slice(bundle.tls_crt.as_bytes()).expect("leaf pem");
        let name = ServerName::try_from(name.to_owned()).expect("server name");
        let at = UnixTime::since_unix_epoch(
            at.duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970"),
        );
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], at)
            .map(|_| ())
    }

    #[test]
    fn the_serving_certificate_verifies_against_the_ca_for_every_service_name() {
        let now = SystemTime::now();
        let bundle = new_bundle(&names(), now, SERVING_LIFETIME).expect("bundle");
        for name in names() {
            verify(&bundle, &name, now).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(verify(&bundle, "other.example", now).is_err());
        assert!(
            verify(
                &bundle,
                "trimtab-operator.trimtab-system.svc",
                now + 91 * DAY
            )
            .is_err()
        );
    }

    #[test]
    fn a_reissued_certificate_is_signed_by_the_same_ca() {
        let now = SystemTime::now();
        let first = new_bundle(&names(), now, SERVING_LIFETIME).expect("bundle");
        let later = now + 70 * DAY;
        let second = reissue(
            &first.ca_crt,
            &first.ca_key,
            &names(),
            later,
            SERVING_LIFETIME,
        )
        .expect("renewed");
        assert_eq!(second.ca_crt, first.ca_crt);
        assert_ne!(second.tls_crt, first.tls_crt);
        verify(
            &second,
            "trimtab-operator.trimtab-system.svc",
            later + 60 * DAY,
        )
        .expect("the renewed certificate verifies with the CA sidecars already hold");
    }

    #[test]
    fn renewal_starts_with_a_third_of_the_lifetime_left_or_when_names_change() {
        let start = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let serving = Serving {
            names: names(),
            not_before: start,
            not_after: start + 90 * DAY,
        };
        assert_eq!(renewal(&serving, &names(), start + 59 * DAY), None);
        assert_eq!(
            renewal(&serving, &names(), start + 60 * DAY),
            Some(Renewal::Expiring)
        );
        assert_eq!(
            renewal(&serving, &names(), start + 400 * DAY),
            Some(Renewal::Expiring)
        );
        assert_eq!(
            renewal(&serving, &names()[..4], start),
            Some(Renewal::NamesChanged)
        );
    }

    #[test]
    fn a_bundle_survives_the_round_trip_through_the_secret() {
        let bundle = new_bundle(&names(), SystemTime::now(), SERVING_LIFETIME).expect("bundle");
        let secret = to_secret("trimtab-operator-tls", &bundle);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(from_secret(&secret).expect("reads back"), bundle);
        assert!(!format!("{bundle:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn an_incomplete_secret_names_the_missing_key() {
        let mut secret = to_secret(
            "s",
            &new_bundle(&names(), SystemTime::now(), SERVING_LIFETIME).expect("bundle"),
        );
        secret.data.as_mut().expect("data").remove(CA_KEY);
        let error = from_secret(&secret).expect_err("no ca.key").to_string();
        assert_eq!(error, "key ca.key of the TLS Secret: missing");
        let empty: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s"}, "data": {"tls.crt": "", "tls.key": ""}
        }))
        .expect("secret");
        assert!(from_secret(&empty).is_err());
    }
}
