//! Anthropic Messages on the wire (`POST /v1/messages`): the request, the response, the
//! stream events and the error body, as the API reference defines them.
//!
//! Anthropic adds content-block types, stream events and delta types over time and asks
//! clients to tolerate unknown ones: those are kept whole (`Other`). Unknown top-level
//! request and response fields are kept in `extra`. Known shapes with a wrong field are an
//! error naming its path.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::decode::{from_value_at, open_string_enum, tag};

/// The body of `POST /v1/messages`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MessagesRequest {
    /// The model the application asks for (mapped per provider by `modelAliases`).
    pub model: String,
    /// The most tokens to generate; required by the API.
    pub max_tokens: u32,
    /// Alternating user and assistant turns.
    pub messages: Vec<Message>,
    /// The system prompt: a string or text blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemPrompt>,
    /// Sequences where generation stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<Vec<String>>,
    /// Stream server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Sampling temperature, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Sample only from the top K options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Tools the model may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// How the model uses the tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Request metadata (`user_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// Every other parameter (`thinking`, `service_tier`, …), kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `metadata`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    /// An opaque identifier of the end user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

/// `system`: a string or text blocks.
#[derive(Clone, Debug, PartialEq)]
pub enum SystemPrompt {
    /// Plain text.
    Text(String),
    /// Text blocks (which may carry `cache_control`).
    Blocks(Vec<TextBlock>),
}

impl SystemPrompt {
    /// The prompt's text, blocks joined by a blank line.
    pub fn text(&self) -> String {
        match self {
            Self::Text(s) => s.clone(),
            Self::Blocks(blocks) => blocks
                .iter()
                .map(|b| b.text.as_str())
                .collect::<Vec<_>>()
                .join("\n\n"),
        }
    }
}

impl Serialize for SystemPrompt {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        /// A text block with its `"type": "text"` tag.
        #[derive(Serialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum Tagged<'a> {
            Text(&'a TextBlock),
        }
        match self {
            Self::Text(text) => s.serialize_str(text),
            Self::Blocks(blocks) => s.collect_seq(blocks.iter().map(Tagged::Text)),
        }
    }
}

impl<'de> Deserialize<'de> for SystemPrompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Text(s)),
            v @ Value::Array(_) => from_value_at(v).map(Self::Blocks),
            other => Err(serde::de::Error::custom(format_args!(
                "expected a string or an array of text blocks, found {other}"
            ))),
        }
    }
}

/// Who speaks a turn.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The application's user (tool results are sent as user turns).
    User,
    /// The model.
    Assistant,
}

/// One turn.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What was said.
    pub content: MessageContent,
}

/// A turn's content: a string or content blocks.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content blocks.
    Blocks(Vec<ContentBlock>),
}

impl MessageContent {
    /// The content as blocks (a string is one text block).
    pub fn into_blocks(self) -> Vec<ContentBlock> {
        match self {
            Self::Text(text) => vec![ContentBlock::Text(TextBlock::new(text))],
            Self::Blocks(blocks) => blocks,
        }
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Text(s)),
            v @ Value::Array(_) => from_value_at(v).map(Self::Blocks),
            other => Err(serde::de::Error::custom(format_args!(
                "expected a string or an array of content blocks, found {other}"
            ))),
        }
    }
}

/// A content block, told apart by `type`.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    /// Text.
    Text(TextBlock),
    /// An image, base64 or by URL.
    Image(ImageBlock),
    /// A tool call by the model.
    ToolUse(ToolUseBlock),
    /// The result of a tool call, sent in a user turn.
    ToolResult(ToolResultBlock),
    /// Extended thinking.
    Thinking(ThinkingBlock),
    /// Extended thinking, encrypted.
    RedactedThinking(RedactedThinkingBlock),
    /// Another block type (`document`, `server_tool_use`, `web_search_tool_result`, …),
    /// kept as sent.
    #[serde(untagged)]
    Other(Value),
}

