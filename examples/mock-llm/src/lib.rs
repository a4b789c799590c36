//! Mock LLM providers: one local HTTP server that answers both OpenAI Chat Completions
//! (`POST /v1/chat/completions`, base URL `http://addr/v1`) and Anthropic Messages
//! (`POST /v1/messages`, base URL `http://addr`), plain JSON and SSE streams, text and
//! tool calls, with usage — written from the public API references, independently of
//! the gateway's own types, so that a test compares the gateway against the wire format
//! rather than against itself.
//!
//! Its [`Behaviour`] can be changed while it runs, through the [`MockProvider`] handle
//! or the control API (`PUT /_mock/behaviour` with the JSON of a [`Behaviour`],
//! `GET /_mock/stats`): a delay before the first byte, a stall, 429 with `Retry-After`,
//! 500, 529 `overloaded_error`, a connection dropped before the answer, a stream cut
//! after a few chunks, malformed JSON. Listens on 127.0.0.1 only.
#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc};

/// Arguments every tool call of the mock carries.
pub const TOOL_ARGUMENTS: &str = r#"{"city":"Paris","unit":"celsius"}"#;

/// How a failing mock answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Failure {
    /// 429 with `Retry-After: retry_after_secs`.
    RateLimited {
        /// The `Retry-After` value in seconds.
        retry_after_secs: u64,
    },
    /// 500 (`server_error` / `api_error`).
    ServerError,
    /// Anthropic's 529 `overloaded_error` (OpenAI's 503 on the OpenAI path).
    Overloaded,
    /// The connection is closed without an answer.
    DropConnection,
    /// 200 with a body that is not JSON (or a stream event that is not).
    MalformedJson,
}

/// What the mock does with the next requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Behaviour {
    /// Delay before the first byte of the answer: before the headers of a whole answer,
    /// after the headers and before the first event of a stream (where the real
    /// providers spend their time to first token).
    pub ttft_ms: u64,
    /// Delay between stream events.
    pub chunk_delay_ms: u64,
    /// Fail every request this way.
    pub fail: Option<Failure>,
    /// Cut streams (reset the connection) after this many events.
    pub cut_after_events: Option<usize>,
    /// Answer 401 unless the request carries this key (`Authorization: Bearer` on the
    /// OpenAI path, `x-api-key` on the Anthropic path).
    pub expected_key: Option<String>,
    /// Send rate-limit headers saying this many requests remain (of 1000).
    pub remaining_requests: Option<u64>,
}

/// What the mock saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The path.
    pub path: String,
    /// The request headers.
    pub headers: HeaderMap,
    /// The JSON body (Null when it was not JSON).
    pub body: Value,
}

#[derive(Debug, Default)]
struct State {
    behaviour: Mutex<Behaviour>,
    requests: AtomicU64,
    last: Mutex<Option<Seen>>,
}

