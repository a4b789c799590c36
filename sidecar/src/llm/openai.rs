//! OpenAI Chat Completions on the wire (`POST /v1/chat/completions`): the request, the
//! response, the `chat.completion.chunk` stream and the error body, as the API reference
//! defines them.
//!
//! Unknown top-level fields of requests and responses are kept in `extra` (OpenAI adds
//! parameters often: `seed`, `response_format`, `reasoning_effort`, …), so a request that
//! stays in its dialect is sent on unchanged. Unknown content-part types are kept whole
//! ([`ContentPart::Other`]). Known shapes with a wrong field are an error naming its path.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::decode::{field_error, from_value_at, open_string_enum, tag};

/// The body of `POST /v1/chat/completions`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatRequest {
    /// The model the application asks for (mapped per provider by `modelAliases`).
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Deprecated upper bound on generated tokens; `max_completion_tokens` replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Upper bound on generated tokens, reasoning tokens included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// How many choices to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Up to 4 sequences where generation stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Stream `chat.completion.chunk` server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options; `include_usage` adds a final chunk with usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Functions the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// Whether and which tool the model must call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Whether several tool calls may come in one turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// An end-user identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Every other parameter, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `stop`: one sequence or several.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop sequence.
    One(String),
    /// Several stop sequences.
    Many(Vec<String>),
}

impl Stop {
    /// The sequences as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::One(s)),
            v @ Value::Array(_) => from_value_at(v).map(Self::Many),
            other => Err(serde::de::Error::custom(format_args!(
                "expected a string or an array of strings, found {other}"
            ))),
        }
    }
}

/// `stream_options`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct StreamOptions {
    /// Send a last chunk, with empty `choices`, that carries the usage of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// Other stream options, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One message of the conversation, told apart by `role`.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Message {
    /// Instructions from the application.
    System {
        /// The instructions.
        content: Content,
        /// An optional participant name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Instructions from the developer (newer models' name for `system`).
    Developer {
        /// The instructions.
        content: Content,
        /// An optional participant name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// A user turn: text, images, audio or files.
    User {
        /// What the user said.
        content: Content,
        /// An optional participant name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// An earlier model turn, possibly with tool calls.
    Assistant(AssistantMessage),
    /// The result of one tool call.
    Tool {
        /// The result.
        content: Content,
        /// The `id` of the tool call this answers.
        tool_call_id: String,
    },
}

/// An assistant turn in a request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct AssistantMessage {
    /// The text; may be null when `tool_calls` is set.
    #[serde(default)]
    pub content: Option<Content>,
    /// A refusal by the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// The tools the model called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// An optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Instructions {
            content: Content,
            #[serde(default)]
            name: Option<String>,
        }
        #[derive(Deserialize)]
        struct ToolResult {
            content: Content,
            tool_call_id: String,
        }
        let value = Value::deserialize(d)?;
        match tag(&value, "role")? {
            "system" => from_value_at::<Instructions, _>(value).map(|m| Self::System {
                content: m.content,
                name: m.name,
            }),
            "developer" => from_value_at::<Instructions, _>(value).map(|m| Self::Developer {
                content: m.content,
                name: m.name,
            }),
            "user" => from_value_at::<Instructions, _>(value).map(|m| Self::User {
                content: m.content,
                name: m.name,
            }),
            "assistant" => from_value_at(value).map(Self::Assistant),
            "tool" => from_value_at::<ToolResult, _>(value).map(|m| Self::Tool {
                content: m.content,
                tool_call_id: m.tool_call_id,
            }),
            other => Err(field_error(
                "role",
                format_args!(
                    "unknown role {other:?}, expected system, developer, user, assistant or tool"
                ),
            )),
        }
    }
}

/// Message content: a string, or an array of typed parts.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts: text, images, audio, files.
    Parts(Vec<ContentPart>),
}

