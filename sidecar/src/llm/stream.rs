//! Streaming translation: state machines fed one upstream event at a time, producing the
//! application's events as they go — never holding more than the current event.
//!
//! [`StreamMapper`] puts the pieces together for the proxy: it takes the provider's body
//! chunk by chunk (as a hyper body yields frames) and returns the bytes to send on. A
//! body wrapper calls [`StreamMapper::push`] for each data frame, [`StreamMapper::finish`]
//! when the provider's body ends and [`StreamMapper::abort`] when it fails or times out;
//! empty results are simply not sent. Whatever goes wrong upstream — a cut stream,
//! bytes that are not an event stream, events that are not JSON or break the protocol,
//! an `error` event — ends the downstream stream with one error event in the
//! application's dialect, after which input is ignored.
//!
//! Anthropic → OpenAI: `message_start` opens the message with a `role` delta;
//! `text_delta` becomes `content`; each `tool_use` block becomes a tool call with the
//! next `index` (its `id` and name on the first delta, `input_json_delta` fragments as
//! `arguments`); `message_delta` gives `finish_reason`; `message_stop` sends the usage
//! chunk (when the application asked with `stream_options.include_usage`) and `[DONE]`.
//! `ping`, thinking and unknown events are dropped.
//!
//! OpenAI → Anthropic: the first chunk sends `message_start`; `content` opens a text
//! block, each new tool call (a delta with an `id`) closes the open block and opens a
//! `tool_use` block whose `arguments` arrive as `input_json_delta`; `[DONE]` closes the
//! open block and sends `message_delta` (stop reason and usage) and `message_stop`.
//! Chat Completions streams tool calls one after the other; fragments of a call whose
//! block was already closed are a protocol error. OpenAI reports usage only at the end,
//! so `message_start` says 0 input tokens and `message_delta` carries the real counts
//! (the Anthropic SDKs take input counts from `message_delta` when present). A stream that ends without `[DONE]`
//! is truncated, even after its `finish_reason`: the usage chunk may be what is missing.

use serde_json::json;
use trimtab_api::balancer_policy::ProviderKind;

use super::{
    anthropic as an,
    decode::decode,
    openai as oa,
    sse::{SseEvent, SseParser, encode_into},
    translate::{self, ErrorKind, error_body},
};

/// One direction of stream translation.
pub trait StreamTranslator: Send + std::fmt::Debug {
    /// Translates one upstream event, appending the downstream events to `out`.
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<SseEvent>);
    /// The upstream body ended after `offset` bytes.
    fn on_end(&mut self, offset: u64, out: &mut Vec<SseEvent>);
    /// Whether the downstream stream is complete (finished or failed).
    fn is_done(&self) -> bool;
    /// Ends the downstream stream with an error, unless it is already done.
    fn fail(&mut self, kind: ErrorKind, message: &str, out: &mut Vec<SseEvent>);
}

/// The error event of dialect `app`: OpenAI puts an error body on a `data:` line (its
/// SDKs raise on it), Anthropic sends an `error` event.
pub fn error_event(app: ProviderKind, kind: ErrorKind, message: &str) -> SseEvent {
    let body = error_body(app, kind, message).to_string();
    match app {
        ProviderKind::Openai => SseEvent::data(body),
        ProviderKind::Anthropic => SseEvent::named("error", body),
    }
}

fn anthropic_event(event: &an::StreamEvent) -> SseEvent {
    SseEvent::named(
        event.name(),
        serde_json::to_string(event).unwrap_or_default(),
    )
}

/// What the downstream OpenAI chunks repeat on every chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiStreamOptions {
    /// `created` of every chunk (Unix seconds; Anthropic does not say).
    pub created: u64,
    /// The application asked for `stream_options.include_usage`.
    pub include_usage: bool,
}

/// Anthropic events in, OpenAI `chat.completion.chunk`s out.
#[derive(Debug)]
pub struct AnthropicToOpenAi {
    options: OpenAiStreamOptions,
    id: String,
    model: String,
    started: bool,
    /// `(Anthropic block index, OpenAI tool-call index)` of each tool_use block. A list,
    /// not a table indexed by block: the index comes from upstream and may be anything.
    tool_index_of_block: Vec<(u32, u32)>,
    next_tool_index: u32,
    usage: an::Usage,
    finish_sent: bool,
    done: bool,
}

impl AnthropicToOpenAi {
    /// A translator for one response.
    pub fn new(options: OpenAiStreamOptions) -> Self {
        Self {
            options,
            id: String::new(),
            model: String::new(),
            started: false,
            tool_index_of_block: Vec::new(),
            next_tool_index: 0,
            usage: an::Usage::default(),
            finish_sent: false,
            done: false,
        }
    }

