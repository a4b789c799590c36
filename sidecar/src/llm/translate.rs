//! Translation between OpenAI Chat Completions and Anthropic Messages: requests both
//! ways, responses both ways, error bodies into the application's dialect, and the model
//! name each provider is sent.
//!
//! # Lossy corners
//!
//! The two APIs do not say everything the same way. Where a translation loses or
//! changes something, this is what happens and why:
//!
//! **OpenAI → Anthropic (request)**
//! - *Several `system`/`developer` messages*: each becomes one text block of Anthropic's
//!   single `system` prompt, in order. A system message in the middle of the conversation
//!   moves to the front: Anthropic has no mid-conversation system turn.
//! - *`n` > 1*: refused ([`TranslateError::Unsupported`]); Anthropic returns one message,
//!   and an application asking for several choices would silently get one.
//! - *Tool-call ids*: kept as they are, so the tool message answering a call still
//!   matches it. Anthropic accepts ids of `[A-Za-z0-9_-]`; any other character is replaced
//!   by `_`, in the call and in its result alike, so pairs stay consistent.
//! - *Tool-call `arguments`* are a JSON string in OpenAI and an object in Anthropic: they
//!   are parsed, and a string that is not a JSON object is refused naming the message.
//! - *Consecutive tool messages* become one user turn of `tool_result` blocks (Anthropic
//!   wants all results of a turn together, first in the next user turn); consecutive
//!   turns of one role are merged.
//! - *`temperature`* ranges 0–2 in OpenAI and 0–1 in Anthropic: values above 1 are
//!   clamped to 1.
//! - *`max_tokens`* is required by Anthropic: `max_completion_tokens`, else the deprecated
//!   `max_tokens`, else the caller's default (the policy's `reserveOutputTokens`).
//! - *Empty text* (system, user or assistant) is dropped, since Anthropic refuses empty
//!   text blocks, and so is a turn left with nothing.
//! - *`name` of a message, `detail` of an image, `stream_options`* and the OpenAI-only
//!   parameters kept in `extra` (`seed`, `logprobs`, `response_format`, penalties,
//!   `logit_bias`, …) are dropped. Audio and file parts and non-function tools are refused.
//!
//! **Anthropic → OpenAI (request)**
//! - *`system` blocks* become one system message, blocks joined by a blank line;
//!   `cache_control` everywhere is dropped (OpenAI caches prompts by itself).
//! - *`tool_result` blocks* become `tool` messages placed before the rest of that user
//!   turn. Their text is kept; `is_error: true` is kept as an `(error)` prefix; images in
//!   a tool result are refused (OpenAI tool messages carry text only).
//! - *`thinking` / `redacted_thinking` blocks* of earlier turns are dropped: Chat
//!   Completions cannot send reasoning back.
//! - *`top_k`, `thinking`* and other Anthropic-only parameters are dropped; documents and
//!   server tools are refused. `max_tokens` is sent as `max_completion_tokens`.
//! - *Streams* ask for `stream_options.include_usage`, so that the translated stream can
//!   report usage in `message_delta` as Anthropic does.
//!
//! **Responses**
//! - *Usage*: OpenAI's `prompt_tokens` includes cached tokens, Anthropic's
//!   `input_tokens` excludes cache reads and writes: `prompt_tokens = input + cache read +
//!   cache creation`, `cached_tokens = cache read`, and back.
//! - *Stop reasons*: `end_turn`/`stop_sequence`/`pause_turn` → `stop`; `max_tokens`/
//!   `model_context_window_exceeded` → `length`; `tool_use` → `tool_calls`; `refusal` →
//!   `content_filter`. Back: `stop` → `end_turn` (OpenAI does not say whether a stop
//!   sequence matched), `length` → `max_tokens`, `tool_calls`/`function_call` →
//!   `tool_use`, `content_filter` → `refusal`.
//! - *Only the first choice* of an OpenAI response is translated (the request never asks
//!   for more). Tool-call `arguments` that are not JSON are passed as a JSON string.
//! - *Ids and model*: the provider's response id and model name are kept: the
//!   application learns which model answered.
//!
//! **Errors** keep the provider's message and are classified ([`ErrorKind`]) by the
//! provider's error type, else its status; they are rendered with the status and type
//! the application's SDK expects: Anthropic's 529 `overloaded_error` is an OpenAI 503
//! `server_error`, an OpenAI 503 is an Anthropic 529, and 429s stay 429s.

use serde_json::{Value, json};
use trimtab_api::balancer_policy::{Provider, ProviderKind};

use super::{anthropic as an, openai as oa};

/// A request that cannot be expressed in the provider's dialect, or is malformed in a way
/// the decoder cannot see. Answered with 400 `invalid_request_error` in the app's dialect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The request uses something the other dialect has no equivalent for.
    #[error("{field}: {what} cannot be sent to an {target} provider")]
    Unsupported {
        /// The JSON path of the field.
        field: String,
        /// What it is.
        what: String,
        /// The provider's dialect, `OpenAI` or `Anthropic`.
        target: &'static str,
    },
    /// A field's value is not what the API defines.
    #[error("{field}: {reason}")]
    Invalid {
        /// The JSON path of the field.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// The model name sent to `provider` for a request that asked for `requested`:
/// `modelAliases[requested]`, else the provider's `model`.
pub fn model_for<'p>(provider: &'p Provider, requested: &str) -> &'p str {
    provider
        .model_aliases
        .get(requested)
        .map_or(provider.model.as_str(), String::as_str)
}

fn unsupported(field: String, what: impl Into<String>, target: ProviderKind) -> TranslateError {
    TranslateError::Unsupported {
        field,
        what: what.into(),
        target: match target {
            ProviderKind::Openai => "OpenAI",
            ProviderKind::Anthropic => "Anthropic",
        },
    }
}

