//! The LLM gateway end to end on loopback: an application speaking one dialect, the
//! sidecar, and mock OpenAI and Anthropic providers that can be told to misbehave.
//! Every loop is bounded in count and time.
#![allow(clippy::unwrap_used)]

mod support;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use mock_llm::{Failure, MockProvider, TOOL_ARGUMENTS};
use serde_json::{Value, json};
use support::{
    TestClient, client, free_port,
    llm::{ANTHROPIC_KEY, OPENAI_KEY, PRIORITY, gateway, p},
};
use trimtab_sidecar::{config_source::parse_policies, metrics::Metrics, sidecar::Sidecar};

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn provider(&self) -> &str {
        self.headers
            .get("x-trimtab-provider")
            .map_or("", |v| v.to_str().unwrap())
    }

    /// The SSE events as (event name, data).
    fn events(&self) -> Vec<(String, String)> {
        self.body
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let mut name = String::new();
                let mut data = String::new();
                for line in e.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                (name, data)
            })
            .collect()
    }
}

async fn post(
    client: &TestClient,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> Answer {
    let mut request = Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
        .await
        .expect("the gateway answered within 20 s")
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(20), response.into_body().collect())
        .await
        .expect("the body ended within 20 s")
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

const OPENAI_PATH: &str = "/v1/chat/completions";
const ANTHROPIC_PATH: &str = "/v1/messages";
/// What an app's SDK sends as its own credentials; the gateway must never forward it.
const APP_OPENAI_AUTH: (&str, &str) = ("authorization", "Bearer app-key-must-not-leak");
const APP_ANTHROPIC_AUTH: (&str, &str) = ("x-api-key", "app-key-must-not-leak");

fn openai_request(stream: bool, tools: bool) -> Value {
    let mut r = json!({
        "model": "app-model",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the weather in Paris?"}
        ],
        "max_tokens": 100,
        "stream": stream,
    });
    if stream {
        r["stream_options"] = json!({"include_usage": true});
    }
    if tools {
        r["tools"] = json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    }
    r
}

