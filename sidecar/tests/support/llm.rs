//! LLM gateway helpers: a gateway on a free port in front of mock providers, resolved
//! from policy YAML exactly as a local run resolves it.

use std::{path::Path, sync::Arc};

use mock_llm::MockProvider;
use trimtab_sidecar::{config_source::parse_policies, metrics::Metrics, sidecar::Sidecar};

use super::{free_port, options};

pub const OPENAI_KEY: &str = "sk-test-openai-provider";
pub const ANTHROPIC_KEY: &str = "sk-ant-test-provider";

/// One provider of a test policy.
pub struct P<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub mock: &'a MockProvider,
    pub window: u64,
}

pub fn p<'a>(name: &'a str, kind: &'a str, mock: &'a MockProvider) -> P<'a> {
    P {
        name,
        kind,
        mock,
        window: 128_000,
    }
}

/// A gateway on a free port serving `providers` to an app of dialect `app`, with keys in
/// files under `keys`, and `extra` YAML under `spec:` (routing, failover, …).
pub struct Gateway {
    pub port: u16,
    pub sidecar: Arc<Sidecar>,
    pub keys: tempfile::TempDir,
}

pub async fn gateway(app: &str, providers: &[P<'_>], extra: &str) -> Gateway {
    let keys = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut yaml = format!(
        "apiVersion: trimtab.dev/v1alpha1\nkind: BalancerPolicy\nmetadata: {{name: llm, namespace: test}}\nspec:\n  clients: {{podSelector: {{}}}}\n  listener: {{port: {port}, protocol: {app}}}\n  providers:\n"
    );
    for provider in providers {
        let (base, key) = match provider.kind {
            "openai" => (provider.mock.openai_base_url(), OPENAI_KEY),
            _ => (provider.mock.anthropic_base_url(), ANTHROPIC_KEY),
        };
        let file = keys.path().join(provider.name);
        std::fs::write(&file, format!("{key}\n")).unwrap();
        provider.mock.update(|b| b.expected_key = Some(key.into()));
        yaml.push_str(&format!(
            "  - {{name: {}, type: {}, baseUrl: \"{base}\", model: {}-model, contextWindow: {}, modelAliases: {{app-model: {}-aliased}}, apiKey: {{file: \"{}\"}}}}\n",
            provider.name,
            provider.kind,
            provider.kind,
            provider.window,
            provider.kind,
            file.display()
        ));
    }
    yaml.push_str(extra);
    let routes = parse_policies(&yaml, Path::new("test.yaml")).unwrap();
    let sidecar = Sidecar::new(options(), Metrics::new().unwrap());
    sidecar
        .apply(trimtab_api::sidecar_config::SidecarConfig { version: 1, routes })
        .await
        .unwrap();
    Gateway {
        port,
        sidecar,
        keys,
    }
}

/// Priority routing, so the first provider is the primary; failover on everything.
pub const PRIORITY: &str = "  routing: {strategy: priority}\n  failover: {failoverOn: [429, 5xx, timeout, connect-failure, reset], maxAttempts: 3, firstByteTimeout: 2s, budgetPercent: 100}\n";