impl Content {
    /// The text of the content: the string, or the text parts joined without separator
    /// (the API reads consecutive text parts as one text).
    pub fn text(&self) -> String {
        match self {
            Self::Text(s) => s.clone(),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect(),
        }
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Text(s)),
            v @ Value::Array(_) => from_value_at(v).map(Self::Parts),
            other => Err(serde::de::Error::custom(format_args!(
                "expected a string or an array of content parts, found {other}"
            ))),
        }
    }
}

/// One part of a message's content.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image by URL or as a `data:` URL holding base64.
    ImageUrl {
        /// The image.
        image_url: ImageUrl,
    },
    /// A refusal (assistant content only).
    Refusal {
        /// Why the model refused.
        refusal: String,
    },
    /// Another part type (`input_audio`, `file`, …), kept as sent.
    #[serde(untagged)]
    Other(Value),
}

impl<'de> Deserialize<'de> for ContentPart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Text {
            text: String,
        }
        #[derive(Deserialize)]
        struct Image {
            image_url: ImageUrl,
        }
        #[derive(Deserialize)]
        struct Refusal {
            refusal: String,
        }
        let value = Value::deserialize(d)?;
        match tag(&value, "type")? {
            "text" => from_value_at::<Text, _>(value).map(|p| Self::Text { text: p.text }),
            "image_url" => from_value_at::<Image, _>(value).map(|p| Self::ImageUrl {
                image_url: p.image_url,
            }),
            "refusal" => {
                from_value_at::<Refusal, _>(value).map(|p| Self::Refusal { refusal: p.refusal })
            }
            _ => Ok(Self::Other(value)),
        }
    }
}

/// An image reference.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ImageUrl {
    /// `https://…` or `data:image/png;base64,…`.
    pub url: String,
    /// `auto`, `low` or `high`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A tool the model may call.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Tool {
    /// Always `function` for function tools.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDefinition,
}

/// A callable function: its name and JSON-Schema parameters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FunctionDefinition {
    /// The function's name.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Structured outputs: arguments follow the schema exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: a mode or one named function.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    /// `none`: no tool call.
    None,
    /// `auto`: the model decides.
    Auto,
    /// `required`: at least one tool call.
    Required,
    /// `{"type":"function","function":{"name":…}}`: this function.
    Function(String),
    /// Another form (`allowed_tools`, `custom`), kept as sent.
    Other(Value),
}

impl Serialize for ToolChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::None => s.serialize_str("none"),
            Self::Auto => s.serialize_str("auto"),
            Self::Required => s.serialize_str("required"),
            Self::Function(name) => {
                serde_json::json!({"type": "function", "function": {"name": name}}).serialize(s)
            }
            Self::Other(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Named {
            function: Name,
        }
        #[derive(Deserialize)]
        struct Name {
            name: String,
        }
        let value = Value::deserialize(d)?;
        match &value {
            Value::String(s) => match s.as_str() {
                "none" => Ok(Self::None),
                "auto" => Ok(Self::Auto),
                "required" => Ok(Self::Required),
                other => Err(serde::de::Error::custom(format_args!(
                    "unknown tool_choice {other:?}, expected none, auto, required or an object"
                ))),
            },
            Value::Object(_) => match tag(&value, "type")? {
                "function" => {
                    from_value_at::<Named, _>(value).map(|n| Self::Function(n.function.name))
                }
                _ => Ok(Self::Other(value)),
            },
            other => Err(serde::de::Error::custom(format_args!(
                "expected a string or an object, found {other}"
            ))),
        }
    }
}

/// A tool call made by the model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// The call's id; the tool message answering it repeats it as `tool_call_id`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// A function call: name and arguments as a JSON string.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// The arguments, a JSON object serialized as a string (the model may produce
    /// invalid JSON).
    pub arguments: String,
}

/// The body of a non-streaming response.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatCompletion {
    /// `chatcmpl-…`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// One choice per `n`.
    pub choices: Vec<Choice>,
    /// Token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Backend configuration fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One generated choice.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Choice {
    /// Position among the choices.
    pub index: u32,
    /// The generated message.
    pub message: ResponseMessage,
    /// Why generation stopped.
    pub finish_reason: Option<FinishReason>,
    /// Log probabilities, when requested.
    #[serde(default)]
    pub logprobs: Option<Value>,
}