/// A running mock provider.
#[derive(Debug, Clone)]
pub struct MockProvider {
    name: String,
    addr: SocketAddr,
    state: Arc<State>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MockProvider {
    /// Starts a mock named `name` (it says so in its answers) on 127.0.0.1:`port`
    /// (0 for any free port).
    pub async fn start(name: &str, port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        let mock = Self {
            name: name.to_owned(),
            addr: listener.local_addr()?,
            state: Arc::default(),
        };
        tokio::spawn(mock.clone().accept(listener));
        Ok(mock)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL an OpenAI client is given (`…/v1`).
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The base URL an Anthropic client is given.
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests answered (or failed) so far, the control API's excluded.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The last request.
    pub fn last_request(&self) -> Option<Seen> {
        lock(&self.state.last).clone()
    }

    /// Replaces the behaviour.
    pub fn set(&self, behaviour: Behaviour) {
        *lock(&self.state.behaviour) = behaviour;
    }

    /// Changes the behaviour in place.
    pub fn update(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut lock(&self.state.behaviour));
    }

    /// The current behaviour.
    pub fn behaviour(&self) -> Behaviour {
        lock(&self.state.behaviour).clone()
    }

    async fn accept(self, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let mock = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let mock = mock.clone();
                    async move { mock.serve(req).await }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn serve(&self, req: Request<Incoming>) -> Result<Response<MockBody>, DroppedConnection> {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let headers = req.headers().clone();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        match (method, path.as_str()) {
            (Method::GET, "/_mock/stats") => {
                return Ok(json_response(
                    StatusCode::OK,
                    &json!({"requests": self.requests(), "behaviour": self.behaviour()}),
                    &HeaderMap::new(),
                ));
            }
            (Method::PUT, "/_mock/behaviour") => {
                return Ok(match serde_json::from_slice::<Behaviour>(&body) {
                    Ok(b) => {
                        self.set(b.clone());
                        json_response(StatusCode::OK, &json!(b), &HeaderMap::new())
                    }
                    Err(e) => json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": e.to_string()}),
                        &HeaderMap::new(),
                    ),
                });
            }
            _ => {}
        }
        let dialect = match path.as_str() {
            "/v1/chat/completions" | "/chat/completions" => Dialect::Openai,
            "/v1/messages" => Dialect::Anthropic,
            _ => {
                return Ok(json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": format!("no route {path}")}),
                    &HeaderMap::new(),
                ));
            }
        };
        let n = self.state.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        *lock(&self.state.last) = Some(Seen {
            path: path.clone(),
            headers: headers.clone(),
            body: request.clone(),
        });
        let behaviour = self.behaviour();
        let mut extra = HeaderMap::new();
        if let Some(remaining) = behaviour.remaining_requests {
            dialect.rate_limit_headers(remaining, &mut extra);
        }
        if let Some(problem) = dialect.check(&headers, &request, behaviour.expected_key.as_deref())
        {
            return Ok(problem);
        }
        let stream = request
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        match behaviour.fail {
            Some(Failure::DropConnection) => return Err(DroppedConnection),
            Some(Failure::RateLimited { retry_after_secs }) => {
                extra.insert(header::RETRY_AFTER, retry_after_secs.into());
                return Ok(dialect.error(429, "rate limit reached for requests", &extra));
            }
            Some(Failure::ServerError) => {
                return Ok(dialect.error(
                    500,
                    "the server had an error processing your request",
                    &extra,
                ));
            }
            Some(Failure::Overloaded) => {
                let status = if dialect == Dialect::Anthropic {
                    529
                } else {
                    503
                };
                return Ok(dialect.error(status, "Overloaded", &extra));
            }
            Some(Failure::MalformedJson) | None => {}
        }
        let answer = Answer::for_request(&self.name, n, &request);
        let ttft = Duration::from_millis(behaviour.ttft_ms);
        if !stream {
            tokio::time::sleep(ttft).await;
            if behaviour.fail == Some(Failure::MalformedJson) {
                let mut r = Response::new(full(Bytes::from_static(
                    b"{\"id\": \"broken\", \"choices\": [",
                )));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    "application/json"
                        .parse()
                        .unwrap_or(header::HeaderValue::from_static("application/json")),
                );
                return Ok(r);
            }
            let body = match dialect {
                Dialect::Openai => answer.openai_json(),
                Dialect::Anthropic => answer.anthropic_json(),
            };
            return Ok(json_response(StatusCode::OK, &body, &extra));
        }
        let mut events = match dialect {
            Dialect::Openai => answer.openai_events(&request),
            Dialect::Anthropic => answer.anthropic_events(),
        };
        if behaviour.fail == Some(Failure::MalformedJson) {
            events.insert(
                1.min(events.len()),
                "data: {this is not json\n\n".to_owned(),
            );
        }
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let chunk_delay = Duration::from_millis(behaviour.chunk_delay_ms);
        let cut = behaviour.cut_after_events;
        tokio::spawn(async move {
            tokio::time::sleep(ttft).await;
            for (i, event) in events.into_iter().enumerate() {
                if cut == Some(i) {
                    // Let the events before the cut reach the wire first: a real cut
                    // happens after bytes were delivered.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx
                        .send(Err(std::io::Error::other("mock: stream cut")))
                        .await;
                    return;
                }
                if i > 0 && !chunk_delay.is_zero() {
                    tokio::time::sleep(chunk_delay).await;
                }
                if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                    return;
                }
            }
        });
        let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }));
        let mut response = Response::new(BodyExt::boxed(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        response.headers_mut().extend(extra);
        Ok(response)
    }
}

type MockBody = BoxBody<Bytes, std::io::Error>;

/// Returned by the service to make hyper close the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("mock: connection dropped on purpose")]
pub struct DroppedConnection;