impl<'de> Deserialize<'de> for ContentBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        match tag(&value, "type")? {
            "text" => from_value_at(value).map(Self::Text),
            "image" => from_value_at(value).map(Self::Image),
            "tool_use" => from_value_at(value).map(Self::ToolUse),
            "tool_result" => from_value_at(value).map(Self::ToolResult),
            "thinking" => from_value_at(value).map(Self::Thinking),
            "redacted_thinking" => from_value_at(value).map(Self::RedactedThinking),
            _ => Ok(Self::Other(value)),
        }
    }
}

/// A text block.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TextBlock {
    /// The text.
    pub text: String,
    /// Prompt-caching breakpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<Value>,
    /// Citations (responses), kept as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub citations: Option<Value>,
}

impl TextBlock {
    /// A plain text block.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            cache_control: None,
            citations: None,
        }
    }
}

/// An image block.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ImageBlock {
    /// Where the image is.
    pub source: ImageSource,
    /// Prompt-caching breakpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<Value>,
}

/// An image's source.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageSource {
    /// Inline base64 data.
    Base64 {
        /// `image/jpeg`, `image/png`, `image/gif` or `image/webp`.
        media_type: String,
        /// The base64 data.
        data: String,
    },
    /// An image URL.
    Url {
        /// The URL.
        url: String,
    },
    /// Another source (`file`), kept as sent.
    #[serde(untagged)]
    Other(Value),
}

impl<'de> Deserialize<'de> for ImageSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Base64 {
            media_type: String,
            data: String,
        }
        #[derive(Deserialize)]
        struct Url {
            url: String,
        }
        let value = Value::deserialize(d)?;
        match tag(&value, "type")? {
            "base64" => from_value_at::<Base64, _>(value).map(|s| Self::Base64 {
                media_type: s.media_type,
                data: s.data,
            }),
            "url" => from_value_at::<Url, _>(value).map(|s| Self::Url { url: s.url }),
            _ => Ok(Self::Other(value)),
        }
    }
}

/// A tool call by the model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ToolUseBlock {
    /// `toolu_…`; the result repeats it as `tool_use_id`.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments, an object.
    pub input: Value,
    /// Prompt-caching breakpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<Value>,
}

/// The result of a tool call.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ToolResultBlock {
    /// The `id` of the tool_use block this answers.
    pub tool_use_id: String,
    /// The result: a string or text and image blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// Whether the tool failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
    /// Prompt-caching breakpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<Value>,
}

/// A thinking block.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ThinkingBlock {
    /// The reasoning text.
    pub thinking: String,
    /// Integrity signature, to send the block back unchanged.
    #[serde(default)]
    pub signature: String,
}

/// A redacted thinking block.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RedactedThinkingBlock {
    /// Encrypted reasoning.
    pub data: String,
}

/// A tool definition: a client tool with an input schema, or a server tool (`type`
/// such as `web_search_20250305`) whose other fields are kept in `extra`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Tool {
    /// The tool's name.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the input object (client tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// `custom` or a server tool's versioned type; absent for client tools.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Prompt-caching breakpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<Value>,
    /// Other fields of server tools, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `tool_choice`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides.
    Auto {
        /// At most one tool call.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disable_parallel_tool_use: Option<bool>,
    },
    /// Some tool must be used.
    Any {
        /// At most one tool call.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disable_parallel_tool_use: Option<bool>,
    },
    /// This tool must be used.
    Tool {
        /// The tool's name.
        name: String,
        /// At most one tool call.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disable_parallel_tool_use: Option<bool>,
    },
    /// No tool may be used.
    None,
}

/// The body of a non-streaming response, and the `message` of `message_start`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MessagesResponse {
    /// `msg_…`.
    pub id: String,
    /// Always `message`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Always `assistant`.
    pub role: Role,
    /// The generated blocks (empty in `message_start`).
    pub content: Vec<ContentBlock>,
    /// The model that answered.
    pub model: String,
    /// Why generation stopped; null in `message_start`.
    pub stop_reason: Option<StopReason>,
    /// The stop sequence that matched, if that was the reason.
    #[serde(default)]
    pub stop_sequence: Option<String>,
    /// Token counts.
    pub usage: Usage,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