    fn chunk(&self, delta: oa::Delta, finish_reason: Option<oa::FinishReason>) -> SseEvent {
        self.encode(oa::ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.options.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices: vec![oa::ChunkChoice {
                index: 0,
                delta,
                finish_reason,
                logprobs: None,
            }],
            usage: None,
        })
    }

    fn encode(&self, chunk: oa::ChatCompletionChunk) -> SseEvent {
        SseEvent::data(serde_json::to_string(&chunk).unwrap_or_default())
    }

    fn tool_delta(&self, delta: oa::ToolCallDelta) -> SseEvent {
        self.chunk(
            oa::Delta {
                tool_calls: Some(vec![delta]),
                ..Default::default()
            },
            None,
        )
    }

    fn handle(
        &mut self,
        event: an::StreamEvent,
        out: &mut Vec<SseEvent>,
    ) -> Result<(), (ErrorKind, String)> {
        if !self.started
            && !matches!(
                event,
                an::StreamEvent::MessageStart { .. }
                    | an::StreamEvent::Ping
                    | an::StreamEvent::Error { .. }
            )
        {
            return Err((
                ErrorKind::ServerError,
                format!(
                    "the provider's stream began with {} instead of message_start",
                    event.name()
                ),
            ));
        }
        match event {
            an::StreamEvent::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                self.usage = message.usage;
                self.started = true;
                out.push(self.chunk(
                    oa::Delta {
                        role: Some("assistant".into()),
                        content: Some(String::new()),
                        ..Default::default()
                    },
                    None,
                ));
            }
            an::StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                an::ContentBlock::ToolUse(tool) => {
                    if self.tool_index_of_block.iter().any(|&(b, _)| b == index) {
                        return Err((
                            ErrorKind::ServerError,
                            format!("content block {index} was started twice"),
                        ));
                    }
                    let tool_index = self.next_tool_index;
                    self.next_tool_index += 1;
                    self.tool_index_of_block.push((index, tool_index));
                    out.push(self.tool_delta(oa::ToolCallDelta {
                        index: tool_index,
                        id: Some(tool.id),
                        kind: Some("function".into()),
                        function: Some(oa::FunctionCallDelta {
                            name: Some(tool.name),
                            arguments: Some(String::new()),
                        }),
                    }));
                }
                an::ContentBlock::Text(text) if !text.text.is_empty() => {
                    out.push(self.chunk(
                        oa::Delta {
                            content: Some(text.text),
                            ..Default::default()
                        },
                        None,
                    ));
                }
                _ => {}
            },
            an::StreamEvent::ContentBlockDelta { index, delta } => match delta {
                an::BlockDelta::TextDelta { text } => out.push(self.chunk(
                    oa::Delta {
                        content: Some(text),
                        ..Default::default()
                    },
                    None,
                )),
                an::BlockDelta::InputJsonDelta { partial_json } => {
                    let Some(tool_index) = self
                        .tool_index_of_block
                        .iter()
                        .find(|&&(b, _)| b == index)
                        .map(|&(_, t)| t)
                    else {
                        return Err((
                            ErrorKind::ServerError,
                            format!(
                                "input_json_delta for block {index}, which is not a tool_use block"
                            ),
                        ));
                    };
                    out.push(self.tool_delta(oa::ToolCallDelta {
                        index: tool_index,
                        id: None,
                        kind: None,
                        function: Some(oa::FunctionCallDelta {
                            name: None,
                            arguments: Some(partial_json),
                        }),
                    }));
                }
                _ => {}
            },
            an::StreamEvent::MessageDelta { delta, usage } => {
                // Usage in message_delta is cumulative; input counts appear in newer API
                // versions only, so keep the ones from message_start when absent.
                self.usage.output_tokens = usage.output_tokens;
                if usage.input_tokens > 0 {
                    self.usage.input_tokens = usage.input_tokens;
                }
                if let Some(read) = usage.cache_read_input_tokens {
                    self.usage.cache_read_input_tokens = Some(read);
                }
                if let Some(created) = usage.cache_creation_input_tokens {
                    self.usage.cache_creation_input_tokens = Some(created);
                }
                if let Some(stop) = delta.stop_reason.filter(|_| !self.finish_sent) {
                    self.finish_sent = true;
                    out.push(self.chunk(
                        oa::Delta::default(),
                        Some(translate::finish_reason_for(&stop)),
                    ));
                }
            }
            an::StreamEvent::MessageStop => {
                if !self.finish_sent {
                    self.finish_sent = true;
                    out.push(self.chunk(oa::Delta::default(), Some(oa::FinishReason::Stop)));
                }
                if self.options.include_usage {
                    out.push(self.encode(oa::ChatCompletionChunk {
                        id: self.id.clone(),
                        object: "chat.completion.chunk".into(),
                        created: self.options.created,
                        model: self.model.clone(),
                        system_fingerprint: None,
                        choices: Vec::new(),
                        usage: Some(translate::usage_to_openai(&self.usage)),
                    }));
                }
                out.push(SseEvent::data("[DONE]"));
                self.done = true;
            }
            an::StreamEvent::Error { error } => {
                let kind =
                    ErrorKind::from_anthropic_type(&error.kind).unwrap_or(ErrorKind::ServerError);
                return Err((kind, error.message));
            }
            an::StreamEvent::ContentBlockStop { .. }
            | an::StreamEvent::Ping
            | an::StreamEvent::Other(_) => {}
        }
        Ok(())
    }
}

