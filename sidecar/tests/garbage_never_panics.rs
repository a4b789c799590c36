//! Bad input anywhere gets an error, never a panic: the parsers of policy files,
//! load-report headers, Retry-After and Connection headers, endpoints' responses
//! (head and chunked body), and the LLM gateway's
//! request decoding, translation, fitting, rate-limit headers and stream mapping, fed
//! mutated inputs from a fixed seed (a stable, bounded stand-in for a fuzzer that runs
//! in every test run).
#![allow(clippy::unwrap_used)]

use std::{path::Path, time::SystemTime};

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue, Method};
use rand::{Rng, SeedableRng, rngs::StdRng};
use trimtab_api::{balancer_policy::ProviderKind, sidecar_config::SidecarConfig};
use trimtab_sidecar::{
    balancer::weights::parse_orca,
    config_source::parse_policies,
    forward::remove_hop_by_hop,
    http_client::framing::{BodyLength, Chunk, ChunkedDecoder, parse_response_head},
    llm::{
        anthropic,
        decode::decode,
        fitting::{self, Encoding, TokenCounter},
        openai, routing,
        stream::{OpenAiStreamOptions, StreamMapper},
        translate,
    },
    retry,
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

#[test]
fn upstream_responses_never_panic_the_framing() {
    let mut rng = StdRng::seed_from_u64(5);
    for seed in [
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;x=1\r\n, world\r\n0\r\nGrpc-Status: 0\r\n\r\n",
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nContent-Length: 2, 2\r\nConnection: keep-alive\r\n\r\nok",
    ] {
        for _ in 0..ITERATIONS {
            let garbage = mutate(&mut rng, seed);
            let step = rng.random_range(1..=garbage.len().max(1));
            let mut buffer = BytesMut::new();
            let mut pieces = garbage.as_bytes().chunks(step);
            let head = loop {
                match parse_response_head(&mut buffer, &Method::GET) {
                    Ok(Some(head)) => break Some(head),
                    Ok(None) => match pieces.next() {
                        Some(piece) => buffer.extend_from_slice(piece),
                        None => break None,
                    },
                    Err(e) => {
                        assert!(!e.to_string().is_empty());
                        break None;
                    }
                }
            };
            let Some(head) = head else { continue };
            if head.body != BodyLength::Chunked {
                continue;
            }
            let mut decoder = ChunkedDecoder::default();
            let mut decoded = 0;
            loop {
                match decoder.decode(&mut buffer) {
                    Ok(Chunk::Data(data)) => decoded += data.len(),
                    Ok(Chunk::Incomplete) => match pieces.next() {
                        Some(piece) => buffer.extend_from_slice(piece),
                        None => break,
                    },
                    Ok(Chunk::End | Chunk::Trailers(_)) | Err(_) => break,
                }
            }
            assert!(decoded <= garbage.len());
        }
    }
}

const OPENAI_REQUEST: &str = r#"{"model":"gpt-4o","stream":true,"n":1,"temperature":1.5,"stop":"END",
"messages":[{"role":"system","content":"Be brief."},
{"role":"user","content":[{"type":"text","text":"Weather?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBO"}}]},
{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"w","arguments":"{\"city\":\"Oslo\"}"}}]},
{"role":"tool","tool_call_id":"call_1","content":"-3C","trimtab":{"priority":2}},
{"role":"user","content":"Thanks","trimtab":{"pinned":true}}],
"tools":[{"type":"function","function":{"name":"w","parameters":{"type":"object"}}}],
"tool_choice":"required","parallel_tool_calls":false}"#;

const ANTHROPIC_REQUEST: &str = r#"{"model":"claude","max_tokens":100,"stream":true,
"system":[{"type":"text","text":"Be brief.","cache_control":{"type":"ephemeral"}}],
"messages":[{"role":"user","content":[{"type":"text","text":"Weather?"},{"type":"image","source":{"type":"url","url":"https://x/y.png"}}]},
{"role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"w","input":{"city":"Oslo"}}]},
{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"-3C","is_error":false},{"type":"text","text":"Thanks"}]}],
"tools":[{"name":"w","input_schema":{"type":"object"}}],"tool_choice":{"type":"any"}}"#;