open_string_enum! {
    /// Why a response stopped.
    pub enum StopReason {
        /// A natural end.
        EndTurn = "end_turn",
        /// `max_tokens` reached.
        MaxTokens = "max_tokens",
        /// A stop sequence matched.
        StopSequence = "stop_sequence",
        /// The model called tools.
        ToolUse = "tool_use",
        /// A long server-tool turn was paused.
        PauseTurn = "pause_turn",
        /// The model refused.
        Refusal = "refusal",
        /// The context window is full.
        ModelContextWindowExceeded = "model_context_window_exceeded",
    }
}

/// Token counts. Anthropic's `input_tokens` excludes the tokens read from or written
/// to the prompt cache, which are counted apart.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Usage {
    /// Uncached input tokens.
    #[serde(default)]
    pub input_tokens: u64,
    /// Generated tokens.
    #[serde(default)]
    pub output_tokens: u64,
    /// Input tokens written to the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
    /// Input tokens read from the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u64>,
    /// Other counters (`server_tool_use`, `service_tier`), kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One server-sent event of a streamed response; the SSE `event:` name equals `type`.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    /// The message with empty content.
    MessageStart {
        /// The message so far.
        message: MessagesResponse,
    },
    /// A block opens.
    ContentBlockStart {
        /// Its position in the final `content`.
        index: u32,
        /// The block, empty.
        content_block: ContentBlock,
    },
    /// A block grows.
    ContentBlockDelta {
        /// Which block.
        index: u32,
        /// What is new.
        delta: BlockDelta,
    },
    /// A block is complete.
    ContentBlockStop {
        /// Which block.
        index: u32,
    },
    /// Top-level changes: stop reason and cumulative usage.
    MessageDelta {
        /// The changes.
        delta: MessageDeltaBody,
        /// Cumulative token counts.
        usage: Usage,
    },
    /// The end of the stream.
    MessageStop,
    /// Keep-alive.
    Ping,
    /// An error inside the stream (e.g. `overloaded_error`).
    Error {
        /// The error.
        error: ErrorDetail,
    },
    /// An event type this version does not know, kept as sent.
    #[serde(untagged)]
    Other(Value),
}

impl StreamEvent {
    /// The SSE `event:` name of this event.
    pub fn name(&self) -> &str {
        match self {
            Self::MessageStart { .. } => "message_start",
            Self::ContentBlockStart { .. } => "content_block_start",
            Self::ContentBlockDelta { .. } => "content_block_delta",
            Self::ContentBlockStop { .. } => "content_block_stop",
            Self::MessageDelta { .. } => "message_delta",
            Self::MessageStop => "message_stop",
            Self::Ping => "ping",
            Self::Error { .. } => "error",
            Self::Other(v) => v.get("type").and_then(Value::as_str).unwrap_or("unknown"),
        }
    }
}

impl<'de> Deserialize<'de> for StreamEvent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Start {
            message: MessagesResponse,
        }
        #[derive(Deserialize)]
        struct BlockStart {
            index: u32,
            content_block: ContentBlock,
        }
        #[derive(Deserialize)]
        struct Delta {
            index: u32,
            delta: BlockDelta,
        }
        #[derive(Deserialize)]
        struct Stop {
            index: u32,
        }
        #[derive(Deserialize)]
        struct MsgDelta {
            delta: MessageDeltaBody,
            #[serde(default)]
            usage: Usage,
        }
        #[derive(Deserialize)]
        struct Error {
            error: ErrorDetail,
        }
        let value = Value::deserialize(d)?;
        match tag(&value, "type")? {
            "message_start" => {
                from_value_at::<Start, _>(value).map(|e| Self::MessageStart { message: e.message })
            }
            "content_block_start" => {
                from_value_at::<BlockStart, _>(value).map(|e| Self::ContentBlockStart {
                    index: e.index,
                    content_block: e.content_block,
                })
            }
            "content_block_delta" => {
                from_value_at::<Delta, _>(value).map(|e| Self::ContentBlockDelta {
                    index: e.index,
                    delta: e.delta,
                })
            }
            "content_block_stop" => {
                from_value_at::<Stop, _>(value).map(|e| Self::ContentBlockStop { index: e.index })
            }
            "message_delta" => from_value_at::<MsgDelta, _>(value).map(|e| Self::MessageDelta {
                delta: e.delta,
                usage: e.usage,
            }),
            "message_stop" => Ok(Self::MessageStop),
            "ping" => Ok(Self::Ping),
            "error" => from_value_at::<Error, _>(value).map(|e| Self::Error { error: e.error }),
            _ => Ok(Self::Other(value)),
        }
    }
}

