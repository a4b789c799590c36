//! The HTTP client to the providers, and where each provider kind is sent requests.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use trimtab_api::balancer_policy::ProviderKind;

use super::GatewayError;
use crate::http_client::POOL_IDLE_TIMEOUT;

/// The HTTPS (and, for local and test providers, plain HTTP) client to the providers.
pub type ProviderClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The client to the providers, trusting the system's root certificates (the image's
/// CA bundle). Without any, plain-http providers still work and https ones fail at
/// connect with a TLS error naming the certificate.
pub fn provider_client(connect_timeout: Duration) -> Result<ProviderClient, GatewayError> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    // The crypto provider is named, not taken from the process default: which default
    // rustls picks depends on the features other crates enable.
    let ring = || Arc::new(rustls::crypto::ring::default_provider());
    let builder = match hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(ring())
    {
        Ok(builder) => builder,
        Err(e) => {
            tracing::warn!(error = %e, "no system root certificates; https providers will fail");
            let tls = rustls::ClientConfig::builder_with_provider(ring())
                .with_safe_default_protocol_versions()
                .map_err(GatewayError::Tls)?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls)
        }
    };
    let https = builder
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(https))
}

/// The endpoint a provider of `kind` is sent requests at, under `base_url` (the SDKs'
/// convention: OpenAI's base URL includes `/v1`, Anthropic's does not).
pub fn endpoint_url(kind: ProviderKind, base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    match kind {
        ProviderKind::Openai => format!("{base}/chat/completions"),
        ProviderKind::Anthropic => format!("{base}/v1/messages"),
    }
}
