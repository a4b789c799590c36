//! The LLM gateway's added latency, as the benchmark asks: time to first byte
//! and to the end of a stream, calling the mock provider directly and through the
//! sidecar (same dialect, and translated OpenAI → Anthropic), p50/p99 over sequential
//! streams; then whole-answer requests per second at a fixed concurrency. Everything on
//! 127.0.0.1, bounded in count and time. Run with
//! `cargo bench -p trimtab-sidecar --bench llm_gateway`; prints Markdown.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use mock_llm::MockProvider;
use trimtab_api::sidecar_config::SidecarConfig;
use trimtab_sidecar::{
    config_source::parse_policies,
    metrics::Metrics,
    sidecar::{Options, Sidecar},
};

const STREAMS: usize = 1000;
const MAX_PHASE: Duration = Duration::from_secs(30);
const CONCURRENCY: usize = 16;
const THROUGHPUT_FOR: Duration = Duration::from_secs(5);

type C = Client<HttpConnector, Full<Bytes>>;

fn body(stream: bool) -> Bytes {
    Bytes::from(
        serde_json::json!({"model": "m", "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": "Say hello in twelve words."}]})
        .to_string(),
    )
}

/// Time to the first body byte and to the end of one request.
async fn one(client: &C, url: &str, payload: Bytes, anthropic: bool) -> (Duration, Duration) {
    let mut req = Request::post(url).header("content-type", "application/json");
    if anthropic {
        req = req.header("anthropic-version", "2023-06-01");
    }
    let started = Instant::now();
    let response = client
        .request(req.body(Full::new(payload)).unwrap())
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let mut body = response.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        if frame.unwrap().data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
            first = Some(started.elapsed());
        }
    }
    (first.unwrap_or_default(), started.elapsed())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn streams(client: &C, url: &str, anthropic: bool) -> (Vec<Duration>, Vec<Duration>) {
    let started = Instant::now();
    let (mut ttft, mut total) = (Vec::new(), Vec::new());
    for _ in 0..STREAMS {
        if started.elapsed() > MAX_PHASE {
            break;
        }
        let (t, all) = one(client, url, body(true), anthropic).await;
        ttft.push(t);
        total.push(all);
    }
    ttft.sort();
    total.sort();
    (ttft, total)
}

async fn throughput(client: &C, url: &str, anthropic: bool) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, done) = (client.clone(), url.to_owned(), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < THROUGHPUT_FOR {
                one(&client, &url, body(false), anthropic).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let mock = MockProvider::start("bench", 0).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let translated = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = format!(
        "kind: BalancerPolicy\nmetadata: {{name: same}}\nspec:\n  clients: {{podSelector: {{}}}}\n  listener: {{port: {port}, protocol: openai}}\n  providers:\n  - {{name: oa, type: openai, baseUrl: \"{}\", model: m, contextWindow: 128000}}\n---\nkind: BalancerPolicy\nmetadata: {{name: translated}}\nspec:\n  clients: {{podSelector: {{}}}}\n  listener: {{port: {translated}, protocol: openai}}\n  providers:\n  - {{name: an, type: anthropic, baseUrl: \"{}\", model: m, contextWindow: 128000}}\n",
        mock.openai_base_url(),
        mock.anthropic_base_url()
    );
    let routes = parse_policies(&yaml, std::path::Path::new("bench.yaml")).unwrap();
    let sidecar = Sidecar::new(
        Options {
            listen_address: "127.0.0.1".parse().unwrap(),
            max_request_body: 8 << 20,
            max_header_bytes: 16 << 10,
            state_dir: None,
        },
        Metrics::new().unwrap(),
    );
    sidecar
        .apply(SidecarConfig { version: 1, routes })
        .await
        .unwrap();
    let client: C = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let direct_openai = format!("{}/chat/completions", mock.openai_base_url());
    let direct_anthropic = format!("{}/v1/messages", mock.anthropic_base_url());
    let via = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let via_translated = format!("http://127.0.0.1:{translated}/v1/chat/completions");

    // Warm the pools and the tokenizers.
    for url in [&direct_openai, &via, &via_translated] {
        for _ in 0..50 {
            one(&client, url, body(true), false).await;
        }
    }
    for _ in 0..50 {
        one(&client, &direct_anthropic, body(true), true).await;
    }

    println!(
        "| path | streams | TTFT p50 ms | TTFT p99 ms | whole stream p50 ms | whole stream p99 ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut rows = Vec::new();
    for (name, url, anthropic) in [
        ("mock OpenAI, direct", &direct_openai, false),
        ("sidecar OpenAI → OpenAI", &via, false),
        ("mock Anthropic, direct", &direct_anthropic, true),
        (
            "sidecar OpenAI → Anthropic (translated)",
            &via_translated,
            false,
        ),
    ] {
        let (ttft, total) = streams(&client, url, anthropic).await;
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            ttft.len(),
            ms(pct(&ttft, 0.5)),
            ms(pct(&ttft, 0.99)),
            ms(pct(&total, 0.5)),
            ms(pct(&total, 0.99))
        );
        rows.push((ttft, total));
    }
    let added = |via: usize, direct: usize, p: f64, total: bool| {
        let pick = |i: usize| if total { &rows[i].1 } else { &rows[i].0 };
        ms(pct(pick(via), p).saturating_sub(pct(pick(direct), p)))
    };
    println!();
    println!(
        "Added by the sidecar (percentile difference): same dialect TTFT p50 {} ms, p99 {} ms, whole stream p99 {} ms; translated TTFT p50 {} ms, p99 {} ms, whole stream p99 {} ms.",
        added(1, 0, 0.5, false),
        added(1, 0, 0.99, false),
        added(1, 0, 0.99, true),
        added(3, 2, 0.5, false),
        added(3, 2, 0.99, false),
        added(3, 2, 0.99, true)
    );
    println!();
    let direct_rps = throughput(&client, &direct_openai, false).await;
    let via_rps = throughput(&client, &via, false).await;
    println!(
        "Whole answers, {CONCURRENCY} concurrent for {THROUGHPUT_FOR:?}: direct {direct_rps:.0} req/s, through the sidecar {via_rps:.0} req/s (client, sidecar and mock share the machine)."
    );
}