#[test]
fn llm_requests_never_panic_decoding_translation_or_fitting() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut openai_counter = TokenCounter::new(Encoding::O200kBase).unwrap();
    let mut anthropic_counter = TokenCounter::new(Encoding::AnthropicEstimate).unwrap();
    let (mut decoded, mut translated) = (0, 0);
    for _ in 0..ITERATIONS {
        let text = mutate(&mut rng, OPENAI_REQUEST);
        let hints = fitting::message_hints(text.as_bytes()).unwrap_or_default();
        if let Ok(req) = decode::<openai::ChatRequest>(text.as_bytes()) {
            decoded += 1;
            let (mut fit, fixed) = fitting::openai_messages(&req, &mut openai_counter);
            fitting::apply_hints(&mut fit, &hints);
            if let Ok(plan) = fitting::evict_by_priority(&fit, fixed, 60, 1) {
                let mut fitted = req.clone();
                fitting::apply_openai(&mut fitted, &plan, &fit);
            }
            if let Ok(out) = translate::openai_to_anthropic_request(&req, "claude", 1024) {
                translated += 1;
                serde_json::to_vec(&out).unwrap();
            }
        }
        let text = mutate(&mut rng, ANTHROPIC_REQUEST);
        if let Ok(req) = decode::<anthropic::MessagesRequest>(text.as_bytes()) {
            decoded += 1;
            let (fit, fixed) = fitting::anthropic_messages(&req, &mut anthropic_counter);
            if let Ok(plan) = fitting::evict_by_priority(&fit, fixed, 30, 1) {
                let mut fitted = req.clone();
                fitting::apply_anthropic(&mut fitted, &plan, &fit);
            }
            if let Ok(out) = translate::anthropic_to_openai_request(&req, "gpt-4o") {
                translated += 1;
                serde_json::to_vec(&out).unwrap();
            }
        }
    }
    assert!(
        decoded > 0 && translated > 0,
        "{decoded} decoded, {translated} translated"
    );
}

#[test]
fn llm_provider_errors_and_rate_limit_headers_never_panic() {
    let mut rng = StdRng::seed_from_u64(6);
    let now = SystemTime::now();
    for _ in 0..ITERATIONS {
        let body = mutate(
            &mut rng,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
            let e = translate::classify_provider_error(
                kind,
                rng.random_range(400..600),
                body.as_bytes(),
            );
            let (status, _) = translate::render_error(ProviderKind::Openai, e.kind, &e.message);
            assert!((400..600).contains(&status));
        }
        let mut headers = HeaderMap::new();
        for (name, seed) in [
            ("x-ratelimit-remaining-tokens", "30000"),
            ("x-ratelimit-reset-tokens", "6m0.5s"),
            ("anthropic-ratelimit-tokens-remaining", "8000"),
            (
                "anthropic-ratelimit-tokens-reset",
                "2025-01-15T10:30:40.25+01:00",
            ),
        ] {
            if let Ok(v) = HeaderValue::from_str(&mutate(&mut rng, seed)) {
                headers.insert(name, v);
            }
        }
        for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
            let _ = routing::parse_rate_limits(kind, &headers, now);
        }
        let _ = routing::parse_rfc3339(&mutate(&mut rng, "2025-01-15T10:30:40Z"));
    }
}

#[test]
fn llm_streams_never_panic_the_stream_mapper() {
    let anthropic_stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"w\",\"input\":{}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{}\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":9}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let openai_stream = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\",\"tool_calls\":[{\"index\":0,\"id\":\"a\",\"type\":\"function\",\"function\":{\"name\":\"w\",\"arguments\":\"{}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\ndata: [DONE]\n\n";
    let mut rng = StdRng::seed_from_u64(7);
    let options = OpenAiStreamOptions {
        created: 1,
        include_usage: true,
    };
    for _ in 0..ITERATIONS {
        for (provider, app, seed) in [
            (
                ProviderKind::Anthropic,
                ProviderKind::Openai,
                anthropic_stream,
            ),
            (ProviderKind::Openai, ProviderKind::Anthropic, openai_stream),
        ] {
            let input = mutate(&mut rng, seed);
            let mut mapper = StreamMapper::new(provider, app, "m", options.clone());
            let chunk = rng.random_range(1..64);
            for part in input.as_bytes().chunks(chunk) {
                let _ = mapper.push(part);
            }
            let _ = mapper.finish();
            assert!(mapper.is_done());
        }
    }
}
