//! Fitting a conversation into the chosen model's context window before it is sent.
//!
//! Three steps, each its own function:
//! 1. **Count** ([`TokenCounter`]): OpenAI models with their own tokenizer (tiktoken's
//!    `o200k_base` for GPT-4o, GPT-4.1, GPT-5 and the o-series, `cl100k_base` for GPT-4
//!    and GPT-3.5); Anthropic models with an estimate, since Claude's tokenizer is not
//!    public: one token per [`ANTHROPIC_BYTES_PER_TOKEN`] bytes of UTF-8. Anthropic's
//!    guidance is about 3.5 characters per token for English; counting bytes rather than
//!    characters keeps the estimate on the safe side for non-Latin scripts (a CJK
//!    character is 3 bytes and about one token), and 3 rather than 3.5 adds a margin of
//!    some 15% for English. Counts are cached per message text, so a growing
//!    conversation is not tokenized again from the start.
//! 2. **Plan** ([`evict_by_priority`]): a pure function from per-message token counts to
//!    the set of messages kept.
//! 3. **Apply** ([`apply_openai`], [`apply_anthropic`]): the plan applied to a request,
//!    with a short marker where messages were removed.
//!
//! # Eviction rules
//!
//! Never evicted: system messages, pinned messages, and the last `keepLastTurns` turns (a
//! turn starts with each user message that is not only tool results). A tool call and
//! the results answering it are evicted together or not at all. The rest is evicted in
//! order of (explicit priority, turn, role), lowest first: lower explicit priority
//! first; then older turns first; within a turn, tool results and assistant output
//! before the user's own words. Ties keep list order, so the plan is deterministic.
//! Each run of evicted messages leaves one marker message, whose tokens count too.
//!
//! # Marking messages
//!
//! An application marks a message, in either dialect, with a `trimtab` member:
//! `{"role": "user", "content": "…", "trimtab": {"pinned": true}}` or
//! `{"trimtab": {"priority": 5}}` (higher is kept longer; default 0). [`message_hints`]
//! reads the marks from the request body; the typed messages do not carry the member,
//! so it never reaches a provider.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::OnceLock,
};

use trimtab_api::balancer_policy::ProviderKind;

use super::{
    anthropic as an,
    decode::{DecodeError, decode},
    openai as oa,
};

/// Bytes of UTF-8 per token in the Anthropic estimate (see the module doc).
pub const ANTHROPIC_BYTES_PER_TOKEN: u64 = 3;

/// Tokens added per message by the chat format (OpenAI's cookbook: 3 per message).
pub const MESSAGE_OVERHEAD_TOKENS: u64 = 3;

/// Tokens counted for one image: OpenAI's high-detail 1024×1024 (765), Anthropic's
/// ~1.15-megapixel maximum (about 1600) — the upper ends, since the size is not read.
pub const OPENAI_IMAGE_TOKENS: u64 = 765;
/// See [`OPENAI_IMAGE_TOKENS`].
pub const ANTHROPIC_IMAGE_TOKENS: u64 = 1600;

/// Tokens reserved for one eviction marker.
pub const MARKER_TOKENS: u64 = 40;

/// Cached message counts kept before the cache is cleared (about 4 MB).
pub const TOKEN_CACHE_ENTRIES: usize = 100_000;

/// The tokenizer of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// tiktoken `o200k_base`.
    O200kBase,
    /// tiktoken `cl100k_base`.
    Cl100kBase,
    /// The byte-based estimate for Anthropic models.
    AnthropicEstimate,
}

impl Encoding {
    /// The encoding for `model` served by a provider of `kind`. Unknown OpenAI model
    /// names get `o200k_base`, the encoding of every current OpenAI chat model.
    pub fn for_model(kind: ProviderKind, model: &str) -> Self {
        match kind {
            ProviderKind::Anthropic => Self::AnthropicEstimate,
            ProviderKind::Openai => match tiktoken_rs::tokenizer::get_tokenizer(model) {
                Some(tiktoken_rs::tokenizer::Tokenizer::Cl100kBase) => Self::Cl100kBase,
                _ => Self::O200kBase,
            },
        }
    }
}