fn full(bytes: Bytes) -> MockBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn json_response(status: StatusCode, body: &Value, extra: &HeaderMap) -> Response<MockBody> {
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().extend(extra.clone());
    response
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Openai,
    Anthropic,
}

impl Dialect {
    /// The error body of the dialect's API reference.
    fn error(self, status: u16, message: &str, extra: &HeaderMap) -> Response<MockBody> {
        let body = match self {
            Self::Openai => {
                let (kind, code) = match status {
                    400 => ("invalid_request_error", Value::Null),
                    401 => ("invalid_request_error", json!("invalid_api_key")),
                    429 => ("requests", json!("rate_limit_exceeded")),
                    _ => ("server_error", Value::Null),
                };
                json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
            }
            Self::Anthropic => {
                let kind = match status {
                    400 => "invalid_request_error",
                    401 => "authentication_error",
                    429 => "rate_limit_error",
                    529 => "overloaded_error",
                    _ => "api_error",
                };
                json!({"type": "error", "error": {"type": kind, "message": message}})
            }
        };
        json_response(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &body,
            extra,
        )
    }

    fn rate_limit_headers(self, remaining: u64, out: &mut HeaderMap) {
        let names: [&'static str; 2] = match self {
            Self::Openai => [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
            ],
            Self::Anthropic => [
                "anthropic-ratelimit-requests-limit",
                "anthropic-ratelimit-requests-remaining",
            ],
        };
        out.insert(names[0], 1000_u64.into());
        out.insert(names[1], remaining.into());
    }

    /// What the real API refuses: a missing key, a missing `anthropic-version`, a body
    /// without `model`, `messages` or (Anthropic) `max_tokens`.
    fn check(
        self,
        headers: &HeaderMap,
        body: &Value,
        expected_key: Option<&str>,
    ) -> Option<Response<MockBody>> {
        let none = HeaderMap::new();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(expected) = expected_key {
            let sent = match self {
                Self::Openai => header("authorization").and_then(|v| v.strip_prefix("Bearer ")),
                Self::Anthropic => header("x-api-key"),
            };
            if sent != Some(expected) {
                return Some(self.error(401, "invalid x-api-key / Authorization", &none));
            }
        }
        if self == Self::Anthropic && header("anthropic-version").is_none() {
            return Some(self.error(400, "anthropic-version: header is required", &none));
        }
        let missing = |field: &str| body.get(field).is_none();
        for field in ["model", "messages"] {
            if missing(field) {
                return Some(self.error(400, &format!("{field}: Field required"), &none));
            }
        }
        if self == Self::Anthropic && missing("max_tokens") {
            return Some(self.error(400, "max_tokens: Field required", &none));
        }
        None
    }
}

/// The mock's answer to one request: text, or a call of the first tool when the
/// request offers tools and its last message is not a tool result.
#[derive(Debug)]
struct Answer {
    id: u64,
    model: String,
    text: Vec<String>,
    tool: Option<String>,
    input_tokens: u64,
}

impl Answer {
    fn for_request(name: &str, id: u64, request: &Value) -> Self {
        let model = request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("mock")
            .to_owned();
        let messages = request.get("messages").and_then(Value::as_array);
        let last = messages.and_then(|m| m.last());
        let last_is_tool_result = last.is_some_and(|m| {
            m.get("role").and_then(Value::as_str) == Some("tool")
                || m.get("content")
                    .and_then(Value::as_array)
                    .is_some_and(|blocks| {
                        blocks
                            .iter()
                            .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
                    })
        });
        let tool = request
            .get("tools")
            .and_then(Value::as_array)
            .and_then(|t| t.first())
            .and_then(|t| t.pointer("/function/name").or_else(|| t.get("name")))
            .and_then(Value::as_str)
            .filter(|_| !last_is_tool_result)
            .map(str::to_owned);
        let text = if last_is_tool_result {
            format!("{name} read the tool result.")
        } else {
            format!("Hello from {name}, answering request {id}.")
        };
        let input_tokens = (request.to_string().len() as u64).div_ceil(4);
        Self {
            id,
            model,
            text: text.split_inclusive(' ').map(str::to_owned).collect(),
            tool,
            input_tokens,
        }
    }

    fn output_tokens(&self) -> u64 {
        self.text.len() as u64 + u64::from(self.tool.is_some()) * 8
    }