/// The message of a choice.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ResponseMessage {
    /// Always `assistant`.
    pub role: String,
    /// The text, or null.
    pub content: Option<String>,
    /// A refusal, or null.
    #[serde(default)]
    pub refusal: Option<String>,
    /// Tool calls, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

open_string_enum! {
    /// Why a choice stopped.
    pub enum FinishReason {
        /// A natural end or a stop sequence.
        Stop = "stop",
        /// `max_tokens` reached.
        Length = "length",
        /// The model called tools.
        ToolCalls = "tool_calls",
        /// Content was filtered.
        ContentFilter = "content_filter",
        /// Deprecated function calling.
        FunctionCall = "function_call",
    }
}

/// Token counts of a request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Usage {
    /// Input tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Generated tokens, reasoning included.
    pub completion_tokens: u64,
    /// The sum.
    pub total_tokens: u64,
    /// Details of the input tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// Details of the generated tokens, kept as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<Value>,
}

/// `usage.prompt_tokens_details`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PromptTokensDetails {
    /// Input tokens read from the prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// Other details, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One streamed `chat.completion.chunk`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatCompletionChunk {
    /// The same id on every chunk of a response.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds, the same on every chunk.
    pub created: u64,
    /// The model that answers.
    pub model: String,
    /// Backend configuration fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Deltas; empty on the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Null except on the last chunk when `stream_options.include_usage` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One choice's delta.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChunkChoice {
    /// Which choice.
    pub index: u32,
    /// What is new.
    pub delta: Delta,
    /// Set on the choice's last chunk.
    pub finish_reason: Option<FinishReason>,
    /// Log probabilities, when requested.
    #[serde(default)]
    pub logprobs: Option<Value>,
}

/// What a chunk adds to the message.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Delta {
    /// `assistant`, on the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// More text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// More refusal text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Tool-call fragments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A fragment of one tool call: the first carries `id`, `type` and the name, the
/// following ones pieces of `arguments`; `index` says which call.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ToolCallDelta {
    /// Which tool call of the message.
    pub index: u32,
    /// The call's id, on its first fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function`, on the first fragment.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name and argument text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
}

