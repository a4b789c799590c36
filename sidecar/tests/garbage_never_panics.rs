//! Bad input anywhere gets an error, never a panic: the parsers of policy files,
//! load-report headers, Retry-After and Connection headers, fed mutated inputs from a
//! fixed seed (a stable, bounded stand-in for a fuzzer that runs in every test run).
#![allow(clippy::unwrap_used)]

use std::{path::Path, time::SystemTime};

use http::{HeaderMap, HeaderValue};
use rand::{Rng, SeedableRng, rngs::StdRng};
use trimtab_api::sidecar_config::SidecarConfig;
use trimtab_sidecar::{
    balancer::weights::parse_orca, config_source::parse_policies, forward::remove_hop_by_hop, retry,
};

const ITERATIONS: usize = 3000;

const POLICY: &str = r#"apiVersion: trimtab.dev/v1alpha1
kind: BalancerPolicy
metadata: {name: shop, namespace: default}
spec:
  clients: {podSelector: {matchLabels: {app: shop}}}
  listener: {port: 15001}
  endpoints: ["127.0.0.1:18081", "[::1]:18082"]
  algorithm: cpuWeighted
  weighting: {maxLoad: 0.7, criticalLoad: 0.9, interval: 1s}
  healthCheck: {path: /healthz, interval: 5s, timeout: 1s}
  outlierDetection: {consecutiveErrors: 3, baseEjectionTime: 10s}
  retries: {attempts: 2, retryOn: [connect-failure, 503], budgetPercent: 20}
  timeouts: {connect: 1s, request: 30s}
"#;

const TOKENS: &[&str] = &[
    ":",
    "-",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\n",
    " ",
    "'",
    "\"",
    "---\n",
    "0",
    "-1",
    "99999999999",
    "1e309",
    "NaN",
    "~",
    "&a",
    "*a",
    "!!binary",
    "ms",
    "h",
    "\u{0}",
    "é",
];

/// `seed` with a few random edits: byte flips, token insertions, truncation.
fn mutate(rng: &mut StdRng, seed: &str) -> String {
    let mut bytes = seed.as_bytes().to_vec();
    for _ in 0..rng.random_range(1..6) {
        let at = rng.random_range(0..=bytes.len());
        match rng.random_range(0..4) {
            0 if at < bytes.len() => bytes[at] = rng.random(),
            1 => {
                let token = TOKENS[rng.random_range(0..TOKENS.len())];
                bytes.splice(at..at, token.bytes());
            }
            2 => bytes.truncate(at),
            _ if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => {}
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn policy_files_never_panic_the_parser() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut accepted = 0;
    for _ in 0..ITERATIONS {
        let text = mutate(&mut rng, POLICY);
        if let Ok(routes) = parse_policies(&text, Path::new("fuzz.yaml")) {
            accepted += 1;
            let config = SidecarConfig { version: 1, routes };
            let _ = config.validate();
        }
    }
    // The mutations are small: some inputs must still parse, or this tests nothing.
    assert!(accepted > 0);
}

#[test]
fn sidecar_config_json_never_panics_validation() {
    let routes = parse_policies(POLICY, Path::new("p.yaml")).unwrap();
    let json = serde_json::to_string(&SidecarConfig { version: 1, routes }).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    for _ in 0..ITERATIONS {
        if let Ok(config) = serde_json::from_str::<SidecarConfig>(&mutate(&mut rng, &json)) {
            let _ = config.validate();
        }
    }
}

#[test]
fn load_report_headers_never_panic() {
    let mut rng = StdRng::seed_from_u64(3);
    for seed in [
        "TEXT cpu_utilization=0.3, rps_fractional=10, eps=1, named_metrics.x=2",
        r#"JSON {"cpu_utilization": 0.3, "application_utilization": 0.5, "rps_fractional": 4}"#,
        "BIN CgkJAAAAAAAA",
    ] {
        for _ in 0..ITERATIONS {
            if let Ok(report) = parse_orca(&mutate(&mut rng, seed)) {
                assert!(
                    report.utilization().is_finite() && report.utilization() >= 0.0,
                    "{report:?}"
                );
            }
        }
    }
}

#[test]
fn retry_after_and_connection_headers_never_panic() {
    let mut rng = StdRng::seed_from_u64(4);
    let now = SystemTime::now();
    let max = std::time::Duration::from_secs(1);
    for _ in 0..ITERATIONS {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&mutate(&mut rng, "Wed, 21 Oct 2015 07:28:00 GMT")) {
            headers.insert(http::header::RETRY_AFTER, v);
        }
        if let Some(wait) = retry::retry_after(&headers, now, max) {
            assert!(wait <= max);
        }
        if let Ok(v) =
            HeaderValue::from_bytes(mutate(&mut rng, "keep-alive, x-hop, upgrade").as_bytes())
        {
            headers.insert(http::header::CONNECTION, v);
        }
        remove_hop_by_hop(&mut headers);
        assert!(!headers.contains_key(http::header::CONNECTION));
    }
}