    fn openai_json(&self) -> Value {
        let message = match &self.tool {
            Some(tool) => {
                json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": [
                {"id": format!("call_mock_{}", self.id), "type": "function",
                 "function": {"name": tool, "arguments": TOOL_ARGUMENTS}}]})
            }
            None => json!({"role": "assistant", "content": self.text.concat(), "refusal": null}),
        };
        json!({
            "id": format!("chatcmpl-mock-{}", self.id),
            "object": "chat.completion",
            "created": unix_now(),
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": null,
                         "finish_reason": if self.tool.is_some() { "tool_calls" } else { "stop" }}],
            "usage": self.openai_usage(),
            "system_fingerprint": "fp_mock",
        })
    }

    fn openai_usage(&self) -> Value {
        json!({"prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens(),
               "total_tokens": self.input_tokens + self.output_tokens()})
    }

    fn openai_events(&self, request: &Value) -> Vec<String> {
        let created = unix_now();
        let chunk = |choices: Value, usage: Option<Value>| {
            let mut c = json!({"id": format!("chatcmpl-mock-{}", self.id), "object": "chat.completion.chunk",
                "created": created, "model": self.model, "system_fingerprint": "fp_mock", "choices": choices});
            if let Some(u) = usage {
                c["usage"] = u;
            }
            format!("data: {c}\n\n")
        };
        let delta = |d: Value, finish: Value| json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}]);
        let mut out = vec![chunk(
            delta(
                json!({"role": "assistant", "content": "", "refusal": null}),
                Value::Null,
            ),
            None,
        )];
        match &self.tool {
            Some(tool) => {
                out.push(chunk(
                    delta(
                        json!({"tool_calls": [{"index": 0, "id": format!("call_mock_{}", self.id),
                    "type": "function", "function": {"name": tool, "arguments": ""}}]}),
                        Value::Null,
                    ),
                    None,
                ));
                for part in split_in(TOOL_ARGUMENTS, 3) {
                    out.push(chunk(
                        delta(
                            json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}),
                            Value::Null,
                        ),
                        None,
                    ));
                }
                out.push(chunk(delta(json!({}), json!("tool_calls")), None));
            }
            None => {
                for word in &self.text {
                    out.push(chunk(delta(json!({"content": word}), Value::Null), None));
                }
                out.push(chunk(delta(json!({}), json!("stop")), None));
            }
        }
        if request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true)
        {
            out.push(chunk(json!([]), Some(self.openai_usage())));
        }
        out.push("data: [DONE]\n\n".to_owned());
        out
    }

    fn anthropic_json(&self) -> Value {
        let content = match &self.tool {
            Some(tool) => {
                json!([{"type": "tool_use", "id": format!("toolu_mock_{}", self.id), "name": tool,
                                  "input": serde_json::from_str::<Value>(TOOL_ARGUMENTS).unwrap_or(Value::Null)}])
            }
            None => json!([{"type": "text", "text": self.text.concat()}]),
        };
        json!({
            "id": format!("msg_mock_{}", self.id),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": if self.tool.is_some() { "tool_use" } else { "end_turn" },
            "stop_sequence": null,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens()},
        })
    }

    fn anthropic_events(&self) -> Vec<String> {
        let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
        let mut out = vec![event(
            "message_start",
            json!({"type": "message_start", "message": {
            "id": format!("msg_mock_{}", self.id), "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 1}}}),
        )];
        match &self.tool {
            Some(tool) => {
                out.push(event("content_block_start", json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "tool_use", "id": format!("toolu_mock_{}", self.id), "name": tool, "input": {}}})));
                out.push(event("ping", json!({"type": "ping"})));
                for part in split_in(TOOL_ARGUMENTS, 3) {
                    out.push(event(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": part}}),
                    ));
                }
            }
            None => {
                out.push(event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
                ));
                out.push(event("ping", json!({"type": "ping"})));
                for word in &self.text {
                    out.push(event(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": word}}),
                    ));
                }
            }
        }
        out.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        out.push(event("message_delta", json!({"type": "message_delta",
            "delta": {"stop_reason": if self.tool.is_some() { "tool_use" } else { "end_turn" }, "stop_sequence": null},
            "usage": {"output_tokens": self.output_tokens()}})));
        out.push(event("message_stop", json!({"type": "message_stop"})));
        out
    }
}

/// `text` in `parts` pieces of about equal length (on char boundaries).
fn split_in(text: &str, parts: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(parts.max(1)).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
