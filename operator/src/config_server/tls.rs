//! The config server's serving certificate (also the webhook's: same port): from files
//! that cert-manager keeps renewed, re-read when they change; from PEM the operator's
//! own TLS Secret holds (`crate::tls_secret`), swapped in through [`CertSwap`] when the
//! Secret changes; or, for a local run, a self-signed one made at start. A rotation
//! never needs a restart.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// How often the certificate files are checked for a renewal.
const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// Why no serving certificate could be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The key does not suit the certificate or the crypto provider.
    #[error("serving key: {0}")]
    Key(rustls::Error),
    /// A self-signed certificate could not be made.
    #[error("self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    /// PEM text that holds no usable certificate or key.
    #[error("PEM {what}: {message}")]
    Pem {
        /// `certificate` or `key`.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the protocol setup.
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
}

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// PEM files, re-read when their modification time changes.
    Files {
        /// Certificate chain, leaf first.
        cert: PathBuf,
        /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// A self-signed certificate for these DNS names and IP addresses.
    SelfSigned(Vec<String>),
    /// PEM text held in memory; later versions arrive through [`Tls::swap`].
    Pem {
        /// Certificate chain, leaf first.
        chain: String,
        /// The leaf's private key.
        key: String,
    },
}

/// A server config, and the PEM of the certificate when it was made here (clients
/// must be given it as their CA).
#[derive(Debug)]
pub struct Tls {
    /// For `tokio_rustls::TlsAcceptor`.
    pub config: Arc<ServerConfig>,
    /// The self-signed certificate, when [`CertSource::SelfSigned`].
    pub self_signed_pem: Option<String>,
    /// Replaces the certificate being served.
    pub swap: CertSwap,
}

/// A handle that replaces the certificate a server config presents, for the next
/// handshakes; open connections keep theirs.
#[derive(Clone, Debug)]
pub struct CertSwap {
    resolver: Arc<Resolver>,
    provider: Arc<CryptoProvider>,
    current: Arc<std::sync::Mutex<(String, String)>>,
}

impl CertSwap {
    /// Serves `chain` with `key` (PEM) from now on; `Ok(false)` when they are the ones
    /// already served. A pair that does not load leaves the current one serving.
    pub fn replace(&self, chain: &str, key: &str) -> Result<bool, TlsError> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0 == chain && current.1 == key {
            return Ok(false);
        }
        let certified = from_pem(&self.provider, chain, key)?;
        self.resolver.0.store(Arc::new(certified));
        *current = (chain.to_owned(), key.to_owned());
        Ok(true)
    }
}

/// Builds the server config; with files, starts the task that picks up renewals.
pub fn server_config(source: &CertSource) -> Result<Tls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (key, self_signed_pem) = match source {
        CertSource::Files { cert, key } => (load(&provider, cert, key)?, None),
        CertSource::SelfSigned(names) => {
            let made = rcgen::generate_simple_self_signed(names.clone())?;
            let cert = CertificateDer::from(made.cert.der().to_vec());
            let key = PrivateKeyDer::try_from(made.signing_key.serialize_der()).map_err(|e| {
                TlsError::Key(rustls::Error::General(format!("generated key: {e}")))
            })?;
            let certified =
                CertifiedKey::from_der(vec![cert], key, &provider).map_err(TlsError::Key)?;
            (certified, Some(made.cert.pem()))
        }
        CertSource::Pem { chain, key } => (from_pem(&provider, chain, key)?, None),
    };
    let resolver = Arc::new(Resolver(ArcSwap::from_pointee(key)));
    let (swap_resolver, swap_provider) = (Arc::clone(&resolver), Arc::clone(&provider));
    if let CertSource::Files { cert, key } = source {
        tokio::spawn(reload(
            Arc::clone(&resolver),
            Arc::clone(&provider),
            cert.clone(),
            key.clone(),
        ));
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let served = match source {
        CertSource::Pem { chain, key } => (chain.clone(), key.clone()),
        _ => Default::default(),
    };
    Ok(Tls {
        config: Arc::new(config),
        self_signed_pem,
        swap: CertSwap {
            resolver: swap_resolver,
            provider: swap_provider,
            current: Arc::new(std::sync::Mutex::new(served)),
        },
    })
}

/// A certified key from PEM text.
fn from_pem(
    provider: &Arc<CryptoProvider>,
    chain: &str,
    key: &str,
) -> Result<CertifiedKey, TlsError> {
    let pem_error = |what: &str, message: String| TlsError::Pem {
        what: what.to_owned(),
        message,
    };
    let certificates = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("certificate", e.to_string()))?;
    if certificates.is_empty() {
        return Err(pem_error("certificate", "no CERTIFICATE block".into()));
    }
    let private = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| pem_error("key", e.to_string()))?;
    CertifiedKey::from_der(certificates, private, provider).map_err(TlsError::Key)
}

fn load(provider: &Arc<CryptoProvider>, cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let file_error = |path: &Path, message: String| TlsError::File {
        path: path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(file_error(cert, "no CERTIFICATE block".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e.to_string()))?;
    CertifiedKey::from_der(chain, private, provider).map_err(TlsError::Key)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Swaps in renewed files; a half-written or broken renewal keeps the old certificate.
async fn reload(
    resolver: Arc<Resolver>,
    provider: Arc<CryptoProvider>,
    cert: PathBuf,
    key: PathBuf,
) {
    let mut seen = (modified(&cert), modified(&key));
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        let now = (modified(&cert), modified(&key));
        if now == seen {
            continue;
        }
        match load(&provider, &cert, &key) {
            Ok(certified) => {
                resolver.0.store(Arc::new(certified));
                seen = now;
                tracing::info!(cert = %cert.display(), "serving certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewed certificate not loaded; keeping the current one")
            }
        }
    }
}

#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().expect("dir");
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        let source = CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        };
        let error = server_config(&source).expect_err("no files").to_string();
        assert!(error.contains("tls.crt"), "{error}");

        std::fs::write(&cert, "not pem").expect("write");
        let error = server_config(&source).expect_err("empty").to_string();
        assert!(
            error.contains("tls.crt") && error.contains("no CERTIFICATE"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn files_written_from_a_generated_pair_load() {
        let dir = tempfile::tempdir().expect("dir");
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        std::fs::write(&cert, made.cert.pem()).expect("write");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write");
        let tls = server_config(&CertSource::Files { cert, key }).expect("loads");
        assert!(tls.self_signed_pem.is_none());
        assert_eq!(tls.config.alpn_protocols[0], b"h2");
    }

    #[tokio::test]
    async fn a_swapped_certificate_is_served_and_a_broken_one_refused() {
        let pair = |name: &str| {
            let made = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("cert");
            (made.cert.pem(), made.signing_key.serialize_pem())
        };
        let (chain, key) = pair("first");
        let tls = server_config(&CertSource::Pem {
            chain: chain.clone(),
            key: key.clone(),
        })
        .expect("loads");
        assert!(
            !tls.swap.replace(&chain, &key).expect("same pair"),
            "unchanged"
        );
        let (chain2, key2) = pair("second");
        assert!(tls.swap.replace(&chain2, &key2).expect("new pair"));
        let served = tls.swap.resolver.0.load_full();
        assert_eq!(
            served.cert[0].as_ref(),
            CertificateDer::from_pem_slice(chain2.as_bytes())
                .expect("pem")
                .as_ref()
        );
        let error = tls.swap.replace("not pem", &key2).expect_err("broken");
        assert!(error.to_string().starts_with("PEM certificate"), "{error}");
        assert!(Arc::ptr_eq(&served, &tls.swap.resolver.0.load_full()));
    }
}