/// A fragment of a function call.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct FunctionCallDelta {
    /// The function's name, on the first fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// More argument text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// An error response body (also sent as a `data:` line inside a stream).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error inside [`ErrorBody`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorDetail {
    /// A human-readable message.
    pub message: String,
    /// `invalid_request_error`, `server_error`, `requests`, `tokens`, `insufficient_quota`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault, or null.
    #[serde(default)]
    pub param: Option<String>,
    /// A machine-readable code (`rate_limit_exceeded`, `invalid_api_key`), or null.
    #[serde(default)]
    pub code: Option<Value>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::llm::{decode::decode, fixtures::OPENAI_REQUEST as FULL_REQUEST};

    #[test]
    fn decodes_a_request_with_every_translated_feature() {
        let req: ChatRequest = decode(FULL_REQUEST.as_bytes()).unwrap();
        assert_eq!(req.messages.len(), 5);
        assert!(
            matches!(&req.messages[0], Message::System { content: Content::Text(t), .. } if t.starts_with("You are"))
        );
        let Message::User {
            content: Content::Parts(parts),
            ..
        } = &req.messages[2]
        else {
            panic!("user message with parts expected");
        };
        assert!(
            matches!(&parts[1], ContentPart::ImageUrl { image_url } if image_url.detail.as_deref() == Some("high"))
        );
        let Message::Assistant(a) = &req.messages[3] else {
            panic!("assistant expected")
        };
        assert_eq!(a.content, None);
        assert_eq!(a.tool_calls.as_ref().unwrap()[0].id, "call_abc123");
        assert!(
            matches!(&req.messages[4], Message::Tool { tool_call_id, .. } if tool_call_id == "call_abc123")
        );
        assert_eq!(
            req.tool_choice,
            Some(ToolChoice::Function("get_current_weather".into()))
        );
        assert_eq!(req.stop, Some(Stop::Many(vec!["\n\nHuman:".into()])));
        assert_eq!(
            req.stream_options.as_ref().unwrap().include_usage,
            Some(true)
        );
        // Parameters the gateway does not interpret are kept for same-dialect providers.
        assert_eq!(req.extra["seed"], 42);
        assert_eq!(req.extra["response_format"]["type"], "text");
    }

    #[test]
    fn request_round_trips_through_serialization() {
        let req: ChatRequest = decode(FULL_REQUEST.as_bytes()).unwrap();
        let again: ChatRequest = decode(&serde_json::to_vec(&req).unwrap()).unwrap();
        assert_eq!(req, again);
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["messages"][4]["role"], "tool");
        assert_eq!(
            json["tool_choice"]["function"]["name"],
            "get_current_weather"
        );
        assert_eq!(json["seed"], 42);
    }

    #[test]
    fn malformed_requests_name_the_path() {
        let err = decode::<ChatRequest>(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"},
                {"role":"user","content":[{"type":"image_url","image_url":{"url":5}}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "messages[1].content[0].image_url.url");
        assert!(
            err.message
                .starts_with("invalid type: integer `5`, expected a string"),
            "{err}"
        );

        let err =
            decode::<ChatRequest>(br#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#)
                .unwrap_err();
        assert_eq!(err.path, "messages[0].role");
        assert!(err.message.contains("unknown role \"robot\""), "{err}");

        let err =
            decode::<ChatRequest>(br#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#)
                .unwrap_err();
        assert!(
            err.message.contains("missing field `tool_call_id`"),
            "{err}"
        );

        let err = decode::<ChatRequest>(br#"{"messages":[]}"#).unwrap_err();
        assert!(err.message.contains("missing field `model`"), "{err}");
    }

    #[test]
    fn unknown_content_parts_and_finish_reasons_are_kept() {
        let req: ChatRequest = decode(
            br#"{"model":"m","messages":[{"role":"user","content":[
                {"type":"input_audio","input_audio":{"data":"AAA=","format":"wav"}}]}]}"#,
        )
        .unwrap();
        let Message::User {
            content: Content::Parts(parts),
            ..
        } = &req.messages[0]
        else {
            panic!("parts expected")
        };
        assert!(matches!(&parts[0], ContentPart::Other(v) if v["input_audio"]["format"] == "wav"));
        assert_eq!(
            FinishReason::from("brand_new"),
            FinishReason::Other("brand_new".into())
        );
    }

    #[test]
    fn decodes_responses_chunks_and_errors_from_the_reference() {
        let resp: ChatCompletion = decode(
            br#"{"id":"chatcmpl-123","object":"chat.completion","created":1677652288,"model":"gpt-4o-mini",
            "system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"message":{"role":"assistant",
            "content":"\n\nHello there, how may I assist you today?","refusal":null,"annotations":[]},
            "logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":12,
            "total_tokens":21,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},
            "completion_tokens_details":{"reasoning_tokens":0}},"service_tier":"default"}"#,
        )
        .unwrap();
        assert_eq!(resp.choices[0].finish_reason, Some(FinishReason::Stop));
        assert_eq!(resp.usage.as_ref().unwrap().total_tokens, 21);
        assert_eq!(resp.extra["service_tier"], "default");

        let chunk: ChatCompletionChunk = decode(
            br#"{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini",
            "choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_DdmO9pD3xa9XTPNJ32zg2hcA",
            "type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}],
            "usage":null}"#,
        )
        .unwrap();
        let call = &chunk.choices[0].delta.tool_calls.as_ref().unwrap()[0];
        assert_eq!(call.id.as_deref(), Some("call_DdmO9pD3xa9XTPNJ32zg2hcA"));

        let err: ErrorBody = decode(
            br#"{"error":{"message":"Rate limit reached for gpt-4o on requests per min (RPM): Limit 3, Used 3, Requested 1.",
            "type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
        )
        .unwrap();
        assert_eq!(err.error.kind, "requests");
        assert_eq!(err.error.code, Some(Value::from("rate_limit_exceeded")));
    }
}