impl StreamTranslator for AnthropicToOpenAi {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<SseEvent>) {
        if self.done {
            return;
        }
        let result = match decode::<an::StreamEvent>(event.data.as_bytes()) {
            Ok(parsed) => self.handle(parsed, out),
            Err(e) => Err((
                ErrorKind::ServerError,
                format!(
                    "the provider sent a malformed {} event: {e}",
                    event.event.as_deref().unwrap_or("message")
                ),
            )),
        };
        if let Err((kind, message)) = result {
            self.fail(kind, &message, out);
        }
    }

    fn on_end(&mut self, offset: u64, out: &mut Vec<SseEvent>) {
        if !self.done {
            self.fail(
                ErrorKind::ServerError,
                &format!("the provider's stream ended after {offset} bytes, before message_stop"),
                out,
            );
        }
    }

    fn is_done(&self) -> bool {
        self.done
    }

    fn fail(&mut self, kind: ErrorKind, message: &str, out: &mut Vec<SseEvent>) {
        if !self.done {
            self.done = true;
            out.push(error_event(ProviderKind::Openai, kind, message));
        }
    }
}

/// The kind of the Anthropic block currently open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenBlock {
    Text,
    Tool(u32),
}

/// OpenAI `chat.completion.chunk`s in, Anthropic events out.
#[derive(Debug)]
pub struct OpenAiToAnthropic {
    model: String,
    started: bool,
    open: Option<(u32, OpenBlock)>,
    next_block: u32,
    /// OpenAI tool-call indexes whose block has been opened.
    seen_tools: Vec<u32>,
    finish: Option<oa::FinishReason>,
    usage: Option<oa::Usage>,
    done: bool,
}

impl OpenAiToAnthropic {
    /// A translator for one response; `model` names the model in `message_start` if the
    /// stream ends before saying it.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            started: false,
            open: None,
            next_block: 0,
            seen_tools: Vec::new(),
            finish: None,
            usage: None,
            done: false,
        }
    }

    fn start(&mut self, id: &str, model: &str, out: &mut Vec<SseEvent>) {
        if self.started {
            return;
        }
        self.started = true;
        if !model.is_empty() {
            self.model = model.into();
        }
        out.push(anthropic_event(&an::StreamEvent::MessageStart {
            message: an::MessagesResponse {
                id: id.into(),
                kind: "message".into(),
                role: an::Role::Assistant,
                content: Vec::new(),
                model: self.model.clone(),
                stop_reason: None,
                stop_sequence: None,
                usage: an::Usage::default(),
                extra: Default::default(),
            },
        }));
    }

    fn close_block(&mut self, out: &mut Vec<SseEvent>) {
        if let Some((index, _)) = self.open.take() {
            out.push(anthropic_event(&an::StreamEvent::ContentBlockStop {
                index,
            }));
        }
    }

    fn open_block(
        &mut self,
        kind: OpenBlock,
        block: an::ContentBlock,
        out: &mut Vec<SseEvent>,
    ) -> u32 {
        self.close_block(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some((index, kind));
        out.push(anthropic_event(&an::StreamEvent::ContentBlockStart {
            index,
            content_block: block,
        }));
        index
    }

    fn text(&mut self, text: String, out: &mut Vec<SseEvent>) {
        let index = match self.open {
            Some((index, OpenBlock::Text)) => index,
            _ => self.open_block(
                OpenBlock::Text,
                an::ContentBlock::Text(an::TextBlock::new("")),
                out,
            ),
        };
        out.push(anthropic_event(&an::StreamEvent::ContentBlockDelta {
            index,
            delta: an::BlockDelta::TextDelta { text },
        }));
    }

    fn tool(&mut self, call: oa::ToolCallDelta, out: &mut Vec<SseEvent>) -> Result<(), String> {
        let function = call.function.unwrap_or_default();
        let index = if let Some(id) = call.id {
            if self.seen_tools.contains(&call.index) {
                return Err(format!("tool call {} was started twice", call.index));
            }
            self.seen_tools.push(call.index);
            self.open_block(
                OpenBlock::Tool(call.index),
                an::ContentBlock::ToolUse(an::ToolUseBlock {
                    id,
                    name: function.name.unwrap_or_default(),
                    input: json!({}),
                    cache_control: None,
                }),
                out,
            )
        } else {
            match self.open {
                Some((index, OpenBlock::Tool(open))) if open == call.index => index,
                _ => {
                    return Err(format!(
                        "arguments for tool call {} arrived outside its turn (interleaved or without an id)",
                        call.index
                    ));
                }
            }
        };
        if let Some(partial_json) = function.arguments.filter(|a| !a.is_empty()) {
            out.push(anthropic_event(&an::StreamEvent::ContentBlockDelta {
                index,
                delta: an::BlockDelta::InputJsonDelta { partial_json },
            }));
        }
        Ok(())
    }

    fn complete(&mut self, out: &mut Vec<SseEvent>) {
        self.start("msg_unknown", "", out);
        self.close_block(out);
        let mut usage = self
            .usage
            .as_ref()
            .map(translate::usage_to_anthropic)
            .unwrap_or_default();
        if self.usage.is_none() {
            usage.cache_creation_input_tokens = None;
            usage.cache_read_input_tokens = None;
        }
        out.push(anthropic_event(&an::StreamEvent::MessageDelta {
            delta: an::MessageDeltaBody {
                stop_reason: Some(
                    self.finish
                        .as_ref()
                        .map_or(an::StopReason::EndTurn, translate::stop_reason_for),
                ),
                stop_sequence: None,
            },
            usage,
        }));
        out.push(anthropic_event(&an::StreamEvent::MessageStop));
        self.done = true;
    }

    fn handle(&mut self, data: &str, out: &mut Vec<SseEvent>) -> Result<(), (ErrorKind, String)> {
        if data.trim() == "[DONE]" {
            self.complete(out);
            return Ok(());
        }
        if data.trim_start().starts_with("{\"error\"")
            && let Ok(body) = decode::<oa::ErrorBody>(data.as_bytes())
        {
            let kind =
                translate::classify_provider_error(ProviderKind::Openai, 500, data.as_bytes()).kind;
            return Err((kind, body.error.message));
        }
        let chunk: oa::ChatCompletionChunk = decode(data.as_bytes()).map_err(|e| {
            (
                ErrorKind::ServerError,
                format!("the provider sent a malformed chunk: {e}"),
            )
        })?;
        self.start(&chunk.id, &chunk.model, out);
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            let delta = choice.delta;
            if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                self.text(text, out);
            }
            if let Some(refusal) = delta.refusal.filter(|t| !t.is_empty()) {
                self.text(refusal, out);
            }
            for call in delta.tool_calls.into_iter().flatten() {
                self.tool(call, out)
                    .map_err(|m| (ErrorKind::ServerError, m))?;
            }
            if choice.finish_reason.is_some() {
                self.finish = choice.finish_reason;
            }
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        Ok(())
    }
}