/// Replaces characters Anthropic refuses in tool ids (`^[a-zA-Z0-9_-]+$`) by `_`.
fn anthropic_tool_id(id: &str) -> String {
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() { "_".into() } else { clean }
}

/// Splits `data:<media type>;base64,<data>` into media type and data.
fn parse_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let media_type = meta.strip_suffix(";base64")?;
    Some((media_type, data))
}

fn image_to_anthropic(url: &oa::ImageUrl) -> an::ContentBlock {
    let source = match parse_data_url(&url.url) {
        Some((media_type, data)) => an::ImageSource::Base64 {
            media_type: media_type.into(),
            data: data.into(),
        },
        None => an::ImageSource::Url {
            url: url.url.clone(),
        },
    };
    an::ContentBlock::Image(an::ImageBlock {
        source,
        cache_control: None,
    })
}

fn user_content_to_anthropic(
    content: &oa::Content,
    field: &str,
) -> Result<Vec<an::ContentBlock>, TranslateError> {
    match content {
        oa::Content::Text(text) if text.is_empty() => Ok(Vec::new()),
        oa::Content::Text(text) => Ok(vec![an::ContentBlock::Text(an::TextBlock::new(
            text.clone(),
        ))]),
        oa::Content::Parts(parts) => parts
            .iter()
            .enumerate()
            .filter(|(_, part)| !matches!(part, oa::ContentPart::Text { text } if text.is_empty()))
            .map(|(j, part)| match part {
                oa::ContentPart::Text { text } => {
                    Ok(an::ContentBlock::Text(an::TextBlock::new(text.clone())))
                }
                oa::ContentPart::ImageUrl { image_url } => Ok(image_to_anthropic(image_url)),
                oa::ContentPart::Refusal { refusal } => {
                    Ok(an::ContentBlock::Text(an::TextBlock::new(refusal.clone())))
                }
                oa::ContentPart::Other(v) => Err(unsupported(
                    format!("{field}.content[{j}]"),
                    format!(
                        "a content part of type {}",
                        v.get("type").map_or_else(|| "?".into(), Value::to_string)
                    ),
                    ProviderKind::Anthropic,
                )),
            })
            .collect(),
    }
}

fn push_turn(out: &mut Vec<an::Message>, role: an::Role, mut blocks: Vec<an::ContentBlock>) {
    if blocks.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(last) if last.role == role => {
            let mut merged =
                std::mem::replace(&mut last.content, an::MessageContent::Blocks(Vec::new()))
                    .into_blocks();
            merged.append(&mut blocks);
            last.content = an::MessageContent::Blocks(merged);
        }
        _ => out.push(an::Message {
            role,
            content: an::MessageContent::Blocks(blocks),
        }),
    }
}