fn anthropic_request(stream: bool, tools: bool) -> Value {
    let mut r = json!({
        "model": "app-model",
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": 100,
        "stream": stream,
    });
    if tools {
        r["tools"] = json!([{"name": "get_weather", "description": "Weather of a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    }
    r
}

/// The text of an OpenAI stream, its finish reason, and the tool-call arguments.
fn openai_stream_summary(answer: &Answer) -> (String, String, String, bool) {
    let mut text = String::new();
    let mut finish = String::new();
    let mut arguments = String::new();
    let mut done = false;
    for (_, data) in answer.events() {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
        assert!(chunk.get("error").is_none(), "error chunk: {data}");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(choice) = chunk["choices"].get(0) {
            if let Some(t) = choice["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(calls) = choice["delta"]["tool_calls"].as_array() {
                for c in calls {
                    if let Some(a) = c["function"]["arguments"].as_str() {
                        arguments.push_str(a);
                    }
                }
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = f.to_owned();
            }
        }
    }
    (text, finish, arguments, done)
}

/// The text of an Anthropic stream, its stop reason and the tool input JSON.
fn anthropic_stream_summary(answer: &Answer) -> (String, String, String, Vec<String>) {
    let mut text = String::new();
    let mut stop = String::new();
    let mut input = String::new();
    let mut names = Vec::new();
    for (name, data) in answer.events() {
        let event: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
        assert_eq!(event["type"], name.as_str(), "event name and type agree");
        match name.as_str() {
            "content_block_delta" => {
                if let Some(t) = event["delta"]["text"].as_str() {
                    text.push_str(t);
                }
                if let Some(j) = event["delta"]["partial_json"].as_str() {
                    input.push_str(j);
                }
            }
            "message_delta" => stop = event["delta"]["stop_reason"].as_str().unwrap().to_owned(),
            _ => {}
        }
        names.push(name);
    }
    (text, stop, input, names)
}

#[tokio::test]
async fn openai_app_to_openai_provider_plain_stream_and_tool_calls() {
    let mock = MockProvider::start("oa", 0).await.unwrap();
    let gw = gateway("openai", &[p("oa", "openai", &mock)], PRIORITY).await;
    let c = client();

    let a = post(
        &c,
        gw.port,
        OPENAI_PATH,
        &[APP_OPENAI_AUTH],
        openai_request(false, false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let j = a.json();
    assert_eq!(j["object"], "chat.completion");
    assert!(
        j["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("Hello from oa")
    );
    assert_eq!(a.provider(), "oa");
    // The alias was applied and the provider's key replaced the app's.
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.body["model"], "openai-aliased");
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {OPENAI_KEY}").as_str()
    );
    assert!(seen.headers.get("x-api-key").is_none());

    let a = post(
        &c,
        gw.port,
        OPENAI_PATH,
        &[APP_OPENAI_AUTH],
        openai_request(true, false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.headers["content-type"], "text/event-stream");
    let (text, finish, _, done) = openai_stream_summary(&a);
    assert!(text.starts_with("Hello from oa"), "{text}");
    assert_eq!((finish.as_str(), done), ("stop", true));

    let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(false, true)).await;
    let call = &a.json()["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], TOOL_ARGUMENTS);
    let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(true, true)).await;
    let (_, finish, arguments, done) = openai_stream_summary(&a);
    assert_eq!(
        (finish.as_str(), arguments.as_str(), done),
        ("tool_calls", TOOL_ARGUMENTS, true)
    );
}

#[tokio::test]
async fn openai_app_to_anthropic_provider_is_translated_both_ways() {
    let mock = MockProvider::start("an", 0).await.unwrap();
    let gw = gateway("openai", &[p("an", "anthropic", &mock)], PRIORITY).await;
    let c = client();

    let a = post(
        &c,
        gw.port,
        OPENAI_PATH,
        &[APP_OPENAI_AUTH],
        openai_request(false, false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let j = a.json();
    assert_eq!(j["object"], "chat.completion");
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
    assert!(
        j["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("Hello from an")
    );
    assert!(j["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.body["model"], "anthropic-aliased");
    assert_eq!(seen.body["system"][0]["text"], "You are terse.");
    assert_eq!(seen.body["max_tokens"], 100);
    assert_eq!(seen.headers["x-api-key"], ANTHROPIC_KEY);
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert!(seen.headers.get("authorization").is_none());

    let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(true, false)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let (text, finish, _, done) = openai_stream_summary(&a);
    assert!(text.starts_with("Hello from an"), "{text}");
    assert_eq!((finish.as_str(), done), ("stop", true));
    // include_usage was asked: a last chunk with usage and no choices.
    let usage = a
        .events()
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .find(|c| c["choices"].as_array().is_some_and(Vec::is_empty));
    assert!(
        usage.unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(false, true)).await;
    let j = a.json();
    assert_eq!(j["choices"][0]["finish_reason"], "tool_calls");
    let call = &j["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, serde_json::from_str::<Value>(TOOL_ARGUMENTS).unwrap());
    let tool_id = call["id"].as_str().unwrap().to_owned();
    // The tool result goes back with the same id, as an Anthropic tool_result block.
    let mut follow_up = openai_request(false, true);
    follow_up["messages"].as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": null, "tool_calls": [call]}),
        json!({"role": "tool", "tool_call_id": tool_id, "content": "18 degrees"}),
    ]);
    let a = post(&c, gw.port, OPENAI_PATH, &[], follow_up).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let seen = mock.last_request().unwrap();
    let blocks = seen.body["messages"].as_array().unwrap().last().unwrap()["content"].clone();
    assert_eq!(blocks[0]["type"], "tool_result");
    assert_eq!(blocks[0]["tool_use_id"], tool_id.as_str());

    let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(true, true)).await;
    let (_, finish, arguments, done) = openai_stream_summary(&a);
    assert_eq!(finish, "tool_calls");
    assert!(done);
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).unwrap(),
        serde_json::from_str::<Value>(TOOL_ARGUMENTS).unwrap()
    );
}

#[tokio::test]
async fn anthropic_app_to_openai_provider_is_translated_both_ways() {
    let mock = MockProvider::start("oa", 0).await.unwrap();
    let gw = gateway("anthropic", &[p("oa", "openai", &mock)], PRIORITY).await;
    let c = client();
    let headers = [APP_ANTHROPIC_AUTH, ("anthropic-version", "2023-06-01")];

    let a = post(
        &c,
        gw.port,
        ANTHROPIC_PATH,
        &headers,
        anthropic_request(false, false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let j = a.json();
    assert_eq!(j["type"], "message");
    assert_eq!(j["stop_reason"], "end_turn");
    assert!(
        j["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Hello from oa")
    );
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.body["messages"][0]["role"], "system");
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {OPENAI_KEY}").as_str()
    );
    assert!(seen.headers.get("x-api-key").is_none());

    let a = post(
        &c,
        gw.port,
        ANTHROPIC_PATH,
        &headers,
        anthropic_request(true, false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let (text, stop, _, names) = anthropic_stream_summary(&a);
    assert!(text.starts_with("Hello from oa"), "{text}");
    assert_eq!(stop, "end_turn");
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));

    let a = post(
        &c,
        gw.port,
        ANTHROPIC_PATH,
        &headers,
        anthropic_request(false, true),
    )
    .await;
    let j = a.json();
    assert_eq!(j["stop_reason"], "tool_use");
    assert_eq!(j["content"][0]["type"], "tool_use");
    assert_eq!(j["content"][0]["name"], "get_weather");
    assert_eq!(j["content"][0]["input"]["city"], "Paris");

    let a = post(
        &c,
        gw.port,
        ANTHROPIC_PATH,
        &headers,
        anthropic_request(true, true),
    )
    .await;
    let (_, stop, input, _) = anthropic_stream_summary(&a);
    assert_eq!(stop, "tool_use");
    assert_eq!(
        serde_json::from_str::<Value>(&input).unwrap(),
        serde_json::from_str::<Value>(TOOL_ARGUMENTS).unwrap()
    );
}

#[tokio::test]
async fn anthropic_app_to_anthropic_provider_accepts_bearer_or_x_api_key() {
    let mock = MockProvider::start("an", 0).await.unwrap();
    let gw = gateway("anthropic", &[p("an", "anthropic", &mock)], PRIORITY).await;
    let c = client();
    // The newest SDKs send Authorization: Bearer, older ones x-api-key: both are replaced.
    for auth in [("authorization", "Bearer app-key"), APP_ANTHROPIC_AUTH] {
        let a = post(
            &c,
            gw.port,
            "/v1/messages",
            &[auth, ("anthropic-version", "2024-10-22")],
            anthropic_request(false, true),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.json()["content"][0]["type"], "tool_use");
        let seen = mock.last_request().unwrap();
        assert_eq!(seen.headers["x-api-key"], ANTHROPIC_KEY);
        assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
        assert!(seen.headers.get("authorization").is_none());
    }
    let a = post(
        &c,
        gw.port,
        "/v1/messages",
        &[],
        anthropic_request(true, false),
    )
    .await;
    let (text, stop, _, names) = anthropic_stream_summary(&a);
    assert!(text.starts_with("Hello from an"));
    assert_eq!(stop, "end_turn");
    assert!(
        names.contains(&"ping".to_owned()),
        "same dialect passes pings on"
    );
}

async fn zero_errors_while_primary(failure: Failure) {
    let primary = MockProvider::start("primary", 0).await.unwrap();
    let backup = MockProvider::start("backup", 0).await.unwrap();
    let gw = gateway(
        "openai",
        &[
            p("primary", "anthropic", &primary),
            p("backup", "openai", &backup),
        ],
        PRIORITY,
    )
    .await;
    primary.update(|b| b.fail = Some(failure));
    let c = client();
    let started = Instant::now();
    let mut errors = Vec::new();
    for i in 0..40 {
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
        let a = post(
            &c,
            gw.port,
            OPENAI_PATH,
            &[],
            openai_request(i % 2 == 0, false),
        )
        .await;
        let ok = a.status == 200 && a.provider() == "backup" && !a.body.contains("\"error\"");
        if !ok {
            errors.push(format!("{}: {}", a.status, a.body));
        }
    }
    assert!(errors.is_empty(), "{failure:?}: the app saw {errors:?}");
    assert!(backup.requests() >= 40, "every request reached the backup");
    assert!(primary.requests() >= 1, "the primary was tried");
}

#[tokio::test]
async fn primary_429_means_zero_errors_at_the_app() {
    zero_errors_while_primary(Failure::RateLimited {
        retry_after_secs: 1,
    })
    .await;
}

#[tokio::test]
async fn primary_529_means_zero_errors_at_the_app() {
    zero_errors_while_primary(Failure::Overloaded).await;
}

#[tokio::test]
async fn primary_500_means_zero_errors_at_the_app() {
    zero_errors_while_primary(Failure::ServerError).await;
}

#[tokio::test]
async fn primary_dropping_connections_means_zero_errors_at_the_app() {
    zero_errors_while_primary(Failure::DropConnection).await;
}

#[tokio::test]
async fn primary_sending_malformed_json_means_zero_errors_at_the_app() {
    // A whole answer that is not JSON is caught before anything reaches the app; (a
    // stream's malformed event after the first byte is tested below as a cut stream).
    let primary = MockProvider::start("primary", 0).await.unwrap();
    let backup = MockProvider::start("backup", 0).await.unwrap();
    let gw = gateway(
        "openai",
        &[
            p("primary", "openai", &primary),
            p("backup", "openai", &backup),
        ],
        PRIORITY,
    )
    .await;
    primary.update(|b| b.fail = Some(Failure::MalformedJson));
    let c = client();
    for _ in 0..10 {
        let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(false, false)).await;
        assert_eq!((a.status, a.provider()), (200, "backup"), "{}", a.body);
    }
}

#[tokio::test]
async fn low_rate_limit_headroom_moves_traffic_before_a_429() {
    let primary = MockProvider::start("primary", 0).await.unwrap();
    let backup = MockProvider::start("backup", 0).await.unwrap();
    let gw = gateway(
        "anthropic",
        &[
            p("primary", "anthropic", &primary),
            p("backup", "openai", &backup),
        ],
        PRIORITY,
    )
    .await;
    // 10 of 1000 requests left: under 5%, so the primary is used only when nothing else is.
    primary.update(|b| b.remaining_requests = Some(10));
    let c = client();
    let mut providers = Vec::new();
    for _ in 0..10 {
        let a = post(
            &c,
            gw.port,
            ANTHROPIC_PATH,
            &[("anthropic-beta", "some-beta")],
            anthropic_request(false, false),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        providers.push(a.provider().to_owned());
    }
    assert_eq!(
        providers[0], "primary",
        "the headers arrive with the first answer"
    );
    assert_eq!(primary.requests(), 1, "then traffic moved: {providers:?}");
    assert_eq!(
        primary.last_request().unwrap().headers["anthropic-beta"],
        "some-beta",
        "an Anthropic app's beta header reaches an Anthropic provider"
    );
    assert!(
        backup
            .last_request()
            .unwrap()
            .headers
            .get("anthropic-beta")
            .is_none()
    );
}

#[tokio::test]
async fn a_stall_before_the_first_byte_fails_over_after_first_byte_timeout() {
    let primary = MockProvider::start("primary", 0).await.unwrap();
    let backup = MockProvider::start("backup", 0).await.unwrap();
    let gw = gateway(
        "openai",
        &[
            p("primary", "openai", &primary),
            p("backup", "anthropic", &backup),
        ],
        "  routing: {strategy: priority}\n  failover: {maxAttempts: 2, firstByteTimeout: 300ms}\n",
    )
    .await;
    primary.update(|b| b.ttft_ms = 60_000);
    let c = client();
    let started = Instant::now();
    let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(true, false)).await;
    assert_eq!((a.status, a.provider()), (200, "backup"), "{}", a.body);
    assert!(openai_stream_summary(&a).3, "a complete stream");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn traffic_follows_a_5x_ttft_degradation_and_comes_back_without_flapping() {
    let primary = MockProvider::start("primary", 0).await.unwrap();
    let other = MockProvider::start("other", 0).await.unwrap();
    let gw = gateway(
        "openai",
        &[p("primary", "openai", &primary), p("other", "anthropic", &other)],
        // 5% exploration keeps the unused provider's estimate fresh: the move and the way
        // back both depend on it (at 2% a stale estimate held traffic past 10 s on a busy
        // machine). The ≥ 90% checks below count 100 requests, so more than 10
        // explorations among them is a ~1% chance, not the ~5% of 40.
        "  routing: {strategy: lowestLatency, signal: ttft, halfLife: 1s, switchMargin: 0.2, exploration: 0.05}\n",
    )
    .await;
    primary.update(|b| b.ttft_ms = 20);
    other.update(|b| b.ttft_ms = 50);
    let c = client();

    // Sends requests until 18 of the last 20 went to `to` (at most `limit`); returns
    // how long that took and the providers of the next 100 requests.
    async fn until_moved(
        c: &TestClient,
        port: u16,
        to: &str,
        limit: Duration,
    ) -> (Duration, Vec<String>) {
        let started = Instant::now();
        let mut recent: Vec<String> = Vec::new();
        while started.elapsed() < limit {
            let a = post(c, port, OPENAI_PATH, &[], openai_request(false, false)).await;
            assert_eq!(a.status, 200, "{}", a.body);
            recent.push(a.provider().to_owned());
            let last: Vec<&String> = recent.iter().rev().take(20).collect();
            if last.len() == 20 && last.iter().filter(|p| p.as_str() == to).count() >= 18 {
                break;
            }
        }
        let moved_after = started.elapsed();
        let mut next = Vec::new();
        for _ in 0..100 {
            let a = post(c, port, OPENAI_PATH, &[], openai_request(false, false)).await;
            next.push(a.provider().to_owned());
        }
        (moved_after, next)
    }
    let share = |v: &[String], name: &str| {
        v.iter().filter(|p| p.as_str() == name).count() as f64 / v.len() as f64
    };

    let (_, steady) = until_moved(&c, gw.port, "primary", Duration::from_secs(10)).await;
    assert!(share(&steady, "primary") >= 0.9, "before: {steady:?}");

    primary.update(|b| b.ttft_ms = 100); // 5x
    let (moved, after) = until_moved(&c, gw.port, "other", Duration::from_secs(10)).await;
    eprintln!("moved to the other provider in {moved:?}");
    assert!(
        moved < Duration::from_secs(10),
        "still on the primary after {moved:?}"
    );
    assert!(
        share(&after, "other") >= 0.9,
        "after degradation: {after:?}"
    );

    primary.update(|b| b.ttft_ms = 20);
    let (back, recovered) = until_moved(&c, gw.port, "primary", Duration::from_secs(15)).await;
    eprintln!("came back to the primary in {back:?}");
    assert!(
        share(&recovered, "primary") >= 0.9,
        "after recovery: {recovered:?}"
    );
}

#[tokio::test]
async fn a_garbage_request_is_a_400_naming_the_field_in_the_apps_dialect() {
    let mock = MockProvider::start("oa", 0).await.unwrap();
    let gw = gateway("openai", &[p("oa", "openai", &mock)], PRIORITY).await;
    let c = client();
    let a = post(
        &c,
        gw.port,
        OPENAI_PATH,
        &[],
        json!({"model": "m", "messages": [{"role": "user", "content": 42}]}),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    let j = a.json();
    assert_eq!(j["error"]["type"], "invalid_request_error");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[0]"),
        "{}",
        a.body
    );
    let a = post(&c, gw.port, OPENAI_PATH, &[], json!({"messages": []})).await;
    assert_eq!(a.status, 400);
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model"),
        "{}",
        a.body
    );
    assert_eq!(mock.requests(), 0, "nothing reached the provider");

    let gw = gateway("anthropic", &[p("oa", "openai", &mock)], PRIORITY).await;
    let a = post(
        &c,
        gw.port,
        ANTHROPIC_PATH,
        &[],
        json!({"model": "m", "messages": "hi", "max_tokens": 5}),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    let j = a.json();
    assert_eq!(
        (j["type"].as_str(), j["error"]["type"].as_str()),
        (Some("error"), Some("invalid_request_error"))
    );
    assert!(
        j["error"]["message"].as_str().unwrap().contains("messages"),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn an_oversized_body_is_a_413_in_the_apps_dialect() {
    let mock = MockProvider::start("an", 0).await.unwrap();
    let gw = gateway("anthropic", &[p("an", "anthropic", &mock)], PRIORITY).await;
    let big = "x".repeat(2 * 1024 * 1024);
    let a = post(
        &client(),
        gw.port,
        ANTHROPIC_PATH,
        &[],
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": big}]}),
    )
    .await;
    assert_eq!(a.status, 413, "{}", a.body);
    assert_eq!(a.json()["error"]["type"], "request_too_large");
}

#[tokio::test]
async fn a_stream_cut_after_the_first_byte_ends_with_an_error_event_not_a_hang() {
    for (app, kind) in [
        ("openai", "openai"),
        ("openai", "anthropic"),
        ("anthropic", "openai"),
        ("anthropic", "anthropic"),
    ] {
        let mock = MockProvider::start("p", 0).await.unwrap();
        let gw = gateway(app, &[p("p", kind, &mock)], PRIORITY).await;
        mock.update(|b| b.cut_after_events = Some(3));
        let (path, body) = match app {
            "openai" => (OPENAI_PATH, openai_request(true, false)),
            _ => (ANTHROPIC_PATH, anthropic_request(true, false)),
        };
        let a = post(&client(), gw.port, path, &[], body).await;
        assert_eq!(a.status, 200, "{app}<-{kind}: {}", a.body);
        let (name, data) = a.events().last().cloned().unwrap();
        let error: Value = serde_json::from_str(&data)
            .unwrap_or_else(|e| panic!("{app}<-{kind}: {e}: {}", a.body));
        match app {
            "openai" => assert_eq!(error["error"]["type"], "server_error", "{}", a.body),
            _ => {
                assert_eq!(name, "error", "{}", a.body);
                assert_eq!(error["error"]["type"], "api_error", "{}", a.body);
            }
        }
        assert!(
            !a.body.contains("[DONE]") && !a.body.contains("message_stop"),
            "{}",
            a.body
        );
    }
}

#[tokio::test]
async fn a_stream_that_stalls_midway_ends_with_a_timeout_error_event() {
    let mock = MockProvider::start("slow", 0).await.unwrap();
    let gw = gateway(
        "anthropic",
        &[p("slow", "openai", &mock)],
        "  failover: {firstByteTimeout: 300ms}\n",
    )
    .await;
    mock.update(|b| b.chunk_delay_ms = 5_000);
    let started = Instant::now();
    let a = post(
        &client(),
        gw.port,
        ANTHROPIC_PATH,
        &[],
        anthropic_request(true, false),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let (name, data) = a.events().last().cloned().unwrap();
    assert_eq!(name, "error", "{}", a.body);
    assert!(data.contains("timeout_error"), "{data}");
}

#[tokio::test]
async fn every_provider_down_is_one_error_in_the_apps_dialect() {
    let a_mock = MockProvider::start("a", 0).await.unwrap();
    let b_mock = MockProvider::start("b", 0).await.unwrap();
    a_mock.update(|b| b.fail = Some(Failure::Overloaded));
    b_mock.update(|b| b.fail = Some(Failure::ServerError));
    let c = client();

    let gw = gateway(
        "anthropic",
        &[p("a", "anthropic", &a_mock), p("b", "openai", &b_mock)],
        PRIORITY,
    )
    .await;
    let a = post(
        &c,
        gw.port,
        ANTHROPIC_PATH,
        &[],
        anthropic_request(true, false),
    )
    .await;
    assert_eq!(a.status, 500, "{}", a.body);
    let j = a.json();
    assert_eq!(j["type"], "error");
    assert_eq!(j["error"]["type"], "api_error");
    let message = j["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("every LLM provider failed (2 tried"),
        "{message}"
    );

    let gw = gateway(
        "openai",
        &[p("b", "openai", &b_mock), p("a", "anthropic", &a_mock)],
        PRIORITY,
    )
    .await;
    let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(false, false)).await;
    // The last error was Anthropic's 529: an OpenAI app sees 503 server_error.
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.json()["error"]["type"], "server_error");
}

#[tokio::test]
async fn a_conversation_too_long_for_the_window_is_fitted_and_reported() {
    let mock = MockProvider::start("small", 0).await.unwrap();
    let mut small = p("small", "openai", &mock);
    small.window = 8192;
    let gw = gateway(
        "openai",
        &[small],
        "  routing: {strategy: priority}\n  contextFitting: {strategy: priorityEviction, reserveOutputTokens: 1024, keepLastTurns: 1}\n",
    )
    .await;
    let filler = "lorem ipsum dolor sit amet ".repeat(400); // ~2400 tokens each
    let mut messages = vec![json!({"role": "system", "content": "Keep me."})];
    for i in 0..6 {
        messages.push(json!({"role": "user", "content": format!("{i}: {filler}")}));
        messages.push(json!({"role": "assistant", "content": format!("ok {i}")}));
    }
    messages.push(json!({"role": "user", "content": "The last question."}));
    let a = post(
        &client(),
        gw.port,
        OPENAI_PATH,
        &[],
        json!({"model": "m", "messages": messages}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let report = a.headers["x-trimtab-evicted"].to_str().unwrap().to_owned();
    assert!(report.starts_with("evicted="), "{report}");
    let sent = mock.last_request().unwrap().body["messages"].clone();
    let sent = sent.as_array().unwrap();
    assert_eq!(sent[0]["content"], "Keep me.");
    assert_eq!(sent.last().unwrap()["content"], "The last question.");
    assert!(
        sent.iter().any(|m| m["content"]
            .as_str()
            .is_some_and(|t| t.contains("removed to fit"))),
        "a marker: {sent:?}"
    );
    assert!(sent.len() < 14);

    // reject: a 400 in the app's dialect, nothing sent.
    let before = mock.requests();
    let mut small = p("small", "openai", &mock);
    small.window = 8192;
    let gw = gateway("openai", &[small], "  contextFitting: {strategy: reject}\n").await;
    let a = post(
        &client(),
        gw.port,
        OPENAI_PATH,
        &[],
        json!({"model": "m", "messages": messages}),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens"),
        "{}",
        a.body
    );
    assert_eq!(mock.requests(), before);
}

#[tokio::test]
async fn the_example_policy_runs_locally_and_config_never_shows_keys() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/llm-failover.yaml"
    ))
    .unwrap();
    let mut routes = parse_policies(&text, Path::new("llm-failover.yaml")).unwrap();
    assert_eq!(routes.len(), 1);
    let llm = routes[0].llm.as_ref().unwrap();
    assert_eq!(llm.providers.len(), 2);
    routes[0].listener.port = free_port();
    let sidecar = Sidecar::new(support::options(), Metrics::new().unwrap());
    // The operator's path: a key read from a Secret, carried as a value.
    routes[0].llm.as_mut().unwrap().providers[0].secret_key = Some(
        trimtab_api::sidecar_config::SecretValue::new("sk-very-secret"),
    );
    sidecar
        .apply(trimtab_api::sidecar_config::SidecarConfig { version: 1, routes })
        .await
        .unwrap();
    let shown = serde_json::to_string(
        &sidecar
            .shared()
            .snapshot()
            .config
            .as_ref()
            .unwrap()
            .redacted(),
    )
    .unwrap();
    assert!(!shown.contains("sk-very-secret"));
    assert!(!format!("{:?}", sidecar.shared().snapshot().config).contains("sk-very-secret"));
}

#[tokio::test]
async fn metrics_count_attempts_failovers_and_ttft() {
    let primary = MockProvider::start("primary", 0).await.unwrap();
    let backup = MockProvider::start("backup", 0).await.unwrap();
    let gw = gateway(
        "openai",
        &[
            p("primary", "openai", &primary),
            p("backup", "openai", &backup),
        ],
        PRIORITY,
    )
    .await;
    primary.update(|b| b.fail = Some(Failure::ServerError));
    let c = client();
    for _ in 0..3 {
        let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(false, false)).await;
        assert_eq!(a.status, 200);
    }
    let text = gw.sidecar.shared().metrics.encode().unwrap();
    assert!(
        text.contains(
            r#"trimtab_llm_attempts_total{outcome="failed",provider="primary",route="test/llm"} 3"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"trimtab_llm_failovers_total{provider="primary",route="test/llm"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"trimtab_llm_ttft_seconds_count{provider="backup",route="test/llm"} 3"#),
        "{text}"
    );
}

#[tokio::test]
async fn the_mock_provider_is_controlled_over_http() {
    let mock = MockProvider::start("m", 0).await.unwrap();
    let request = Request::put(format!("http://{}/_mock/behaviour", mock.addr()))
        .body(Full::new(Bytes::from(
            r#"{"ttftMs": 5, "fail": {"rateLimited": {"retryAfterSecs": 2}}}"#,
        )))
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let b = mock.behaviour();
    assert_eq!(
        (b.ttft_ms, b.fail),
        (
            5,
            Some(Failure::RateLimited {
                retry_after_secs: 2
            })
        )
    );
}

#[tokio::test]
async fn hedging_sends_a_slow_request_to_a_second_provider_and_keeps_the_first_answer() {
    let primary = MockProvider::start("primary", 0).await.unwrap();
    let backup = MockProvider::start("backup", 0).await.unwrap();
    let gw = gateway(
        "openai",
        &[p("primary", "openai", &primary), p("backup", "anthropic", &backup)],
        "  routing: {strategy: priority}\n  failover: {hedge: true, firstByteTimeout: 10s, budgetPercent: 100}\n",
    )
    .await;
    primary.update(|b| b.ttft_ms = 10);
    let c = client();
    // Enough answers for a p95 of the route's time to first token. (About one in twenty
    // of these is itself slower than the p95 and may be hedged: that is the design.)
    for _ in 0..25 {
        let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(true, false)).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    primary.update(|b| b.ttft_ms = 3_000);
    let started = Instant::now();
    let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(true, false)).await;
    assert_eq!((a.status, a.provider()), (200, "backup"), "{}", a.body);
    assert!(openai_stream_summary(&a).3, "a complete stream");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a.headers["x-trimtab-attempts"], "2");
    let text = gw.sidecar.shared().metrics.encode().unwrap();
    let hedges: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"trimtab_llm_hedges_total{provider="primary",route="test/llm"} "#)
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(hedges >= 1, "{text}");
}

#[tokio::test]
async fn a_provider_whose_key_cannot_be_read_is_skipped_and_named() {
    let primary = MockProvider::start("primary", 0).await.unwrap();
    let backup = MockProvider::start("backup", 0).await.unwrap();
    let gw = gateway(
        "openai",
        &[
            p("primary", "openai", &primary),
            p("backup", "anthropic", &backup),
        ],
        PRIORITY,
    )
    .await;
    let c = client();
    std::fs::remove_file(gw.keys.path().join("primary")).unwrap();
    let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(false, false)).await;
    assert_eq!((a.status, a.provider()), (200, "backup"), "{}", a.body);
    assert_eq!(primary.requests(), 0);

    // A rotated key file is read again.
    std::fs::remove_file(gw.keys.path().join("backup")).unwrap();
    let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(false, false)).await;
    assert_eq!(a.status, 401, "{}", a.body);
    let message = a.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("apiKey.file: cannot read"), "{message}");
    assert!(!message.contains(ANTHROPIC_KEY) && !message.contains(OPENAI_KEY));
    std::fs::write(gw.keys.path().join("backup"), "sk-rotated").unwrap();
    backup.update(|b| b.expected_key = Some("sk-rotated".into()));
    let a = post(&c, gw.port, OPENAI_PATH, &[], openai_request(false, false)).await;
    assert_eq!((a.status, a.provider()), (200, "backup"), "{}", a.body);
}
