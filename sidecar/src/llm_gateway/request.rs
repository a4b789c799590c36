//! The application's request, decoded in its dialect, and how many tokens it is under
//! each tokenizer the route's providers use: what routing and context fitting decide on.

use std::collections::HashMap;

use super::{LlmGateway, lock};
use crate::llm::{
    anthropic as an,
    fitting::{self, EvictionPlan, FitMessage, MessageHints, TokenCounter},
    openai as oa,
};

/// The application's request, decoded in its dialect.
#[derive(Debug, Clone)]
pub(super) enum AppRequest {
    Openai(oa::ChatRequest),
    Anthropic(an::MessagesRequest),
}

impl AppRequest {
    pub(super) fn model(&self) -> &str {
        match self {
            Self::Openai(r) => &r.model,
            Self::Anthropic(r) => &r.model,
        }
    }

    pub(super) fn stream(&self) -> bool {
        match self {
            Self::Openai(r) => r.stream.unwrap_or(false),
            Self::Anthropic(r) => r.stream.unwrap_or(false),
        }
    }

    pub(super) fn include_usage(&self) -> bool {
        match self {
            Self::Openai(r) => r
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            Self::Anthropic(_) => true,
        }
    }

    pub(super) fn max_output(&self) -> u64 {
        match self {
            Self::Openai(r) => u64::from(r.max_completion_tokens.or(r.max_tokens).unwrap_or(0)),
            Self::Anthropic(r) => u64::from(r.max_tokens),
        }
    }

    pub(super) fn fit_view(
        &self,
        counter: &mut TokenCounter,
        hints: &[MessageHints],
    ) -> (Vec<FitMessage>, u64) {
        let (mut messages, fixed) = match self {
            Self::Openai(r) => fitting::openai_messages(r, counter),
            Self::Anthropic(r) => fitting::anthropic_messages(r, counter),
        };
        fitting::apply_hints(&mut messages, hints);
        (messages, fixed)
    }

    pub(super) fn apply(&mut self, plan: &EvictionPlan, fit: &[FitMessage]) {
        match self {
            Self::Openai(r) => fitting::apply_openai(r, plan, fit),
            Self::Anthropic(r) => fitting::apply_anthropic(r, plan, fit),
        }
    }
}

/// The planner's view of the request under one tokenizer.
#[derive(Debug)]
pub(super) struct View {
    pub(super) messages: Vec<FitMessage>,
    pub(super) fixed: u64,
    pub(super) total: u64,
}

impl LlmGateway {
    pub(super) fn views(
        &self,
        request: &AppRequest,
        hints: &[MessageHints],
    ) -> HashMap<fitting::Encoding, View> {
        let mut views = HashMap::new();
        for (encoding, counter) in &self.counters {
            let mut counter = lock(counter);
            let (messages, fixed) = request.fit_view(&mut counter, hints);
            let total = fixed + messages.iter().map(|m| m.tokens).sum::<u64>();
            views.insert(
                *encoding,
                View {
                    messages,
                    fixed,
                    total,
                },
            );
        }
        views
    }

    pub(super) fn available(&self, provider: usize) -> u64 {
        self.upstreams[provider]
            .spec
            .context_window
            .saturating_sub(self.config.context_fitting.reserve_output_tokens)
    }

    pub(super) fn view<'v>(
        &self,
        views: &'v HashMap<fitting::Encoding, View>,
        provider: usize,
    ) -> Option<&'v View> {
        views
            .get(&self.upstreams[provider].encoding)
            .or_else(|| views.values().next())
    }
}