impl StreamTranslator for OpenAiToAnthropic {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<SseEvent>) {
        if self.done {
            return;
        }
        if let Err((kind, message)) = self.handle(&event.data, out) {
            self.fail(kind, &message, out);
        }
    }

    fn on_end(&mut self, offset: u64, out: &mut Vec<SseEvent>) {
        let message = format!("the provider's stream ended after {offset} bytes, before [DONE]");
        self.fail(ErrorKind::ServerError, &message, out);
    }

    fn is_done(&self) -> bool {
        self.done
    }

    fn fail(&mut self, kind: ErrorKind, message: &str, out: &mut Vec<SseEvent>) {
        if !self.done {
            self.done = true;
            out.push(error_event(ProviderKind::Anthropic, kind, message));
        }
    }
}

/// Same dialect on both sides: events pass unchanged, but the end of the stream is
/// checked (`message_stop` or `[DONE]`) and errors end it as in the other directions.
#[derive(Debug)]
pub struct Passthrough {
    dialect: ProviderKind,
    done: bool,
}

impl Passthrough {
    /// A checker for one response of `dialect`.
    pub fn new(dialect: ProviderKind) -> Self {
        Self {
            dialect,
            done: false,
        }
    }
}

impl StreamTranslator for Passthrough {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<SseEvent>) {
        if self.done {
            return;
        }
        self.done = match self.dialect {
            ProviderKind::Openai => {
                event.data.trim() == "[DONE]" || event.data.trim_start().starts_with("{\"error\"")
            }
            ProviderKind::Anthropic => {
                matches!(event.event.as_deref(), Some("message_stop" | "error"))
            }
        };
        out.push(event.clone());
    }

    fn on_end(&mut self, offset: u64, out: &mut Vec<SseEvent>) {
        let message =
            format!("the provider's stream ended after {offset} bytes, before its last event");
        self.fail(ErrorKind::ServerError, &message, out);
    }

    fn is_done(&self) -> bool {
        self.done
    }

    fn fail(&mut self, kind: ErrorKind, message: &str, out: &mut Vec<SseEvent>) {
        if !self.done {
            self.done = true;
            out.push(error_event(self.dialect, kind, message));
        }
    }
}

/// The provider's body in, the application's body out, chunk by chunk.
#[derive(Debug)]
pub struct StreamMapper {
    parser: SseParser,
    translator: Box<dyn StreamTranslator>,
    events: Vec<SseEvent>,
    output: Vec<SseEvent>,
}

impl StreamMapper {
    /// A mapper for a `provider` stream read by an `app` application. `model` is the
    /// model asked for (named if the stream ends before saying it); `options` shape
    /// OpenAI output.
    pub fn new(
        provider: ProviderKind,
        app: ProviderKind,
        model: &str,
        options: OpenAiStreamOptions,
    ) -> Self {
        let translator: Box<dyn StreamTranslator> = match (provider, app) {
            (ProviderKind::Anthropic, ProviderKind::Openai) => {
                Box::new(AnthropicToOpenAi::new(options))
            }
            (ProviderKind::Openai, ProviderKind::Anthropic) => {
                Box::new(OpenAiToAnthropic::new(model))
            }
            (same, _) => Box::new(Passthrough::new(same)),
        };
        Self {
            parser: SseParser::new(),
            translator,
            events: Vec::new(),
            output: Vec::new(),
        }
    }

    /// Whether the application's stream is complete; later input is ignored.
    pub fn is_done(&self) -> bool {
        self.translator.is_done()
    }