/// A tokenizer that could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tokenizer {encoding:?} could not be loaded: {message}")]
pub struct TokenizerError {
    /// Which one.
    pub encoding: Encoding,
    /// Why.
    pub message: String,
}

fn bpe(encoding: Encoding) -> Result<&'static tiktoken_rs::CoreBPE, TokenizerError> {
    static O200K: OnceLock<Result<tiktoken_rs::CoreBPE, String>> = OnceLock::new();
    static CL100K: OnceLock<Result<tiktoken_rs::CoreBPE, String>> = OnceLock::new();
    let cell = match encoding {
        Encoding::O200kBase => {
            O200K.get_or_init(|| tiktoken_rs::o200k_base().map_err(|e| e.to_string()))
        }
        Encoding::Cl100kBase => {
            CL100K.get_or_init(|| tiktoken_rs::cl100k_base().map_err(|e| e.to_string()))
        }
        Encoding::AnthropicEstimate => {
            return Err(TokenizerError {
                encoding,
                message: "the Anthropic estimate has no BPE".into(),
            });
        }
    };
    cell.as_ref().map_err(|message| TokenizerError {
        encoding,
        message: message.clone(),
    })
}

/// Counts tokens of message texts with one encoding, caching by text.
#[derive(Debug)]
pub struct TokenCounter {
    encoding: Encoding,
    cache: HashMap<u64, u64>,
}

impl TokenCounter {
    /// A counter for `encoding`; the tokenizer is loaded now, so a failure shows here.
    pub fn new(encoding: Encoding) -> Result<Self, TokenizerError> {
        if encoding != Encoding::AnthropicEstimate {
            bpe(encoding)?;
        }
        Ok(Self {
            encoding,
            cache: HashMap::new(),
        })
    }

    /// The encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Tokens of `text`, from the cache when this text was counted before.
    pub fn count(&mut self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        let mut hasher = DefaultHasher::new();
        text.hash(&mut hasher);
        let key = hasher.finish();
        if let Some(&n) = self.cache.get(&key) {
            return n;
        }
        let n = match self.encoding {
            Encoding::AnthropicEstimate => (text.len() as u64).div_ceil(ANTHROPIC_BYTES_PER_TOKEN),
            // The BPE was loaded in `new`; `unwrap_or(0)`-like fallbacks would undercount,
            // so fall back to the conservative estimate instead.
            encoding => match bpe(encoding) {
                Ok(bpe) => bpe.encode_ordinary(text).len() as u64,
                Err(_) => (text.len() as u64).div_ceil(ANTHROPIC_BYTES_PER_TOKEN),
            },
        };
        if self.cache.len() >= TOKEN_CACHE_ENTRIES {
            self.cache.clear();
        }
        self.cache.insert(key, n);
        n
    }

    fn image_tokens(&self) -> u64 {
        match self.encoding {
            Encoding::AnthropicEstimate => ANTHROPIC_IMAGE_TOKENS,
            _ => OPENAI_IMAGE_TOKENS,
        }
    }
}

/// Who speaks a message, for eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FitRole {
    /// Tool results: evicted first within a turn.
    Tool = 0,
    /// Model output.
    Assistant = 1,
    /// The user's words.
    User = 2,
    /// Instructions: never evicted.
    System = 3,
}

/// One message as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FitMessage {
    /// Who speaks.
    pub role: FitRole,
    /// Its tokens, overhead included.
    pub tokens: u64,
    /// Whether this message starts a turn (a user message that is not only tool results).
    pub starts_turn: bool,
    /// Never evicted.
    pub pinned: bool,
    /// Explicit priority: lower is evicted first; 0 when unset.
    pub priority: i32,
    /// Ids of the tool calls this message makes.
    pub tool_calls: Vec<String>,
    /// Ids of the tool calls this message answers.
    pub tool_results: Vec<String>,
}