/// What a `content_block_delta` adds.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockDelta {
    /// More text.
    TextDelta {
        /// The text.
        text: String,
    },
    /// More of a tool_use block's input, as a fragment of JSON text.
    InputJsonDelta {
        /// The fragment.
        partial_json: String,
    },
    /// More thinking.
    ThinkingDelta {
        /// The text.
        thinking: String,
    },
    /// The thinking block's signature.
    SignatureDelta {
        /// The signature.
        signature: String,
    },
    /// A delta type this version does not know (`citations_delta`, …), kept as sent.
    #[serde(untagged)]
    Other(Value),
}

impl<'de> Deserialize<'de> for BlockDelta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Text {
            text: String,
        }
        #[derive(Deserialize)]
        struct Json {
            partial_json: String,
        }
        #[derive(Deserialize)]
        struct Thinking {
            thinking: String,
        }
        #[derive(Deserialize)]
        struct Signature {
            signature: String,
        }
        let value = Value::deserialize(d)?;
        match tag(&value, "type")? {
            "text_delta" => {
                from_value_at::<Text, _>(value).map(|x| Self::TextDelta { text: x.text })
            }
            "input_json_delta" => from_value_at::<Json, _>(value).map(|x| Self::InputJsonDelta {
                partial_json: x.partial_json,
            }),
            "thinking_delta" => from_value_at::<Thinking, _>(value).map(|x| Self::ThinkingDelta {
                thinking: x.thinking,
            }),
            "signature_delta" => {
                from_value_at::<Signature, _>(value).map(|x| Self::SignatureDelta {
                    signature: x.signature,
                })
            }
            _ => Ok(Self::Other(value)),
        }
    }
}

/// The `delta` of `message_delta`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct MessageDeltaBody {
    /// Why generation stopped.
    #[serde(default)]
    pub stop_reason: Option<StopReason>,
    /// The stop sequence that matched.
    #[serde(default)]
    pub stop_sequence: Option<String>,
}