    /// Maps one chunk of the provider's body; the result may be empty.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.is_done() {
            return Vec::new();
        }
        let result = self.parser.push(chunk, &mut self.events);
        for event in self.events.drain(..) {
            self.translator.on_event(&event, &mut self.output);
        }
        if let Err(e) = result {
            self.translator.fail(
                ErrorKind::ServerError,
                &format!("the provider's stream is malformed: {e}"),
                &mut self.output,
            );
        }
        self.flush()
    }

    /// The provider's body ended.
    pub fn finish(&mut self) -> Vec<u8> {
        if !self.is_done() {
            match self.parser.finish() {
                Ok(()) => self
                    .translator
                    .on_end(self.parser.offset(), &mut self.output),
                Err(e) => self.translator.fail(
                    ErrorKind::ServerError,
                    &format!("the provider's stream was cut: {e}"),
                    &mut self.output,
                ),
            }
        }
        self.flush()
    }

    /// The provider's body failed (reset, timeout): ends the stream with an error.
    pub fn abort(&mut self, kind: ErrorKind, message: &str) -> Vec<u8> {
        self.translator.fail(kind, message, &mut self.output);
        self.flush()
    }

    fn flush(&mut self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for event in self.output.drain(..) {
            encode_into(&event, &mut bytes);
        }
        bytes
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::llm::sse::SseParser;

    const ANTHROPIC_TOOL_STREAM: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_014p7gG3wDgGV9EUtLvnow3U\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"stop_sequence\":null,\"usage\":{\"input_tokens\":472,\"output_tokens\":2},\"content\":[],\"stop_reason\":null}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Okay, let's check\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_01T1x1fJ34qAmk2tNTrN7Up6\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"location\\\":\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\" \\\"San Francisco, CA\\\"}\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":89}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

    const OPENAI_TOOL_STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Checking.\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_a\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"location\\\": \\\"Paris\\\"}\"}}]},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"call_b\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"location\\\": \"}}]},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"arguments\":\"\\\"Rome\\\"}\"}}]},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"tool_calls\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":82,\"completion_tokens\":40,\"total_tokens\":122,\"prompt_tokens_details\":{\"cached_tokens\":64}}}\n\n",
        "data: [DONE]\n\n",
    );

    fn options() -> OpenAiStreamOptions {
        OpenAiStreamOptions {
            created: 1_700_000_000,
            include_usage: true,
        }
    }

    /// Maps `input` in chunks of `size` bytes, returning the output events.
    fn map(provider: ProviderKind, app: ProviderKind, input: &[u8], size: usize) -> Vec<SseEvent> {
        let mut mapper = StreamMapper::new(provider, app, "requested-model", options());
        let mut wire = Vec::new();
        for chunk in input.chunks(size) {
            wire.extend(mapper.push(chunk));
        }
        wire.extend(mapper.finish());
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        parser.push(&wire, &mut events).unwrap();
        parser.finish().unwrap();
        events
    }

    fn json(event: &SseEvent) -> Value {
        serde_json::from_str(&event.data).unwrap()
    }

    #[test]
    fn anthropic_tool_stream_becomes_openai_chunks_with_indexed_tool_calls() {
        let events = map(
            ProviderKind::Anthropic,
            ProviderKind::Openai,
            ANTHROPIC_TOOL_STREAM.as_bytes(),
            7,
        );
        assert!(
            events.iter().all(|e| e.event.is_none()),
            "OpenAI streams have unnamed events"
        );
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(json).collect();
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            serde_json::json!({"role":"assistant","content":""})
        );
        assert_eq!(chunks[0]["id"], "msg_014p7gG3wDgGV9EUtLvnow3U");
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(chunks[0]["created"], 1_700_000_000);
        assert_eq!(
            chunks[1]["choices"][0]["delta"]["content"],
            "Okay, let's check"
        );
        assert_eq!(
            chunks[2]["choices"][0]["delta"]["tool_calls"][0],
            serde_json::json!({"index":0,"id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","type":"function","function":{"name":"get_weather","arguments":""}})
        );
        let arguments: String = chunks[3..]
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        assert_eq!(arguments, "{\"location\": \"San Francisco, CA\"}");
        let finish = chunks
            .iter()
            .find(|c| !c["choices"][0]["finish_reason"].is_null())
            .unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["prompt_tokens"], 472);
        assert_eq!(usage["usage"]["completion_tokens"], 89);
        assert_eq!(events.last().unwrap().data, "[DONE]");
        // The same result whatever the chunk boundaries.
        assert_eq!(
            map(
                ProviderKind::Anthropic,
                ProviderKind::Openai,
                ANTHROPIC_TOOL_STREAM.as_bytes(),
                1
            ),
            events
        );
    }

    #[test]
    fn openai_tool_stream_becomes_anthropic_events_in_order() {
        let events = map(
            ProviderKind::Openai,
            ProviderKind::Anthropic,
            OPENAI_TOOL_STREAM.as_bytes(),
            13,
        );
        let names: Vec<&str> = events.iter().map(|e| e.event.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        for e in &events {
            assert_eq!(
                json(e)["type"],
                e.event.as_deref().unwrap(),
                "event name equals its type"
            );
        }
        assert_eq!(json(&events[0])["message"]["id"], "chatcmpl-123");
        assert_eq!(
            json(&events[2])["delta"],
            serde_json::json!({"type":"text_delta","text":"Checking."})
        );
        assert_eq!(
            json(&events[4])["content_block"],
            serde_json::json!({"type":"tool_use","id":"call_a","name":"get_weather","input":{}})
        );
        assert_eq!(
            json(&events[5])["delta"]["partial_json"],
            "{\"location\": \"Paris\"}"
        );
        assert_eq!(json(&events[7])["index"], 2);
        let second: String = [8, 9]
            .iter()
            .map(|&i| {
                json(&events[i])["delta"]["partial_json"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(second, "{\"location\": \"Rome\"}");
        let delta = json(&events[11]);
        assert_eq!(delta["delta"]["stop_reason"], "tool_use");
        assert_eq!(delta["usage"]["output_tokens"], 40);
        assert_eq!(delta["usage"]["input_tokens"], 18);
        assert_eq!(delta["usage"]["cache_read_input_tokens"], 64);
        assert_eq!(
            map(
                ProviderKind::Openai,
                ProviderKind::Anthropic,
                OPENAI_TOOL_STREAM.as_bytes(),
                1
            ),
            events
        );
    }

    #[test]
    fn a_truncated_upstream_stream_ends_with_an_error_event_in_the_app_dialect() {
        let cut = &ANTHROPIC_TOOL_STREAM.as_bytes()[..ANTHROPIC_TOOL_STREAM.len() / 2];
        let events = map(ProviderKind::Anthropic, ProviderKind::Openai, cut, 64);
        let last = json(events.last().unwrap());
        assert_eq!(last["error"]["type"], "server_error");
        assert!(
            last["error"]["message"]
                .as_str()
                .unwrap()
                .contains("was not finished by a blank line"),
            "{last}"
        );
        assert!(events.iter().all(|e| e.data != "[DONE]"));

        // Cut at an event boundary: well-formed SSE, but no message_stop.
        let boundary = ANTHROPIC_TOOL_STREAM.find("event: message_delta").unwrap();
        let events = map(
            ProviderKind::Anthropic,
            ProviderKind::Openai,
            &ANTHROPIC_TOOL_STREAM.as_bytes()[..boundary],
            64,
        );
        let msg = json(events.last().unwrap())["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            msg,
            format!("the provider's stream ended after {boundary} bytes, before message_stop")
        );

        let boundary = OPENAI_TOOL_STREAM.find("data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},").unwrap();
        let events = map(
            ProviderKind::Openai,
            ProviderKind::Anthropic,
            &OPENAI_TOOL_STREAM.as_bytes()[..boundary],
            64,
        );
        let last = events.last().unwrap();
        assert_eq!(last.event.as_deref(), Some("error"));
        assert_eq!(json(last)["error"]["type"], "api_error");
        assert!(
            events
                .iter()
                .all(|e| e.event.as_deref() != Some("message_stop"))
        );
    }

    #[test]
    fn garbage_and_upstream_error_events_become_one_error_event() {
        let garbage = b"event: message_start\ndata: {not json}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let events = map(ProviderKind::Anthropic, ProviderKind::Openai, garbage, 5);
        assert_eq!(events.len(), 1);
        assert!(
            json(&events[0])["error"]["message"]
                .as_str()
                .unwrap()
                .contains("malformed message_start event")
        );

        let overloaded = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\nevent: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n";
        let events = map(
            ProviderKind::Anthropic,
            ProviderKind::Openai,
            overloaded.as_bytes(),
            9,
        );
        assert_eq!(events.len(), 2);
        assert_eq!(
            json(&events[1])["error"],
            serde_json::json!({"message":"Overloaded","type":"server_error","param":null,"code":null})
        );

        let openai_error = b"data: {\"error\":{\"message\":\"Rate limit reached\",\"type\":\"requests\",\"param\":null,\"code\":\"rate_limit_exceeded\"}}\n\n";
        let events = map(
            ProviderKind::Openai,
            ProviderKind::Anthropic,
            openai_error,
            4,
        );
        assert_eq!(events.len(), 1);
        assert_eq!(json(&events[0])["error"]["message"], "Rate limit reached");
        assert_eq!(json(&events[0])["error"]["type"], "rate_limit_error");

        let events = map(
            ProviderKind::Openai,
            ProviderKind::Anthropic,
            b"\xFF\xFF\n\n",
            1,
        );
        assert!(
            json(&events[0])["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not UTF-8 at byte 0")
        );
    }

    /// Whether `events` (the application's stream) ends properly: `[DONE]` or
    /// `message_stop`, or one error event and nothing after it.
    fn ends_cleanly(events: &[SseEvent]) -> bool {
        let Some(last) = events.last() else {
            return false;
        };
        let is_error =
            |e: &SseEvent| e.event.as_deref() == Some("error") || e.data.starts_with("{\"error\"");
        let errors = events.iter().filter(|e| is_error(e)).count();
        let complete = last.data == "[DONE]" || last.event.as_deref() == Some("message_stop");
        (complete && errors == 0) || (is_error(last) && errors == 1)
    }

    #[test]
    fn a_stream_cut_at_any_byte_ends_with_done_or_exactly_one_error() {
        for (provider, app, input) in [
            (
                ProviderKind::Anthropic,
                ProviderKind::Openai,
                ANTHROPIC_TOOL_STREAM,
            ),
            (
                ProviderKind::Openai,
                ProviderKind::Anthropic,
                OPENAI_TOOL_STREAM,
            ),
        ] {
            for cut in 0..=input.len() {
                let events = map(provider, app, &input.as_bytes()[..cut], 17);
                assert!(
                    ends_cleanly(&events),
                    "{provider:?} cut at {cut}: {events:?}"
                );
                if cut < input.len() {
                    assert!(
                        events.last().unwrap().data.contains("error"),
                        "{provider:?} cut at {cut} was taken as complete"
                    );
                }
            }
        }
    }

    #[test]
    fn garbage_never_panics_and_ends_with_one_error() {
        // A deterministic byte soup made of SSE-looking pieces and arbitrary bytes.
        let pieces: [&[u8]; 12] = [
            b"event: message_start\n",
            b"data: {\"type\":\"content_block_start\",\"index\":4000000000,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"f\",\"input\":{}}}\n",
            b"data: {\"type\":\"content_block_delta\",\"index\":4000000000,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\"}}\n",
            b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":7}]},\"finish_reason\":null}]}\n",
            b"data: [DONE]\n",
            b"\n",
            b"\r\n",
            b": comment\n",
            b"data: {\"type\":\"message_stop\"}\n",
            b"\xff\xfe",
            b"data: {\"error\":{\"message\":\"x\",\"type\":\"server_error\"}}\n",
            b"event: error\ndata: {}\n",
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut input = Vec::new();
            for _ in 0..8 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                input.extend_from_slice(pieces[(state % pieces.len() as u64) as usize]);
            }
            for (provider, app) in [
                (ProviderKind::Anthropic, ProviderKind::Openai),
                (ProviderKind::Openai, ProviderKind::Anthropic),
                (ProviderKind::Openai, ProviderKind::Openai),
                (ProviderKind::Anthropic, ProviderKind::Anthropic),
            ] {
                let mut mapper = StreamMapper::new(provider, app, "m", options());
                let mut wire = Vec::new();
                for chunk in input.chunks(1 + (state % 9) as usize) {
                    wire.extend(mapper.push(chunk));
                }
                wire.extend(mapper.finish());
                assert!(mapper.is_done());
                // Whatever came in, what goes out is a well-formed event stream.
                let mut parser = SseParser::new();
                let mut events = Vec::new();
                parser.push(&wire, &mut events).unwrap();
                parser.finish().unwrap();
                if provider != app {
                    assert!(
                        ends_cleanly(&events),
                        "{provider:?}->{app:?} {:?}: {events:?}",
                        String::from_utf8_lossy(&input)
                    );
                }
            }
        }
    }

    #[test]
    fn a_translated_stream_reassembles_to_the_translated_whole_response() {
        use crate::llm::translate;

        // Anthropic → OpenAI: accumulate the chunks as the OpenAI SDK does.
        let events = map(
            ProviderKind::Anthropic,
            ProviderKind::Openai,
            ANTHROPIC_TOOL_STREAM.as_bytes(),
            11,
        );
        let mut text = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        let mut finish = None;
        let mut usage = None;
        for e in events.iter().filter(|e| e.data != "[DONE]") {
            let chunk: oa::ChatCompletionChunk = decode(e.data.as_bytes()).unwrap();
            usage = chunk.usage.or(usage);
            for choice in chunk.choices {
                text.push_str(choice.delta.content.as_deref().unwrap_or(""));
                for call in choice.delta.tool_calls.into_iter().flatten() {
                    let i = call.index as usize;
                    if calls.len() <= i {
                        calls.resize(i + 1, Default::default());
                    }
                    let f = call.function.unwrap_or_default();
                    calls[i].0.push_str(call.id.as_deref().unwrap_or(""));
                    calls[i].1.push_str(f.name.as_deref().unwrap_or(""));
                    calls[i].2.push_str(f.arguments.as_deref().unwrap_or(""));
                }
                finish = choice.finish_reason.or(finish);
            }
        }
        let whole: an::MessagesResponse = decode(
            br#"{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929",
            "content":[{"type":"text","text":"Okay, let's check"},{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{"location":"San Francisco, CA"}}],
            "stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":89}}"#,
        )
        .unwrap();
        let expected = translate::anthropic_to_openai_response(&whole, 0);
        let message = &expected.choices[0].message;
        assert_eq!(Some(text), message.content);
        let expected_calls = message.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), expected_calls.len());
        for (got, want) in calls.iter().zip(expected_calls) {
            assert_eq!((&got.0, &got.1), (&want.id, &want.function.name));
            let got: Value = serde_json::from_str(&got.2).unwrap();
            let want: Value = serde_json::from_str(&want.function.arguments).unwrap();
            assert_eq!(got, want);
        }
        assert_eq!(finish, expected.choices[0].finish_reason);
        assert_eq!(usage, expected.usage);

        // OpenAI → Anthropic: accumulate the events as the Anthropic SDK does.
        let events = map(
            ProviderKind::Openai,
            ProviderKind::Anthropic,
            OPENAI_TOOL_STREAM.as_bytes(),
            11,
        );
        let mut message: Option<an::MessagesResponse> = None;
        let mut json_buffers: Vec<String> = Vec::new();
        for e in &events {
            match decode::<an::StreamEvent>(e.data.as_bytes()).unwrap() {
                an::StreamEvent::MessageStart { message: m } => message = Some(m),
                an::StreamEvent::ContentBlockStart { content_block, .. } => {
                    message.as_mut().unwrap().content.push(content_block);
                    json_buffers.push(String::new());
                }
                an::StreamEvent::ContentBlockDelta { index, delta } => {
                    let block = &mut message.as_mut().unwrap().content[index as usize];
                    match (block, delta) {
                        (an::ContentBlock::Text(t), an::BlockDelta::TextDelta { text }) => {
                            t.text.push_str(&text)
                        }
                        (
                            an::ContentBlock::ToolUse(_),
                            an::BlockDelta::InputJsonDelta { partial_json },
                        ) => json_buffers[index as usize].push_str(&partial_json),
                        other => panic!("unexpected delta {other:?}"),
                    }
                }
                an::StreamEvent::ContentBlockStop { index } => {
                    if let an::ContentBlock::ToolUse(t) =
                        &mut message.as_mut().unwrap().content[index as usize]
                    {
                        t.input = serde_json::from_str(&json_buffers[index as usize]).unwrap();
                    }
                }
                an::StreamEvent::MessageDelta { delta, usage } => {
                    let m = message.as_mut().unwrap();
                    m.stop_reason = delta.stop_reason;
                    m.usage = usage;
                }
                an::StreamEvent::MessageStop => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
        let whole: oa::ChatCompletion = decode(
            br#"{"id":"chatcmpl-123","object":"chat.completion","created":1694268190,"model":"gpt-4o-mini",
            "choices":[{"index":0,"message":{"role":"assistant","content":"Checking.","tool_calls":[
              {"id":"call_a","type":"function","function":{"name":"get_weather","arguments":"{\"location\": \"Paris\"}"}},
              {"id":"call_b","type":"function","function":{"name":"get_weather","arguments":"{\"location\": \"Rome\"}"}}]},
              "finish_reason":"tool_calls"}],
            "usage":{"prompt_tokens":82,"completion_tokens":40,"total_tokens":122,"prompt_tokens_details":{"cached_tokens":64}}}"#,
        )
        .unwrap();
        let expected = translate::openai_to_anthropic_response(&whole).unwrap();
        let got = message.unwrap();
        assert_eq!(got.content, expected.content);
        assert_eq!(got.stop_reason, expected.stop_reason);
        assert_eq!(got.usage, expected.usage);
        assert_eq!((got.id, got.model), (expected.id, expected.model));
    }

    #[test]
    fn interleaved_openai_tool_fragments_are_a_protocol_error() {
        let chunk = |delta: &str| {
            format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}]}}\n\n"
            )
        };
        let input = [
            chunk(r#"{"tool_calls":[{"index":0,"id":"a","type":"function","function":{"name":"f","arguments":""}}]}"#),
            chunk(r#"{"tool_calls":[{"index":1,"id":"b","type":"function","function":{"name":"g","arguments":""}}]}"#),
            chunk(r#"{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}"#),
        ]
        .concat();
        let events = map(
            ProviderKind::Openai,
            ProviderKind::Anthropic,
            input.as_bytes(),
            100,
        );
        let last = json(events.last().unwrap());
        assert!(
            last["error"]["message"]
                .as_str()
                .unwrap()
                .contains("tool call 0 arrived outside its turn"),
            "{last}"
        );
    }

    #[test]
    fn same_dialect_streams_pass_through_and_truncation_is_still_reported() {
        let events = map(
            ProviderKind::Openai,
            ProviderKind::Openai,
            OPENAI_TOOL_STREAM.as_bytes(),
            10,
        );
        assert_eq!(events.len(), 9);
        assert_eq!(events.last().unwrap().data, "[DONE]");
        let cut = OPENAI_TOOL_STREAM.find("data: [DONE]").unwrap();
        let events = map(
            ProviderKind::Openai,
            ProviderKind::Openai,
            &OPENAI_TOOL_STREAM.as_bytes()[..cut],
            10,
        );
        assert!(
            json(events.last().unwrap())["error"]["message"]
                .as_str()
                .unwrap()
                .contains("before its last event")
        );
    }

    #[test]
    fn openai_output_without_include_usage_has_no_usage_chunk_and_nothing_follows_done() {
        let mut mapper = StreamMapper::new(
            ProviderKind::Anthropic,
            ProviderKind::Openai,
            "m",
            OpenAiStreamOptions {
                created: 1,
                include_usage: false,
            },
        );
        let mut wire = mapper.push(ANTHROPIC_TOOL_STREAM.as_bytes());
        assert!(mapper.is_done());
        wire.extend(mapper.push(b"event: ping\ndata: {\"type\":\"ping\"}\n\n"));
        wire.extend(mapper.finish());
        let text = String::from_utf8(wire).unwrap();
        assert!(!text.contains("\"usage\""), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
}