impl FitMessage {
    /// A plain message.
    pub fn new(role: FitRole, tokens: u64) -> Self {
        Self {
            role,
            tokens,
            starts_turn: role == FitRole::User,
            pinned: false,
            priority: 0,
            tool_calls: Vec::new(),
            tool_results: Vec::new(),
        }
    }
}

/// How the application marked one message (`"trimtab": {…}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageHints {
    /// Never evict this message.
    #[serde(default)]
    pub pinned: bool,
    /// Eviction priority: lower goes first; 0 when unset.
    #[serde(default)]
    pub priority: i32,
}

/// The marks of every message of a request body, in order (default for unmarked ones).
pub fn message_hints(body: &[u8]) -> Result<Vec<MessageHints>, DecodeError> {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        messages: Vec<Marked>,
    }
    #[derive(serde::Deserialize)]
    struct Marked {
        #[serde(default)]
        trimtab: Option<MessageHints>,
    }
    let body: Body = decode(body)?;
    Ok(body
        .messages
        .into_iter()
        .map(|m| m.trimtab.unwrap_or_default())
        .collect())
}

/// Sets `pinned` and `priority` of the planner's messages from the application's marks.
pub fn apply_hints(messages: &mut [FitMessage], hints: &[MessageHints]) {
    for (m, h) in messages.iter_mut().zip(hints) {
        m.pinned |= h.pinned;
        m.priority = h.priority;
    }
}

/// What fitting decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictionPlan {
    /// Indexes of the evicted messages, ascending.
    pub evicted: Vec<usize>,
    /// Tokens of the request before fitting (fixed part included).
    pub tokens_before: u64,
    /// Tokens after fitting, markers included.
    pub tokens_after: u64,
}

impl EvictionPlan {
    /// A one-line report for a response header and logs:
    /// `evicted=12; tokens_before=303000; tokens_after=122160`.
    pub fn summary(&self) -> String {
        format!(
            "evicted={}; tokens_before={}; tokens_after={}",
            self.evicted.len(),
            self.tokens_before,
            self.tokens_after
        )
    }

    /// Whether nothing needs to change.
    pub fn is_empty(&self) -> bool {
        self.evicted.is_empty()
    }

    /// The runs of consecutive evicted indexes, as `(first, count)`.
    pub fn runs(&self) -> Vec<(usize, usize)> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &i in &self.evicted {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == i => *count += 1,
                _ => runs.push((i, 1)),
            }
        }
        runs
    }
}

/// A conversation that cannot be made to fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    /// `contextFitting.strategy: reject` and the request is too long.
    #[error(
        "the request has {needed} tokens but the model accepts {available} (context window minus reserved output tokens)"
    )]
    TooLong {
        /// Tokens of the request.
        needed: u64,
        /// Tokens available.
        available: u64,
    },
    /// Even after evicting everything allowed, it does not fit.
    #[error(
        "the request needs {needed} tokens even after evicting every message allowed (system, pinned and the last {keep_last_turns} turns are kept), but the model accepts {available}"
    )]
    ProtectedTooLong {
        /// Tokens of what must be kept.
        needed: u64,
        /// Tokens available.
        available: u64,
        /// `contextFitting.keepLastTurns`.
        keep_last_turns: u32,
    },
}

