//! Context fitting of a 300k-token conversation into a 128k-token window, as the issue's
//! benchmark asks: cold (every message tokenized, compared with tokenizing alone) and
//! warm (every message but the new last one already counted), p50/p99 over repeated
//! runs. Run with `cargo bench -p trimtab-sidecar --bench llm_fitting`; prints Markdown.

use std::time::{Duration, Instant};

use trimtab_sidecar::llm::{
    fitting::{self, Encoding, TokenCounter},
    openai,
};

/// Words drawn from a fixed vocabulary by a xorshift generator: English-like text whose
/// token count is known only by counting.
fn text(state: &mut u64, words: usize) -> String {
    const VOCABULARY: &[&str] = &[
        "the",
        "provider",
        "latency",
        "window",
        "token",
        "request",
        "stream",
        "answer",
        "weather",
        "Boston",
        "conversation",
        "model",
        "and",
        "of",
        "to",
        "is",
        "a",
        "in",
        "context",
        "fitting",
        "evicts",
        "messages",
        "quickly",
        "deterministic",
        "42,",
        "function(x)",
        "{\"k\": 1}",
        "über",
        "naïve",
        "日本",
    ];
    let mut out = String::with_capacity(words * 8);
    for _ in 0..words {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        out.push_str(VOCABULARY[(*state % VOCABULARY.len() as u64) as usize]);
        out.push(' ');
    }
    out
}

fn conversation(state: &mut u64, messages: usize, words: usize) -> openai::ChatRequest {
    let mut list = vec![openai::Message::System {
        content: openai::Content::Text(text(state, 200)),
        name: None,
    }];
    for i in 0..messages {
        let content = openai::Content::Text(text(state, words));
        list.push(if i % 2 == 0 {
            openai::Message::User {
                content,
                name: None,
            }
        } else {
            openai::Message::Assistant(openai::AssistantMessage {
                content: Some(content),
                ..Default::default()
            })
        });
    }
    openai::ChatRequest {
        model: "gpt-4o".into(),
        messages: list,
        max_tokens: None,
        max_completion_tokens: None,
        temperature: None,
        top_p: None,
        n: None,
        stop: None,
        stream: None,
        stream_options: None,
        tools: None,
        tool_choice: None,
        parallel_tool_calls: None,
        user: None,
        extra: Default::default(),
    }
}

fn fit(req: &openai::ChatRequest, counter: &mut TokenCounter) -> (u64, usize) {
    let (messages, fixed) = fitting::openai_messages(req, counter);
    let plan = fitting::evict_by_priority(&messages, fixed, 128_000 - 4_096, 2)
        .unwrap_or_else(|e| panic!("fitting failed: {e}"));
    (plan.tokens_before, plan.evicted.len())
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p).div_ceil(100).max(1) - 1]
}

fn main() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let req = conversation(&mut state, 600, 420);
    let bpe = tiktoken_rs::o200k_base().unwrap_or_else(|e| panic!("o200k_base: {e}"));

    // Tokenizing alone: the texts, one after the other, with the same BPE.
    let texts: Vec<String> = req
        .messages
        .iter()
        .map(|m| match m {
            openai::Message::System { content, .. }
            | openai::Message::Developer { content, .. }
            | openai::Message::User { content, .. }
            | openai::Message::Tool { content, .. } => content.text(),
            openai::Message::Assistant(a) => a
                .content
                .as_ref()
                .map(openai::Content::text)
                .unwrap_or_default(),
        })
        .collect();
    let mut alone = Vec::new();
    let mut tokens = 0;
    for _ in 0..3 {
        let started = Instant::now();
        tokens = texts
            .iter()
            .map(|t| bpe.encode_ordinary(t).len())
            .sum::<usize>();
        alone.push(started.elapsed());
    }
    alone.sort();
    let tokenize_only = alone[1];

    let mut cold = Vec::new();
    let mut total = 0;
    for _ in 0..3 {
        let mut counter = TokenCounter::new(Encoding::O200kBase).unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        let (before, _) = fit(&req, &mut counter);
        cold.push(started.elapsed());
        total = before;
    }
    cold.sort();

    let mut counter = TokenCounter::new(Encoding::O200kBase).unwrap_or_else(|e| panic!("{e}"));
    fit(&req, &mut counter);
    let mut warm = Vec::new();
    let mut evicted = 0;
    for _ in 0..200 {
        let mut next = req.clone();
        next.messages.push(openai::Message::User {
            content: openai::Content::Text(text(&mut state, 60)),
            name: None,
        });
        let started = Instant::now();
        let (_, e) = fit(&next, &mut counter);
        warm.push(started.elapsed());
        evicted = e;
    }
    warm.sort();

    println!(
        "| conversation | tokens (o200k) | tokenizing alone (median of 3) | cold fit (median of 3) | cold ÷ tokenizing | warm fit p50 | warm fit p99 | messages evicted |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} messages | {tokens} (planner: {total}) | {:.1} ms | {:.1} ms | {:.2} | {:.2} ms | {:.2} ms | {evicted} |",
        req.messages.len(),
        tokenize_only.as_secs_f64() * 1e3,
        cold[1].as_secs_f64() * 1e3,
        cold[1].as_secs_f64() / tokenize_only.as_secs_f64(),
        percentile(&warm, 50).as_secs_f64() * 1e3,
        percentile(&warm, 99).as_secs_f64() * 1e3,
    );
}