/// An OpenAI Chat Completions request as an Anthropic Messages request for `model`.
/// `default_max_tokens` is used when the request sets no output limit.
pub fn openai_to_anthropic_request(
    req: &oa::ChatRequest,
    model: &str,
    default_max_tokens: u32,
) -> Result<an::MessagesRequest, TranslateError> {
    if let Some(n) = req.n.filter(|&n| n > 1) {
        return Err(unsupported(
            "n".into(),
            format!("n = {n} (several choices)"),
            ProviderKind::Anthropic,
        ));
    }
    let mut system = Vec::new();
    let mut messages: Vec<an::Message> = Vec::new();
    for (i, message) in req.messages.iter().enumerate() {
        let field = format!("messages[{i}]");
        match message {
            oa::Message::System { content, .. } | oa::Message::Developer { content, .. } => {
                let text = content.text();
                if !text.is_empty() {
                    system.push(an::TextBlock::new(text));
                }
            }
            oa::Message::User { content, .. } => {
                let blocks = user_content_to_anthropic(content, &field)?;
                push_turn(&mut messages, an::Role::User, blocks);
            }
            oa::Message::Assistant(a) => {
                let mut blocks = Vec::new();
                let text = a
                    .content
                    .as_ref()
                    .map(oa::Content::text)
                    .unwrap_or_default();
                let text = match &a.refusal {
                    Some(refusal) if text.is_empty() => refusal.clone(),
                    _ => text,
                };
                if !text.is_empty() {
                    blocks.push(an::ContentBlock::Text(an::TextBlock::new(text)));
                }
                for (j, call) in a.tool_calls.iter().flatten().enumerate() {
                    let input = if call.function.arguments.trim().is_empty() {
                        json!({})
                    } else {
                        match serde_json::from_str::<Value>(&call.function.arguments) {
                            Ok(v @ Value::Object(_)) => v,
                            Ok(_) | Err(_) => {
                                return Err(TranslateError::Invalid {
                                    field: format!("{field}.tool_calls[{j}].function.arguments"),
                                    reason: "expected a JSON object serialized as a string".into(),
                                });
                            }
                        }
                    };
                    blocks.push(an::ContentBlock::ToolUse(an::ToolUseBlock {
                        id: anthropic_tool_id(&call.id),
                        name: call.function.name.clone(),
                        input,
                        cache_control: None,
                    }));
                }
                push_turn(&mut messages, an::Role::Assistant, blocks);
            }
            oa::Message::Tool {
                content,
                tool_call_id,
            } => {
                let result = an::ContentBlock::ToolResult(an::ToolResultBlock {
                    tool_use_id: anthropic_tool_id(tool_call_id),
                    content: Some(an::MessageContent::Text(content.text())),
                    is_error: None,
                    cache_control: None,
                });
                push_turn(&mut messages, an::Role::User, vec![result]);
            }
        }
    }
    // Tool results first in each user turn, as Anthropic requires; stable otherwise.
    for message in messages.iter_mut().filter(|m| m.role == an::Role::User) {
        if let an::MessageContent::Blocks(blocks) = &mut message.content {
            blocks.sort_by_key(|b| !matches!(b, an::ContentBlock::ToolResult(_)));
        }
    }

    let tools = req
        .tools
        .as_ref()
        .map(|tools| {
            tools
                .iter()
                .enumerate()
                .map(|(i, tool)| {
                    if tool.kind != "function" {
                        return Err(unsupported(
                            format!("tools[{i}].type"),
                            format!("a tool of type {:?}", tool.kind),
                            ProviderKind::Anthropic,
                        ));
                    }
                    Ok(an::Tool {
                        name: tool.function.name.clone(),
                        description: tool.function.description.clone(),
                        input_schema: Some(
                            tool.function
                                .parameters
                                .clone()
                                .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                        ),
                        kind: None,
                        cache_control: None,
                        extra: Default::default(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;

    let single = req
        .parallel_tool_calls
        .map(|parallel| !parallel)
        .filter(|&s| s);
    let tool_choice = match &req.tool_choice {
        None if single.is_some() && tools.is_some() => Some(an::ToolChoice::Auto {
            disable_parallel_tool_use: single,
        }),
        None => None,
        Some(oa::ToolChoice::None) => Some(an::ToolChoice::None),
        Some(oa::ToolChoice::Auto) => Some(an::ToolChoice::Auto {
            disable_parallel_tool_use: single,
        }),
        Some(oa::ToolChoice::Required) => Some(an::ToolChoice::Any {
            disable_parallel_tool_use: single,
        }),
        Some(oa::ToolChoice::Function(name)) => Some(an::ToolChoice::Tool {
            name: name.clone(),
            disable_parallel_tool_use: single,
        }),
        Some(oa::ToolChoice::Other(_)) => {
            return Err(unsupported(
                "tool_choice".into(),
                "this tool_choice form",
                ProviderKind::Anthropic,
            ));
        }
    };

    Ok(an::MessagesRequest {
        model: model.into(),
        max_tokens: req
            .max_completion_tokens
            .or(req.max_tokens)
            .unwrap_or(default_max_tokens),
        messages,
        system: (!system.is_empty()).then_some(an::SystemPrompt::Blocks(system)),
        stop_sequences: req.stop.as_ref().map(oa::Stop::to_vec),
        stream: req.stream,
        temperature: req.temperature.map(|t| t.clamp(0.0, 1.0)),
        top_p: req.top_p,
        top_k: None,
        tools,
        tool_choice,
        metadata: req.user.clone().map(|user_id| an::Metadata {
            user_id: Some(user_id),
        }),
        extra: Default::default(),
    })
}

fn image_to_openai(
    source: &an::ImageSource,
    field: String,
) -> Result<oa::ContentPart, TranslateError> {
    let url = match source {
        an::ImageSource::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        an::ImageSource::Url { url } => url.clone(),
        an::ImageSource::Other(_) => {
            return Err(unsupported(
                format!("{field}.source"),
                "an image source of this type",
                ProviderKind::Openai,
            ));
        }
    };
    Ok(oa::ContentPart::ImageUrl {
        image_url: oa::ImageUrl { url, detail: None },
    })
}

fn block_type(v: &Value) -> String {
    v.get("type").map_or_else(|| "?".into(), Value::to_string)
}

fn tool_result_text(result: &an::ToolResultBlock, field: &str) -> Result<String, TranslateError> {
    let text = match &result.content {
        None => String::new(),
        Some(an::MessageContent::Text(t)) => t.clone(),
        Some(an::MessageContent::Blocks(blocks)) => {
            let mut texts = Vec::new();
            for (k, block) in blocks.iter().enumerate() {
                match block {
                    an::ContentBlock::Text(t) => texts.push(t.text.as_str()),
                    _ => {
                        return Err(unsupported(
                            format!("{field}.content[{k}]"),
                            "a tool result that is not text",
                            ProviderKind::Openai,
                        ));
                    }
                }
            }
            texts.join("\n")
        }
    };
    Ok(if result.is_error == Some(true) {
        format!("(error) {text}")
    } else {
        text
    })
}

/// An Anthropic Messages request as an OpenAI Chat Completions request for `model`.
pub fn anthropic_to_openai_request(
    req: &an::MessagesRequest,
    model: &str,
) -> Result<oa::ChatRequest, TranslateError> {
    let mut messages = Vec::new();
    if let Some(system) = &req.system {
        messages.push(oa::Message::System {
            content: oa::Content::Text(system.text()),
            name: None,
        });
    }
    for (i, message) in req.messages.iter().enumerate() {
        let field = format!("messages[{i}].content");
        let blocks = match &message.content {
            an::MessageContent::Text(text) => {
                let content = oa::Content::Text(text.clone());
                messages.push(match message.role {
                    an::Role::User => oa::Message::User {
                        content,
                        name: None,
                    },
                    an::Role::Assistant => oa::Message::Assistant(oa::AssistantMessage {
                        content: Some(content),
                        ..Default::default()
                    }),
                });
                continue;
            }
            an::MessageContent::Blocks(blocks) => blocks,
        };
        match message.role {
            an::Role::User => {
                let mut parts = Vec::new();
                for (j, block) in blocks.iter().enumerate() {
                    let at = format!("{field}[{j}]");
                    match block {
                        an::ContentBlock::ToolResult(result) => messages.push(oa::Message::Tool {
                            content: oa::Content::Text(tool_result_text(result, &at)?),
                            tool_call_id: result.tool_use_id.clone(),
                        }),
                        an::ContentBlock::Text(t) => parts.push(oa::ContentPart::Text {
                            text: t.text.clone(),
                        }),
                        an::ContentBlock::Image(image) => {
                            parts.push(image_to_openai(&image.source, at)?)
                        }
                        an::ContentBlock::Thinking(_) | an::ContentBlock::RedactedThinking(_) => {}
                        an::ContentBlock::ToolUse(_) => {
                            return Err(TranslateError::Invalid {
                                field: at,
                                reason: "tool_use blocks belong to assistant turns".into(),
                            });
                        }
                        an::ContentBlock::Other(v) => {
                            return Err(unsupported(
                                at,
                                format!("a block of type {}", block_type(v)),
                                ProviderKind::Openai,
                            ));
                        }
                    }
                }
                if !parts.is_empty() {
                    let content = match parts.as_slice() {
                        [oa::ContentPart::Text { text }] => oa::Content::Text(text.clone()),
                        _ => oa::Content::Parts(parts),
                    };
                    messages.push(oa::Message::User {
                        content,
                        name: None,
                    });
                }
            }
            an::Role::Assistant => {
                let mut text = String::new();
                let mut calls = Vec::new();
                for (j, block) in blocks.iter().enumerate() {
                    match block {
                        an::ContentBlock::Text(t) => text.push_str(&t.text),
                        an::ContentBlock::ToolUse(t) => calls.push(oa::ToolCall {
                            id: t.id.clone(),
                            kind: "function".into(),
                            function: oa::FunctionCall {
                                name: t.name.clone(),
                                arguments: t.input.to_string(),
                            },
                        }),
                        an::ContentBlock::Thinking(_) | an::ContentBlock::RedactedThinking(_) => {}
                        an::ContentBlock::Image(_) | an::ContentBlock::ToolResult(_) => {
                            return Err(unsupported(
                                format!("{field}[{j}]"),
                                "an image or tool result in an assistant turn",
                                ProviderKind::Openai,
                            ));
                        }
                        an::ContentBlock::Other(v) => {
                            return Err(unsupported(
                                format!("{field}[{j}]"),
                                format!("a block of type {}", block_type(v)),
                                ProviderKind::Openai,
                            ));
                        }
                    }
                }
                messages.push(oa::Message::Assistant(oa::AssistantMessage {
                    content: (!text.is_empty()).then_some(oa::Content::Text(text)),
                    refusal: None,
                    tool_calls: (!calls.is_empty()).then_some(calls),
                    name: None,
                }));
            }
        }
    }

    let tools = req
        .tools
        .as_ref()
        .map(|tools| {
            tools
                .iter()
                .enumerate()
                .map(|(i, tool)| match tool.kind.as_deref() {
                    None | Some("custom") => Ok(oa::Tool {
                        kind: "function".into(),
                        function: oa::FunctionDefinition {
                            name: tool.name.clone(),
                            description: tool.description.clone(),
                            parameters: tool.input_schema.clone(),
                            strict: None,
                        },
                    }),
                    Some(kind) => Err(unsupported(
                        format!("tools[{i}]"),
                        format!("the server tool {kind:?}"),
                        ProviderKind::Openai,
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;

    let (tool_choice, single) = match &req.tool_choice {
        None => (None, None),
        Some(an::ToolChoice::None) => (Some(oa::ToolChoice::None), None),
        Some(an::ToolChoice::Auto {
            disable_parallel_tool_use: d,
        }) => (Some(oa::ToolChoice::Auto), *d),
        Some(an::ToolChoice::Any {
            disable_parallel_tool_use: d,
        }) => (Some(oa::ToolChoice::Required), *d),
        Some(an::ToolChoice::Tool {
            name,
            disable_parallel_tool_use: d,
        }) => (Some(oa::ToolChoice::Function(name.clone())), *d),
    };

    let stream = req.stream;
    Ok(oa::ChatRequest {
        model: model.into(),
        messages,
        max_tokens: None,
        max_completion_tokens: Some(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        n: None,
        stop: req.stop_sequences.clone().map(oa::Stop::Many),
        stream,
        stream_options: (stream == Some(true)).then(|| oa::StreamOptions {
            include_usage: Some(true),
            extra: Default::default(),
        }),
        tools,
        tool_choice,
        parallel_tool_calls: single.filter(|&s| s).map(|_| false),
        user: req.metadata.as_ref().and_then(|m| m.user_id.clone()),
        extra: Default::default(),
    })
}

/// OpenAI's finish reason for an Anthropic stop reason.
pub fn finish_reason_for(stop: &an::StopReason) -> oa::FinishReason {
    match stop {
        an::StopReason::EndTurn | an::StopReason::StopSequence | an::StopReason::PauseTurn => {
            oa::FinishReason::Stop
        }
        an::StopReason::MaxTokens | an::StopReason::ModelContextWindowExceeded => {
            oa::FinishReason::Length
        }
        an::StopReason::ToolUse => oa::FinishReason::ToolCalls,
        an::StopReason::Refusal => oa::FinishReason::ContentFilter,
        an::StopReason::Other(_) => oa::FinishReason::Stop,
    }
}

/// Anthropic's stop reason for an OpenAI finish reason.
pub fn stop_reason_for(finish: &oa::FinishReason) -> an::StopReason {
    match finish {
        oa::FinishReason::Stop | oa::FinishReason::Other(_) => an::StopReason::EndTurn,
        oa::FinishReason::Length => an::StopReason::MaxTokens,
        oa::FinishReason::ToolCalls | oa::FinishReason::FunctionCall => an::StopReason::ToolUse,
        oa::FinishReason::ContentFilter => an::StopReason::Refusal,
    }
}

/// OpenAI usage for Anthropic usage (cache reads and writes counted as prompt tokens).
pub fn usage_to_openai(usage: &an::Usage) -> oa::Usage {
    let cache_read = usage.cache_read_input_tokens.unwrap_or(0);
    let prompt = usage.input_tokens + cache_read + usage.cache_creation_input_tokens.unwrap_or(0);
    oa::Usage {
        prompt_tokens: prompt,
        completion_tokens: usage.output_tokens,
        total_tokens: prompt + usage.output_tokens,
        prompt_tokens_details: Some(oa::PromptTokensDetails {
            cached_tokens: Some(cache_read),
            extra: Default::default(),
        }),
        completion_tokens_details: None,
    }
}

/// Anthropic usage for OpenAI usage (cached tokens reported as cache reads).
pub fn usage_to_anthropic(usage: &oa::Usage) -> an::Usage {
    let cached = usage
        .prompt_tokens_details
        .as_ref()
        .and_then(|d| d.cached_tokens)
        .unwrap_or(0)
        .min(usage.prompt_tokens);
    an::Usage {
        input_tokens: usage.prompt_tokens - cached,
        output_tokens: usage.completion_tokens,
        cache_creation_input_tokens: Some(0),
        cache_read_input_tokens: Some(cached),
        extra: Default::default(),
    }
}

/// An Anthropic response as an OpenAI `chat.completion` created at `created` (Unix
/// seconds; Anthropic does not say).
pub fn anthropic_to_openai_response(
    resp: &an::MessagesResponse,
    created: u64,
) -> oa::ChatCompletion {
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in &resp.content {
        match block {
            an::ContentBlock::Text(t) => text.push_str(&t.text),
            an::ContentBlock::ToolUse(t) => calls.push(oa::ToolCall {
                id: t.id.clone(),
                kind: "function".into(),
                function: oa::FunctionCall {
                    name: t.name.clone(),
                    arguments: t.input.to_string(),
                },
            }),
            _ => {}
        }
    }
    oa::ChatCompletion {
        id: resp.id.clone(),
        object: "chat.completion".into(),
        created,
        model: resp.model.clone(),
        choices: vec![oa::Choice {
            index: 0,
            message: oa::ResponseMessage {
                role: "assistant".into(),
                content: (!text.is_empty() || calls.is_empty()).then_some(text),
                refusal: None,
                tool_calls: (!calls.is_empty()).then_some(calls),
            },
            finish_reason: Some(
                resp.stop_reason
                    .as_ref()
                    .map_or(oa::FinishReason::Stop, finish_reason_for),
            ),
            logprobs: None,
        }],
        usage: Some(usage_to_openai(&resp.usage)),
        system_fingerprint: None,
        extra: Default::default(),
    }
}

/// An OpenAI response (its first choice) as an Anthropic message.
pub fn openai_to_anthropic_response(
    resp: &oa::ChatCompletion,
) -> Result<an::MessagesResponse, TranslateError> {
    let choice = resp
        .choices
        .first()
        .ok_or_else(|| TranslateError::Invalid {
            field: "choices".into(),
            reason: "the provider returned no choice".into(),
        })?;
    let mut content = Vec::new();
    let message = &choice.message;
    if let Some(text) = message.content.as_ref().filter(|t| !t.is_empty()) {
        content.push(an::ContentBlock::Text(an::TextBlock::new(text.clone())));
    }
    if let Some(refusal) = message.refusal.as_ref().filter(|t| !t.is_empty()) {
        content.push(an::ContentBlock::Text(an::TextBlock::new(refusal.clone())));
    }
    for call in message.tool_calls.iter().flatten() {
        let input = serde_json::from_str(&call.function.arguments)
            .unwrap_or_else(|_| Value::String(call.function.arguments.clone()));
        content.push(an::ContentBlock::ToolUse(an::ToolUseBlock {
            id: call.id.clone(),
            name: call.function.name.clone(),
            input,
            cache_control: None,
        }));
    }
    Ok(an::MessagesResponse {
        id: resp.id.clone(),
        kind: "message".into(),
        role: an::Role::Assistant,
        content,
        model: resp.model.clone(),
        stop_reason: Some(
            choice
                .finish_reason
                .as_ref()
                .map_or(an::StopReason::EndTurn, stop_reason_for),
        ),
        stop_sequence: None,
        usage: resp
            .usage
            .as_ref()
            .map(usage_to_anthropic)
            .unwrap_or_default(),
        extra: Default::default(),
    })
}

/// What went wrong, independent of dialect; each dialect renders it with its own status
/// and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed or cannot be served (400).
    InvalidRequest,
    /// The API key is missing or wrong (401).
    Authentication,
    /// Out of credit or quota (Anthropic 402; OpenAI 429 `insufficient_quota`).
    Billing,
    /// The key may not use this resource (403).
    PermissionDenied,
    /// No such model or endpoint (404).
    NotFound,
    /// The body is too large (413).
    RequestTooLarge,
    /// A rate limit was hit (429).
    RateLimited,
    /// The provider failed (500).
    ServerError,
    /// The provider or the gateway gave up waiting (504).
    Timeout,
    /// The provider is overloaded (Anthropic 529; OpenAI 503).
    Overloaded,
}

impl ErrorKind {
    /// The kind an HTTP status stands for, when nothing better is known.
    pub fn from_status(status: u16) -> Self {
        match status {
            401 => Self::Authentication,
            402 => Self::Billing,
            403 => Self::PermissionDenied,
            404 => Self::NotFound,
            413 => Self::RequestTooLarge,
            429 => Self::RateLimited,
            408 | 504 => Self::Timeout,
            503 | 529 => Self::Overloaded,
            500..=599 => Self::ServerError,
            _ => Self::InvalidRequest,
        }
    }

    /// The kind of an Anthropic error `type`.
    pub fn from_anthropic_type(kind: &str) -> Option<Self> {
        Some(match kind {
            "invalid_request_error" => Self::InvalidRequest,
            "authentication_error" => Self::Authentication,
            "billing_error" => Self::Billing,
            "permission_error" => Self::PermissionDenied,
            "not_found_error" => Self::NotFound,
            "request_too_large" => Self::RequestTooLarge,
            "rate_limit_error" => Self::RateLimited,
            "api_error" => Self::ServerError,
            "timeout_error" => Self::Timeout,
            "overloaded_error" => Self::Overloaded,
            _ => return None,
        })
    }

    /// The HTTP status an application of dialect `app` expects for this kind.
    pub fn status(self, app: ProviderKind) -> u16 {
        match (self, app) {
            (Self::InvalidRequest, _) => 400,
            (Self::Authentication, _) => 401,
            (Self::Billing, ProviderKind::Anthropic) => 402,
            (Self::Billing, ProviderKind::Openai) => 429,
            (Self::PermissionDenied, _) => 403,
            (Self::NotFound, _) => 404,
            (Self::RequestTooLarge, _) => 413,
            (Self::RateLimited, _) => 429,
            (Self::ServerError, _) => 500,
            (Self::Timeout, _) => 504,
            (Self::Overloaded, ProviderKind::Anthropic) => 529,
            (Self::Overloaded, ProviderKind::Openai) => 503,
        }
    }

    /// The error `type` of dialect `app`, and OpenAI's `code` where it has one.
    fn type_and_code(self, app: ProviderKind) -> (&'static str, Option<&'static str>) {
        match app {
            ProviderKind::Anthropic => (
                match self {
                    Self::InvalidRequest => "invalid_request_error",
                    Self::Authentication => "authentication_error",
                    Self::Billing => "billing_error",
                    Self::PermissionDenied => "permission_error",
                    Self::NotFound => "not_found_error",
                    Self::RequestTooLarge => "request_too_large",
                    Self::RateLimited => "rate_limit_error",
                    Self::ServerError => "api_error",
                    Self::Timeout => "timeout_error",
                    Self::Overloaded => "overloaded_error",
                },
                None,
            ),
            ProviderKind::Openai => match self {
                Self::InvalidRequest
                | Self::PermissionDenied
                | Self::NotFound
                | Self::RequestTooLarge => ("invalid_request_error", None),
                Self::Authentication => ("invalid_request_error", Some("invalid_api_key")),
                Self::Billing => ("insufficient_quota", Some("insufficient_quota")),
                Self::RateLimited => ("requests", Some("rate_limit_exceeded")),
                Self::ServerError | Self::Timeout | Self::Overloaded => ("server_error", None),
            },
        }
    }
}

/// An error as the provider reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The provider's message (or a description of the status when the body said
    /// nothing readable).
    pub message: String,
}

/// Reads an error response of a provider of dialect `provider`: the type in the body
/// decides the kind when known, else the status.
pub fn classify_provider_error(provider: ProviderKind, status: u16, body: &[u8]) -> ProviderError {
    let parsed = match provider {
        ProviderKind::Anthropic => serde_json::from_slice::<an::ErrorBody>(body).ok().map(|b| {
            (
                ErrorKind::from_anthropic_type(&b.error.kind),
                b.error.message,
            )
        }),
        ProviderKind::Openai => serde_json::from_slice::<oa::ErrorBody>(body).ok().map(|b| {
            let code = b.error.code.as_ref().and_then(Value::as_str);
            let kind = match (b.error.kind.as_str(), code) {
                ("insufficient_quota", _) | (_, Some("insufficient_quota")) => {
                    Some(ErrorKind::Billing)
                }
                ("requests" | "tokens", _) | (_, Some("rate_limit_exceeded")) => {
                    Some(ErrorKind::RateLimited)
                }
                _ => None,
            };
            (kind, b.error.message)
        }),
    };
    match parsed {
        Some((kind, message)) => ProviderError {
            kind: kind.unwrap_or_else(|| ErrorKind::from_status(status)),
            message,
        },
        None => ProviderError {
            kind: ErrorKind::from_status(status),
            message: format!("the provider answered HTTP {status} without a readable error body"),
        },
    }
}

/// The error body of dialect `app` for `kind`, as JSON.
pub fn error_body(app: ProviderKind, kind: ErrorKind, message: &str) -> Value {
    let (kind_name, code) = kind.type_and_code(app);
    match app {
        ProviderKind::Anthropic => json!({
            "type": "error",
            "error": {"type": kind_name, "message": message},
        }),
        ProviderKind::Openai => json!({
            "error": {"message": message, "type": kind_name, "param": null, "code": code},
        }),
    }
}

/// The status and body to answer an application of dialect `app` with.
pub fn render_error(app: ProviderKind, kind: ErrorKind, message: &str) -> (u16, Vec<u8>) {
    (
        kind.status(app),
        error_body(app, kind, message).to_string().into_bytes(),
    )
}

/// A translation error as the 400 the application sees.
pub fn render_translate_error(app: ProviderKind, err: &TranslateError) -> (u16, Vec<u8>) {
    render_error(app, ErrorKind::InvalidRequest, &err.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::llm::{
        decode::decode,
        fixtures::{ANTHROPIC_REQUEST, ANTHROPIC_TOOL_RESPONSE, OPENAI_REQUEST},
    };

    fn provider(kind: ProviderKind) -> Provider {
        Provider {
            name: "p".into(),
            kind,
            base_url: "https://api.example".into(),
            model: "claude-sonnet-4-5".into(),
            model_aliases: BTreeMap::from([("gpt-4o".into(), "claude-opus-4-1".into())]),
            context_window: 200_000,
            weight: 1,
            api_key: None,
        }
    }

    #[test]
    fn model_aliases_map_per_provider_and_default_to_the_provider_model() {
        let p = provider(ProviderKind::Anthropic);
        assert_eq!(model_for(&p, "gpt-4o"), "claude-opus-4-1");
        assert_eq!(model_for(&p, "gpt-4o-mini"), "claude-sonnet-4-5");
    }

    #[test]
    fn openai_request_becomes_an_anthropic_request() {
        let req: oa::ChatRequest = decode(OPENAI_REQUEST.as_bytes()).unwrap();
        let out = openai_to_anthropic_request(&req, "claude-sonnet-4-5", 4096).unwrap();
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(
            json["system"],
            json!([{"type":"text","text":"You are a helpful assistant."},{"type":"text","text":"Answer briefly."}])
        );
        assert_eq!(json["max_tokens"], 512);
        assert_eq!(json["model"], "claude-sonnet-4-5");
        assert_eq!(json["stop_sequences"], json!(["\n\nHuman:"]));
        assert_eq!(json["temperature"], 0.7);
        let msgs = json["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 3, "{json:#}");
        assert_eq!(msgs[0]["role"], "user");
        assert_eq!(
            msgs[0]["content"][1],
            json!({"type":"image","source":{"type":"url","url":"https://upload.wikimedia.org/boardwalk.jpg"}})
        );
        assert_eq!(
            msgs[0]["content"][2],
            json!({"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo="}})
        );
        assert_eq!(
            msgs[1]["content"],
            json!([{"type":"tool_use","id":"call_abc123","name":"get_current_weather","input":{"location":"Boston, MA"}}])
        );
        assert_eq!(
            msgs[2]["content"],
            json!([{"type":"tool_result","tool_use_id":"call_abc123","content":"{\"temperature\": 22, \"unit\": \"celsius\"}"}])
        );
        assert_eq!(
            json["tools"][0]["input_schema"]["required"],
            json!(["location"])
        );
        assert_eq!(
            json["tool_choice"],
            json!({"type":"tool","name":"get_current_weather","disable_parallel_tool_use":true})
        );
        assert!(
            json.get("seed").is_none(),
            "OpenAI-only parameters are dropped"
        );
    }

    #[test]
    fn openai_lossy_corners_follow_the_documented_rules() {
        let req: oa::ChatRequest = decode(
            br#"{"model":"gpt-4o","temperature":1.6,"n":1,"messages":[
              {"role":"user","content":"Weather in Paris and Rome?"},
              {"role":"assistant","content":"","tool_calls":[
                {"id":"call.1/x","type":"function","function":{"name":"w","arguments":"{\"c\":\"Paris\"}"}},
                {"id":"call_2","type":"function","function":{"name":"w","arguments":""}}]},
              {"role":"tool","tool_call_id":"call.1/x","content":"12C"},
              {"role":"tool","tool_call_id":"call_2","content":"15C"},
              {"role":"system","content":"Be terse."},
              {"role":"system","content":""},
              {"role":"user","content":[{"type":"text","text":""}]},
              {"role":"user","content":"Thanks"}]}"#,
        )
        .unwrap();
        let out =
            serde_json::to_value(openai_to_anthropic_request(&req, "c", 1000).unwrap()).unwrap();
        assert_eq!(out["temperature"], 1.0);
        assert_eq!(out["max_tokens"], 1000);
        assert_eq!(
            out["system"],
            json!([{"type": "text", "text": "Be terse."}])
        );
        let msgs = out["messages"].as_array().unwrap();
        assert_eq!(
            msgs.len(),
            3,
            "tool results and the following user text share one turn"
        );
        assert_eq!(msgs[1]["content"][0]["id"], "call_1_x");
        assert_eq!(msgs[1]["content"][1]["input"], json!({}));
        assert_eq!(msgs[2]["content"][0]["tool_use_id"], "call_1_x");
        assert_eq!(msgs[2]["content"][1]["tool_use_id"], "call_2");
        assert_eq!(
            msgs[2]["content"][2],
            json!({"type":"text","text":"Thanks"})
        );

        let mut several = req.clone();
        several.n = Some(3);
        let err = openai_to_anthropic_request(&several, "c", 1000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "n: n = 3 (several choices) cannot be sent to an Anthropic provider"
        );

        let bad: oa::ChatRequest = decode(
            br#"{"model":"m","messages":[{"role":"assistant","tool_calls":[
              {"id":"c","type":"function","function":{"name":"w","arguments":"{not json"}}]}]}"#,
        )
        .unwrap();
        let err = openai_to_anthropic_request(&bad, "c", 10).unwrap_err();
        assert!(
            matches!(&err, TranslateError::Invalid { field, .. } if field == "messages[0].tool_calls[0].function.arguments")
        );
    }

    #[test]
    fn anthropic_request_becomes_an_openai_request() {
        let req: an::MessagesRequest = decode(ANTHROPIC_REQUEST.as_bytes()).unwrap();
        let out =
            serde_json::to_value(anthropic_to_openai_request(&req, "gpt-4o").unwrap()).unwrap();
        let msgs = out["messages"].as_array().unwrap();
        assert_eq!(
            msgs[0],
            json!({"role":"system","content":"You are a weather assistant."})
        );
        assert_eq!(msgs[1]["role"], "user");
        assert_eq!(
            msgs[1]["content"][1],
            json!({"type":"image_url","image_url":{"url":"data:image/jpeg;base64,/9j/4AAQSkZJRg=="}})
        );
        assert_eq!(
            msgs[1]["content"][2]["image_url"]["url"],
            "https://upload.wikimedia.org/ant.jpg"
        );
        assert_eq!(
            msgs[2],
            json!({"role":"assistant","content":"I'll check the weather.","tool_calls":[
                {"id":"toolu_01A09q90qw90lq917835lq9","type":"function","function":{"name":"get_weather","arguments":"{\"location\":\"San Francisco, CA\"}"}}]})
        );
        assert_eq!(
            msgs[3],
            json!({"role":"tool","content":"15 degrees","tool_call_id":"toolu_01A09q90qw90lq917835lq9"})
        );
        assert_eq!(
            msgs[4],
            json!({"role":"user","content":"Thanks. And tomorrow?"})
        );
        assert_eq!(out["max_completion_tokens"], 1024);
        assert_eq!(out["stop"], json!(["\n\nHuman:"]));
        assert_eq!(out["tool_choice"], "auto");
        assert_eq!(out["parallel_tool_calls"], false);
        assert_eq!(out["user"], "user-1234");
        assert_eq!(
            out["tools"][0]["function"]["parameters"]["required"],
            json!(["location"])
        );
        assert!(out.get("top_k").is_none() && out.get("thinking").is_none());
    }

    #[test]
    fn anthropic_streams_ask_openai_for_usage_and_errors_in_tool_results_are_marked() {
        let req: an::MessagesRequest = decode(
            br#"{"model":"m","max_tokens":5,"stream":true,"messages":[
              {"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"s"},
                {"type":"tool_use","id":"toolu_1","name":"f","input":{}}]},
              {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","is_error":true,
                "content":[{"type":"text","text":"timeout"}]}]}]}"#,
        )
        .unwrap();
        let out =
            serde_json::to_value(anthropic_to_openai_request(&req, "gpt-4o").unwrap()).unwrap();
        assert_eq!(out["stream_options"], json!({"include_usage": true}));
        assert_eq!(out["messages"][0]["content"], Value::Null);
        assert_eq!(out["messages"][1]["content"], "(error) timeout");

        let doc: an::MessagesRequest = decode(
            br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[
              {"type":"document","source":{"type":"url","url":"https://x/y.pdf"}}]}]}"#,
        )
        .unwrap();
        let err = anthropic_to_openai_request(&doc, "gpt-4o").unwrap_err();
        assert!(
            matches!(&err, TranslateError::Unsupported { field, .. } if field == "messages[0].content[0]"),
            "{err}"
        );
    }

    #[test]
    fn responses_translate_both_ways_with_usage_and_stop_reasons() {
        let resp: an::MessagesResponse = decode(ANTHROPIC_TOOL_RESPONSE.as_bytes()).unwrap();
        let oa_resp = anthropic_to_openai_response(&resp, 1_700_000_000);
        let json = serde_json::to_value(&oa_resp).unwrap();
        assert_eq!(json["object"], "chat.completion");
        assert_eq!(json["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            json["choices"][0]["message"]["content"],
            "I'll check the current weather in San Francisco for you."
        );
        assert_eq!(
            json["choices"][0]["message"]["tool_calls"][0]["id"],
            "toolu_01A09q90qw90lq917835lq9"
        );
        assert_eq!(
            json["usage"],
            json!({"prompt_tokens":572,"completion_tokens":89,"total_tokens":661,"prompt_tokens_details":{"cached_tokens":100}})
        );
        let back = openai_to_anthropic_response(&oa_resp).unwrap();
        assert_eq!(back.stop_reason, Some(an::StopReason::ToolUse));
        assert_eq!(
            back.content,
            resp.content
                .iter()
                .map(|b| match b {
                    an::ContentBlock::Text(t) =>
                        an::ContentBlock::Text(an::TextBlock::new(t.text.clone())),
                    other => other.clone(),
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(
            (back.usage.input_tokens, back.usage.cache_read_input_tokens),
            (472, Some(100))
        );

        assert_eq!(
            finish_reason_for(&an::StopReason::MaxTokens),
            oa::FinishReason::Length
        );
        assert_eq!(
            stop_reason_for(&oa::FinishReason::ContentFilter),
            an::StopReason::Refusal
        );
        let empty = oa::ChatCompletion {
            choices: vec![],
            ..oa_resp
        };
        assert!(openai_to_anthropic_response(&empty).is_err());
    }

    #[test]
    fn provider_errors_are_rendered_in_the_app_dialect_with_the_right_status() {
        let overloaded = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#;
        let e = classify_provider_error(ProviderKind::Anthropic, 529, overloaded);
        assert_eq!(
            e,
            ProviderError {
                kind: ErrorKind::Overloaded,
                message: "Overloaded".into()
            }
        );
        let (status, body) = render_error(ProviderKind::Openai, e.kind, &e.message);
        assert_eq!(status, 503);
        let body: oa::ErrorBody = decode(&body).unwrap();
        assert_eq!(body.error.kind, "server_error");
        let (status, body) = render_error(ProviderKind::Anthropic, e.kind, &e.message);
        assert_eq!(status, 529);
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["error"]["type"],
            "overloaded_error"
        );

        let limited = br#"{"error":{"message":"Rate limit reached","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
        let e = classify_provider_error(ProviderKind::Openai, 429, limited);
        assert_eq!(e.kind, ErrorKind::RateLimited);
        let (status, body) = render_error(ProviderKind::Anthropic, e.kind, &e.message);
        assert_eq!(status, 429);
        let body: an::ErrorBody = decode(&body).unwrap();
        assert_eq!(
            (body.error.kind.as_str(), body.error.message.as_str()),
            ("rate_limit_error", "Rate limit reached")
        );

        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        assert_eq!(
            classify_provider_error(ProviderKind::Openai, 429, quota).kind,
            ErrorKind::Billing
        );
        assert_eq!(ErrorKind::Billing.status(ProviderKind::Anthropic), 402);
        let garbage =
            classify_provider_error(ProviderKind::Openai, 502, b"<html>bad gateway</html>");
        assert_eq!(garbage.kind, ErrorKind::ServerError);
        assert!(garbage.message.contains("HTTP 502"));

        let err = TranslateError::Unsupported {
            field: "n".into(),
            what: "n = 2".into(),
            target: "Anthropic",
        };
        let (status, body) = render_translate_error(ProviderKind::Openai, &err);
        assert_eq!(status, 400);
        assert!(
            String::from_utf8(body)
                .unwrap()
                .contains("invalid_request_error")
        );
    }
}