/// Plans which messages to evict so that `fixed_tokens` (system prompt outside the
/// messages, tool definitions, reply priming) plus the kept messages and the markers fit
/// in `available` tokens. See the module doc for the rules.
pub fn evict_by_priority(
    messages: &[FitMessage],
    fixed_tokens: u64,
    available: u64,
    keep_last_turns: u32,
) -> Result<EvictionPlan, FitError> {
    let total: u64 = fixed_tokens + messages.iter().map(|m| m.tokens).sum::<u64>();
    if total <= available {
        return Ok(EvictionPlan {
            evicted: Vec::new(),
            tokens_before: total,
            tokens_after: total,
        });
    }

    // Turn number of each message (0 before the first user message).
    let mut turn = 0usize;
    let turns: Vec<usize> = messages
        .iter()
        .map(|m| {
            if m.starts_turn {
                turn += 1;
            }
            turn
        })
        .collect();
    let first_protected_turn = (turn + 1).saturating_sub(keep_last_turns as usize).max(1);
    let protected_turn = |i: usize| keep_last_turns > 0 && turns[i] >= first_protected_turn;

    // Groups: a tool call and its results go together (union-find over indexes).
    let mut parent: Vec<usize> = (0..messages.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut caller: HashMap<&str, usize> = HashMap::new();
    for (i, m) in messages.iter().enumerate() {
        for id in &m.tool_calls {
            caller.insert(id.as_str(), i);
        }
        for id in &m.tool_results {
            if let Some(&c) = caller.get(id.as_str()) {
                let (a, b) = (root(&mut parent, c), root(&mut parent, i));
                parent[a.max(b)] = a.min(b);
            }
        }
    }
    struct Group {
        members: Vec<usize>,
        tokens: u64,
        protected: bool,
        key: (i32, usize, FitRole, usize),
    }
    let mut groups: HashMap<usize, Group> = HashMap::new();
    for (i, m) in messages.iter().enumerate() {
        let r = root(&mut parent, i);
        let protected = m.role == FitRole::System || m.pinned || protected_turn(i);
        let g = groups.entry(r).or_insert(Group {
            members: Vec::new(),
            tokens: 0,
            protected: false,
            key: (i32::MIN, 0, FitRole::Tool, r),
        });
        g.members.push(i);
        g.tokens += m.tokens;
        g.protected |= protected;
        // A group is as important as its most important member.
        g.key.0 = g.key.0.max(m.priority);
        g.key.1 = g.key.1.max(turns[i]);
        g.key.2 = g.key.2.max(m.role);
    }
    let mut evictable: Vec<Group> = groups.into_values().filter(|g| !g.protected).collect();
    evictable.sort_by_key(|g| g.key);

    let mut evicted = vec![false; messages.len()];
    let mut kept_tokens = total;
    let markers = |evicted: &[bool]| {
        let mut runs = 0u64;
        let mut previous = false;
        for &e in evicted {
            if e && !previous {
                runs += 1;
            }
            previous = e;
        }
        runs * MARKER_TOKENS
    };
    for group in &evictable {
        if kept_tokens + markers(&evicted) <= available {
            break;
        }
        for &i in &group.members {
            evicted[i] = true;
        }
        kept_tokens -= group.tokens;
    }
    let tokens_after = kept_tokens + markers(&evicted);
    if tokens_after > available {
        return Err(FitError::ProtectedTooLong {
            needed: tokens_after,
            available,
            keep_last_turns,
        });
    }
    Ok(EvictionPlan {
        evicted: (0..messages.len()).filter(|&i| evicted[i]).collect(),
        tokens_before: total,
        tokens_after,
    })
}

/// The text of the marker left for `count` evicted messages of `tokens` tokens.
pub fn marker_text(count: usize, tokens: u64) -> String {
    format!(
        "[{count} earlier message{} ({tokens} tokens) removed to fit the model's context window]",
        if count == 1 { "" } else { "s" }
    )
}

fn content_tokens(counter: &mut TokenCounter, content: &oa::Content) -> u64 {
    match content {
        oa::Content::Text(t) => counter.count(t),
        oa::Content::Parts(parts) => parts
            .iter()
            .map(|p| match p {
                oa::ContentPart::Text { text } => counter.count(text),
                oa::ContentPart::Refusal { refusal } => counter.count(refusal),
                oa::ContentPart::ImageUrl { .. } => counter.image_tokens(),
                oa::ContentPart::Other(v) => counter.count(&v.to_string()),
            })
            .sum(),
    }
}

/// The planner's view of an OpenAI request: its messages and the fixed tokens (tool
/// definitions and reply priming).
pub fn openai_messages(
    req: &oa::ChatRequest,
    counter: &mut TokenCounter,
) -> (Vec<FitMessage>, u64) {
    let messages = req
        .messages
        .iter()
        .map(|m| {
            let (role, tokens, calls, results) = match m {
                oa::Message::System { content, .. } | oa::Message::Developer { content, .. } => (
                    FitRole::System,
                    content_tokens(counter, content),
                    Vec::new(),
                    Vec::new(),
                ),
                oa::Message::User { content, .. } => (
                    FitRole::User,
                    content_tokens(counter, content),
                    Vec::new(),
                    Vec::new(),
                ),
                oa::Message::Assistant(a) => {
                    let mut tokens = a.content.as_ref().map_or(0, |c| content_tokens(counter, c));
                    let mut calls = Vec::new();
                    for call in a.tool_calls.iter().flatten() {
                        tokens += counter.count(&call.function.name)
                            + counter.count(&call.function.arguments);
                        calls.push(call.id.clone());
                    }
                    (FitRole::Assistant, tokens, calls, Vec::new())
                }
                oa::Message::Tool {
                    content,
                    tool_call_id,
                } => (
                    FitRole::Tool,
                    content_tokens(counter, content),
                    Vec::new(),
                    vec![tool_call_id.clone()],
                ),
            };
            FitMessage {
                tool_calls: calls,
                tool_results: results,
                ..FitMessage::new(role, tokens + MESSAGE_OVERHEAD_TOKENS)
            }
        })
        .collect();
    let tools = req.tools.as_ref().map_or(0, |t| {
        counter.count(&serde_json::to_string(t).unwrap_or_default())
    });
    (messages, tools + MESSAGE_OVERHEAD_TOKENS)
}

fn block_tokens(counter: &mut TokenCounter, block: &an::ContentBlock) -> u64 {
    match block {
        an::ContentBlock::Text(t) => counter.count(&t.text),
        an::ContentBlock::Image(_) => counter.image_tokens(),
        an::ContentBlock::ToolUse(t) => {
            counter.count(&t.name) + counter.count(&t.input.to_string())
        }
        an::ContentBlock::ToolResult(r) => match &r.content {
            None => 0,
            Some(an::MessageContent::Text(t)) => counter.count(t),
            Some(an::MessageContent::Blocks(blocks)) => {
                blocks.iter().map(|b| block_tokens(counter, b)).sum()
            }
        },
        an::ContentBlock::Thinking(t) => counter.count(&t.thinking),
        an::ContentBlock::RedactedThinking(t) => counter.count(&t.data),
        an::ContentBlock::Other(v) => counter.count(&v.to_string()),
    }
}

/// The planner's view of an Anthropic request: its messages and the fixed tokens
/// (system prompt, tool definitions).
pub fn anthropic_messages(
    req: &an::MessagesRequest,
    counter: &mut TokenCounter,
) -> (Vec<FitMessage>, u64) {
    let messages = req
        .messages
        .iter()
        .map(|m| {
            let mut fit = FitMessage::new(
                match m.role {
                    an::Role::User => FitRole::User,
                    an::Role::Assistant => FitRole::Assistant,
                },
                MESSAGE_OVERHEAD_TOKENS,
            );
            match &m.content {
                an::MessageContent::Text(t) => fit.tokens += counter.count(t),
                an::MessageContent::Blocks(blocks) => {
                    let mut only_results = !blocks.is_empty();
                    for block in blocks {
                        fit.tokens += block_tokens(counter, block);
                        match block {
                            an::ContentBlock::ToolUse(t) => fit.tool_calls.push(t.id.clone()),
                            an::ContentBlock::ToolResult(r) => {
                                fit.tool_results.push(r.tool_use_id.clone())
                            }
                            _ => only_results = false,
                        }
                    }
                    if m.role == an::Role::User && only_results {
                        fit.role = FitRole::Tool;
                        fit.starts_turn = false;
                    }
                }
            }
            fit
        })
        .collect();
    let system = req.system.as_ref().map_or(0, |s| counter.count(&s.text()));
    let tools = req.tools.as_ref().map_or(0, |t| {
        counter.count(&serde_json::to_string(t).unwrap_or_default())
    });
    (messages, system + tools + MESSAGE_OVERHEAD_TOKENS)
}

/// Removes the evicted messages of an OpenAI request, leaving a user-role marker per run.
pub fn apply_openai(req: &mut oa::ChatRequest, plan: &EvictionPlan, fit: &[FitMessage]) {
    let messages = std::mem::take(&mut req.messages);
    req.messages = rebuild(messages, plan, fit, |text| oa::Message::User {
        content: oa::Content::Text(text),
        name: None,
    });
}

/// Removes the evicted messages of an Anthropic request, leaving a user-role marker per
/// run (Anthropic merges it with a neighbouring user turn).
pub fn apply_anthropic(req: &mut an::MessagesRequest, plan: &EvictionPlan, fit: &[FitMessage]) {
    let messages = std::mem::take(&mut req.messages);
    req.messages = rebuild(messages, plan, fit, |text| an::Message {
        role: an::Role::User,
        content: an::MessageContent::Text(text),
    });
}

fn rebuild<M>(
    messages: Vec<M>,
    plan: &EvictionPlan,
    fit: &[FitMessage],
    marker: impl Fn(String) -> M,
) -> Vec<M> {
    let runs = plan.runs();
    let mut out =
        Vec::with_capacity(messages.len().saturating_sub(plan.evicted.len()) + runs.len());
    let mut runs = runs.into_iter().peekable();
    let mut skip_until = 0;
    for (i, m) in messages.into_iter().enumerate() {
        if let Some(&(first, count)) = runs.peek()
            && first == i
        {
            let tokens = fit
                .get(first..first + count)
                .map_or(0, |f| f.iter().map(|m| m.tokens).sum());
            out.push(marker(marker_text(count, tokens)));
            skip_until = first + count;
            runs.next();
        }
        if i >= skip_until {
            out.push(m);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::llm::fixtures::OPENAI_REQUEST;

    fn msg(role: FitRole, tokens: u64) -> FitMessage {
        FitMessage::new(role, tokens)
    }

    /// A 300k-token conversation: a system prompt, then 30 turns of a user question
    /// (1k), an assistant tool call (1k) with its result (6k), and an answer (2k).
    fn long_conversation() -> Vec<FitMessage> {
        let mut m = vec![msg(FitRole::System, 2_000)];
        for t in 0..30 {
            m.push(msg(FitRole::User, 1_000));
            m.push(FitMessage {
                tool_calls: vec![format!("call_{t}")],
                ..msg(FitRole::Assistant, 1_000)
            });
            m.push(FitMessage {
                tool_results: vec![format!("call_{t}")],
                ..msg(FitRole::Tool, 6_000)
            });
            m.push(msg(FitRole::Assistant, 2_000));
        }
        m
    }

    #[test]
    fn a_300k_conversation_fits_a_128k_model_keeping_exactly_the_expected_messages() {
        let messages = long_conversation();
        let total: u64 = messages.iter().map(|m| m.tokens).sum();
        assert_eq!(total, 302_000);
        // 128k window, 4096 reserved for the answer, 1000 fixed (tools, priming).
        let available = 128_000 - 4_096;
        let mut messages = messages;
        messages[5].pinned = true; // turn 2's question
        messages[10].priority = 1; // turn 3's tool call: its result stays with it
        let plan = evict_by_priority(&messages, 1_000, available, 2).unwrap();

        // Kept: the system prompt, the pinned question, the prioritised tool call with
        // its result, the last 11 whole turns (10k each), and the question of turn 19,
        // whose tool output and answer were enough to make the rest fit.
        let kept: Vec<usize> = (0..messages.len())
            .filter(|i| !plan.evicted.contains(i))
            .collect();
        let mut expected = vec![0, 5, 10, 11, 73];
        expected.extend(77..121);
        assert_eq!(kept, expected, "{:?}", plan.runs());
        assert_eq!(plan.runs(), vec![(1, 4), (6, 4), (12, 61), (74, 3)]);
        assert_eq!(
            plan.tokens_after,
            1_000 + 2_000 + 1_000 + 7_000 + 1_000 + 11 * 10_000 + 4 * MARKER_TOKENS
        );
        assert!(plan.tokens_after <= available);
        assert_eq!(plan.tokens_before, 303_000);
    }

    #[test]
    fn application_marks_pin_and_prioritise_messages_and_are_never_forwarded() {
        let body = br#"{"model":"gpt-4o","messages":[
            {"role":"system","content":"s"},
            {"role":"user","content":"remember: my name is Ada","trimtab":{"pinned":true}},
            {"role":"assistant","content":"noted"},
            {"role":"user","content":"old detail","trimtab":{"priority":-1}},
            {"role":"user","content":"recent"}]}"#;
        let hints = message_hints(body).unwrap();
        assert_eq!(
            hints[1],
            MessageHints {
                pinned: true,
                priority: 0
            }
        );
        assert_eq!(hints[3].priority, -1);
        let req: oa::ChatRequest = decode(body).unwrap();
        assert!(!serde_json::to_string(&req).unwrap().contains("trimtab"));

        let mut fit: Vec<FitMessage> = [
            FitRole::System,
            FitRole::User,
            FitRole::Assistant,
            FitRole::User,
            FitRole::User,
        ]
        .into_iter()
        .map(|r| msg(r, 100))
        .collect();
        apply_hints(&mut fit, &hints);
        // Room for four messages and a marker: the message marked less important goes
        // first, although it is more recent than the assistant's answer.
        let plan = evict_by_priority(&fit, 0, 400 + MARKER_TOKENS, 1).unwrap();
        assert_eq!(plan.evicted, vec![3]);
        // Room for three: then the answer; the pinned message stays, though oldest.
        let plan = evict_by_priority(&fit, 0, 300 + MARKER_TOKENS, 1).unwrap();
        assert_eq!(plan.evicted, vec![2, 3]);
        assert_eq!(
            plan.summary(),
            "evicted=2; tokens_before=500; tokens_after=340"
        );

        let err = message_hints(br#"{"messages":[{"trimtab":{"pinnned":true}}]}"#).unwrap_err();
        assert_eq!(err.path, "messages[0].trimtab.pinnned");
        assert!(err.message.contains("unknown field `pinnned`"), "{err}");
    }

    #[test]
    fn within_a_turn_tool_output_goes_before_the_users_words_and_pairs_stay_together() {
        let messages = vec![
            msg(FitRole::System, 10),
            msg(FitRole::User, 10),
            FitMessage {
                tool_calls: vec!["a".into()],
                ..msg(FitRole::Assistant, 10)
            },
            FitMessage {
                tool_results: vec!["a".into()],
                ..msg(FitRole::Tool, 100)
            },
            msg(FitRole::User, 10),
        ];
        // 140 tokens; room for 100: the tool call and its result go together.
        let plan = evict_by_priority(&messages, 0, 100, 1).unwrap();
        assert_eq!(plan.evicted, vec![2, 3]);
        assert_eq!(plan.tokens_after, 30 + MARKER_TOKENS);
    }

    #[test]
    fn fitting_is_a_no_op_when_it_fits_and_an_error_when_the_protected_part_does_not() {
        let messages = long_conversation();
        let plan = evict_by_priority(&messages, 0, 400_000, 2).unwrap();
        assert!(plan.is_empty());
        assert_eq!(plan.tokens_before, 302_000);
        let err = evict_by_priority(&messages, 0, 15_000, 2).unwrap_err();
        assert_eq!(
            err,
            FitError::ProtectedTooLong {
                needed: 22_000 + MARKER_TOKENS,
                available: 15_000,
                keep_last_turns: 2
            }
        );
        assert!(err.to_string().contains("the last 2 turns are kept"));
    }

    #[test]
    fn openai_request_is_counted_with_o200k_and_trimmed_with_a_marker() {
        assert_eq!(
            Encoding::for_model(ProviderKind::Openai, "gpt-4o-2024-08-06"),
            Encoding::O200kBase
        );
        assert_eq!(
            Encoding::for_model(ProviderKind::Openai, "gpt-4-0613"),
            Encoding::Cl100kBase
        );
        assert_eq!(
            Encoding::for_model(ProviderKind::Anthropic, "claude-sonnet-4-5"),
            Encoding::AnthropicEstimate
        );

        let mut counter = TokenCounter::new(Encoding::O200kBase).unwrap();
        assert_eq!(counter.count("Hello, world!"), 4);
        let mut req: oa::ChatRequest = decode(OPENAI_REQUEST.as_bytes()).unwrap();
        // Make the first user turn long: about 6000 tokens.
        if let oa::Message::User {
            content: oa::Content::Parts(parts),
            ..
        } = &mut req.messages[2]
        {
            parts.push(oa::ContentPart::Text {
                text: "lorem ipsum ".repeat(3000),
            });
        }
        req.messages.push(oa::Message::User {
            content: oa::Content::Text("And tomorrow?".into()),
            name: None,
        });
        let (fit, fixed) = openai_messages(&req, &mut counter);
        assert_eq!(fit[3].tool_calls, vec!["call_abc123".to_string()]);
        assert_eq!(fit[4].tool_results, vec!["call_abc123".to_string()]);
        let plan = evict_by_priority(&fit, fixed, 1_000, 1).unwrap();
        assert_eq!(plan.evicted, vec![2, 3, 4]);
        apply_openai(&mut req, &plan, &fit);
        assert_eq!(req.messages.len(), 4);
        let oa::Message::User { content, .. } = &req.messages[2] else {
            panic!("marker expected")
        };
        assert!(
            content.text().starts_with("[3 earlier messages ("),
            "{}",
            content.text()
        );
        assert!(
            matches!(&req.messages[3], oa::Message::User { content, .. } if content.text() == "And tomorrow?")
        );
    }

    #[test]
    fn anthropic_estimate_is_conservative_and_the_cache_returns_the_same_count() {
        let mut counter = TokenCounter::new(Encoding::AnthropicEstimate).unwrap();
        let english = "The quick brown fox jumps over the lazy dog. ".repeat(100);
        // 4500 bytes: 1500 tokens, above the 1286 that 3.5 characters per token would give.
        assert_eq!(counter.count(&english), 1_500);
        assert_eq!(counter.count("日本語"), 3);
        assert_eq!(counter.count(&english), 1_500);
        assert_eq!(counter.cache.len(), 2);

        let req: an::MessagesRequest =
            decode(crate::llm::fixtures::ANTHROPIC_REQUEST.as_bytes()).unwrap();
        let (fit, fixed) = anthropic_messages(&req, &mut counter);
        assert!(fixed > 0);
        assert_eq!(
            fit[1].tool_calls,
            vec!["toolu_01A09q90qw90lq917835lq9".to_string()]
        );
        // The last message mixes a tool result and text: it answers the call and starts a turn.
        assert!(fit[2].starts_turn && fit[2].tool_results.len() == 1);
        assert!(fit[0].tokens >= 2 * ANTHROPIC_IMAGE_TOKENS);
    }
}