/// An error response body.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorBody {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The error.
    pub error: ErrorDetail,
    /// The request's id, for Anthropic support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The error inside [`ErrorBody`] and the `error` stream event.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorDetail {
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`,
    /// `overloaded_error`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// A human-readable message.
    pub message: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::llm::{decode::decode, fixtures::ANTHROPIC_REQUEST};

    #[test]
    fn decodes_a_request_with_every_translated_feature() {
        let req: MessagesRequest = decode(ANTHROPIC_REQUEST.as_bytes()).unwrap();
        assert_eq!(req.max_tokens, 1024);
        assert!(
            matches!(&req.system, Some(SystemPrompt::Blocks(b)) if b[0].cache_control.is_some())
        );
        let MessageContent::Blocks(blocks) = &req.messages[0].content else {
            panic!("blocks expected")
        };
        assert!(
            matches!(&blocks[1], ContentBlock::Image(ImageBlock { source: ImageSource::Base64 { media_type, .. }, .. }) if media_type == "image/jpeg")
        );
        assert!(matches!(
            &blocks[2],
            ContentBlock::Image(ImageBlock {
                source: ImageSource::Url { .. },
                ..
            })
        ));
        let MessageContent::Blocks(blocks) = &req.messages[1].content else {
            panic!("blocks expected")
        };
        assert!(
            matches!(&blocks[1], ContentBlock::ToolUse(t) if t.id == "toolu_01A09q90qw90lq917835lq9" && t.input["location"] == "San Francisco, CA")
        );
        let MessageContent::Blocks(blocks) = &req.messages[2].content else {
            panic!("blocks expected")
        };
        assert!(
            matches!(&blocks[0], ContentBlock::ToolResult(r) if r.tool_use_id == "toolu_01A09q90qw90lq917835lq9")
        );
        assert_eq!(
            req.tool_choice,
            Some(ToolChoice::Auto {
                disable_parallel_tool_use: Some(true)
            })
        );
        assert_eq!(req.extra["thinking"]["budget_tokens"], 2048);
        let again: MessagesRequest = decode(&serde_json::to_vec(&req).unwrap()).unwrap();
        assert_eq!(req, again);
    }

    #[test]
    fn malformed_requests_name_the_path() {
        let err = decode::<MessagesRequest>(
            br#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":[
                {"type":"image","source":{"type":"base64","media_type":"image/png"}}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "messages[0].content[0].source");
        assert!(err.message.starts_with("missing field `data`"), "{err}");

        let err = decode::<MessagesRequest>(br#"{"model":"m","messages":[]}"#).unwrap_err();
        assert!(err.message.contains("missing field `max_tokens`"), "{err}");

        let err = decode::<MessagesRequest>(
            br#"{"model":"m","max_tokens":10,"messages":[{"role":"system","content":"x"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "messages[0].role");
    }

    #[test]
    fn unknown_blocks_events_and_stop_reasons_are_kept() {
        let block: ContentBlock = decode(
            br#"{"type":"document","source":{"type":"text","media_type":"text/plain","data":"Grass is green."}}"#,
        )
        .unwrap();
        assert!(
            matches!(&block, ContentBlock::Other(v) if v["source"]["data"] == "Grass is green.")
        );
        assert_eq!(serde_json::to_value(&block).unwrap()["type"], "document");
        let ev: StreamEvent = decode(br#"{"type":"future_event","x":1}"#).unwrap();
        assert_eq!(ev.name(), "future_event");
        assert_eq!(StopReason::from("pause_turn"), StopReason::PauseTurn);
        assert_eq!(StopReason::from("new_reason").as_str(), "new_reason");
    }

    #[test]
    fn decodes_the_reference_stream_events_and_errors() {
        let events = [
            r#"{"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type": "ping"}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"San Fra"}}"#,
            r#"{"type":"content_block_stop","index":1}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}"#,
            r#"{"type":"message_stop"}"#,
            r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#,
        ];
        let decoded: Vec<StreamEvent> = events
            .iter()
            .map(|e| decode(e.as_bytes()).unwrap())
            .collect();
        assert!(
            matches!(&decoded[0], StreamEvent::MessageStart { message } if message.usage.input_tokens == 25)
        );
        assert_eq!(decoded[2], StreamEvent::Ping);
        assert!(
            matches!(&decoded[5], StreamEvent::ContentBlockDelta { index: 1, delta: BlockDelta::InputJsonDelta { partial_json } } if partial_json.starts_with("{\"location"))
        );
        assert!(
            matches!(&decoded[7], StreamEvent::MessageDelta { delta, usage } if delta.stop_reason == Some(StopReason::ToolUse) && usage.output_tokens == 89)
        );
        assert!(
            matches!(&decoded[9], StreamEvent::Error { error } if error.kind == "overloaded_error")
        );
        for (text, event) in events.iter().zip(&decoded) {
            let back: StreamEvent = decode(&serde_json::to_vec(event).unwrap()).unwrap();
            assert_eq!(&back, event, "{text}");
        }

        let err: ErrorBody = decode(
            br#"{"type":"error","error":{"type":"not_found_error","message":"The requested resource could not be found."},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#,
        )
        .unwrap();
        assert_eq!(err.error.kind, "not_found_error");
        assert_eq!(
            err.request_id.as_deref(),
            Some("req_011CSHoEeqs5C35K2UUqR7Fy")
        );
    }

    #[test]
    fn decodes_a_tool_use_response() {
        let resp: MessagesResponse =
            decode(crate::llm::fixtures::ANTHROPIC_TOOL_RESPONSE.as_bytes()).unwrap();
        assert_eq!(resp.stop_reason, Some(StopReason::ToolUse));
        assert!(matches!(&resp.content[1], ContentBlock::ToolUse(t) if t.name == "get_weather"));
        assert_eq!(resp.usage.cache_read_input_tokens, Some(100));
    }
}
