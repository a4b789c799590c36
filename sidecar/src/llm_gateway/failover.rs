//! Choosing a provider, failing over to the next one and hedging: everything between
//! the decoded request and the answer the application gets, while no byte has reached it.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use http::{HeaderMap, HeaderValue, Response, header};

use super::{
    ATTEMPTS_HEADER, EVICTED_HEADER, Failure, LlmGateway, PROVIDER_HEADER,
    attempt::Attempt,
    full, lock,
    request::{AppRequest, View},
    stream::StreamState,
    unix_now,
};
use crate::{
    forward::ProxyBody,
    llm::{
        fitting::{self, EvictionPlan, MessageHints},
        routing::{self, NoProvider, Outcome},
        stream::{OpenAiStreamOptions, StreamMapper},
        translate::ErrorKind,
    },
};

/// What the dispatch loop does after an attempt.
enum Step {
    /// Answer the application with this.
    Done(Result<Response<ProxyBody>, Failure>),
    /// Try the next provider; this is why.
    Next(Failure),
}

/// An attempt under way, with what its answer needs.
struct Pending<F> {
    provider: usize,
    plan: Option<EvictionPlan>,
    started: Instant,
    attempt: F,
    probe: Probe,
}

/// A provider chosen by the router whose outcome is not recorded yet. Dropped unsettled
/// — the application went away, or a hedge was won by the other provider — it records
/// [`Outcome::Cancelled`], so a half-open circuit breaker does not wait forever for a
/// verdict that will never come.
struct Probe {
    gateway: Arc<LlmGateway>,
    provider: usize,
    settled: bool,
}

impl Probe {
    fn new(gateway: &Arc<LlmGateway>, provider: usize) -> Self {
        Self {
            gateway: Arc::clone(gateway),
            provider,
            settled: false,
        }
    }

    /// The outcome was recorded elsewhere (or is left to the stream that carries it on).
    fn settle(mut self) {
        self.settled = true;
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.settled {
            lock(&self.gateway.router).record(self.provider, Instant::now(), Outcome::Cancelled);
        }
    }
}

impl LlmGateway {
    pub(super) async fn dispatch(
        self: &Arc<Self>,
        request: AppRequest,
        hints: &[MessageHints],
        beta: Option<&HeaderValue>,
    ) -> Result<Response<ProxyBody>, Failure> {
        let views = self.views(&request, hints);
        let fits = |i: usize| {
            self.view(&views, i)
                .is_none_or(|v| v.total <= self.available(i))
        };
        let tokens = views.values().map(|v| v.total).max().unwrap_or(0) + request.max_output();
        let mut tried: Vec<usize> = Vec::new();
        let mut last: Option<Failure> = None;
        loop {
            let now = Instant::now();
            let decision = {
                let mut router = lock(&self.router);
                if tried.is_empty() {
                    router.choose_fitting(now, rand::random::<f64>(), tokens, &fits)
                } else {
                    router.failover_fitting(now, &tried, tokens, &fits)
                }
            };
            let provider = match decision {
                Ok(d) => d.provider,
                Err(no) => return Err(all_failed(no, last, tried.len())),
            };
            if let Some(&from) = tried.last() {
                self.metrics
                    .failovers
                    .with_label_values(&[self.id.as_str(), self.upstreams[from].spec.name.as_str()])
                    .inc();
            }
            tried.push(provider);
            let probe = Probe::new(self, provider);
            let name = self.upstreams[provider].spec.name.clone();

            // Fit and translate: a request that cannot be sent is the application's
            // problem, not the provider's.
            let (body, plan) = match self.prepare(&request, &views, provider) {
                Ok(prepared) => prepared,
                Err(failure) => {
                    lock(&self.router).record(provider, Instant::now(), Outcome::Rejected);
                    probe.settle();
                    return Err(failure);
                }
            };
            if let Some(plan) = &plan {
                self.metrics
                    .evicted_messages
                    .with_label_values(&[self.id.as_str(), name.as_str()])
                    .inc_by(plan.evicted.len() as u64);
            }
            let started = Instant::now();
            let first = self.attempt(provider, body, request.stream(), beta, started);
            let hedge_delay = lock(&self.router).hedge_delay();
            let step = match hedge_delay {
                None => {
                    let attempt = first.await;
                    probe.settle();
                    self.conclude(&request, provider, plan, tried.len(), started, attempt)
                }
                Some(delay) => {
                    let first = Pending {
                        provider,
                        plan,
                        started,
                        attempt: first,
                        probe,
                    };
                    self.hedged(&request, &views, tokens, beta, &mut tried, first, delay)
                        .await
                }
            };
            match step {
                Step::Done(result) => return result,
                Step::Next(failure) => last = Some(failure),
            }
        }
    }

    /// Waits for `first`; if it has no first byte after `delay` (the route's p95 time to
    /// first token), sends the request to a second provider too ([`Router::hedge`], paid
    /// from the failover budget), keeps whichever answers first and cancels the other by
    /// dropping it, which closes its connection.
    #[allow(clippy::too_many_arguments)]
    async fn hedged<F: Future<Output = Attempt>>(
        self: &Arc<Self>,
        request: &AppRequest,
        views: &HashMap<fitting::Encoding, View>,
        tokens: u64,
        beta: Option<&HeaderValue>,
        tried: &mut Vec<usize>,
        first: Pending<F>,
        delay: Duration,
    ) -> Step {
        let Pending {
            provider: a,
            plan: plan_a,
            started: started_a,
            attempt,
            probe: probe_a,
        } = first;
        let mut first = std::pin::pin!(attempt);
        tokio::select! {
            attempt = &mut first => {
                probe_a.settle();
                return self.conclude(request, a, plan_a, tried.len(), started_a, attempt);
            }
            () = tokio::time::sleep(delay) => {}
        }
        let decision = lock(&self.router).hedge(Instant::now(), tried, tokens);
        let Ok(decision) = decision else {
            let attempt = first.await;
            probe_a.settle();
            return self.conclude(request, a, plan_a, tried.len(), started_a, attempt);
        };
        let b = decision.provider;
        let (body, plan_b) = match self.prepare(request, views, b) {
            Ok(prepared) => prepared,
            Err(_) => {
                lock(&self.router).record(b, Instant::now(), Outcome::Rejected);
                let attempt = first.await;
                probe_a.settle();
                return self.conclude(request, a, plan_a, tried.len(), started_a, attempt);
            }
        };
        let probe_b = Probe::new(self, b);
        tried.push(b);
        self.metrics
            .hedges
            .with_label_values(&[self.id.as_str(), self.upstreams[a].spec.name.as_str()])
            .inc();
        let started_b = Instant::now();
        let mut second = std::pin::pin!(self.attempt(b, body, request.stream(), beta, started_b));
        // `Some` while the attempt is under way; a probe left unsettled when the other
        // attempt wins records the loser as cancelled.
        let (mut plan_a, mut plan_b) = (Some(plan_a), Some(plan_b));
        let (mut probe_a, mut probe_b) = (Some(probe_a), Some(probe_b));
        loop {
            let step = tokio::select! {
                attempt = &mut first, if plan_a.is_some() => {
                    let plan = plan_a.take().flatten();
                    if let Some(probe) = probe_a.take() {
                        probe.settle();
                    }
                    self.conclude(request, a, plan, tried.len(), started_a, attempt)
                }
                attempt = &mut second, if plan_b.is_some() => {
                    let plan = plan_b.take().flatten();
                    if let Some(probe) = probe_b.take() {
                        probe.settle();
                    }
                    self.conclude(request, b, plan, tried.len(), started_b, attempt)
                }
            };
            match step {
                // The other attempt is dropped with this frame: cancelled.
                Step::Done(result) => return Step::Done(result),
                Step::Next(failure) if plan_a.is_none() && plan_b.is_none() => {
                    return Step::Next(failure);
                }
                // Recorded by `conclude`; the other attempt may still answer.
                Step::Next(_) => {}
            }
        }
    }

    /// What one finished attempt means for the request: an answer (or a final error) for
    /// the application, or a failure after which the next provider is tried.
    fn conclude(
        self: &Arc<Self>,
        request: &AppRequest,
        provider: usize,
        plan: Option<EvictionPlan>,
        attempts: usize,
        started: Instant,
        attempt: Attempt,
    ) -> Step {
        let name = &self.upstreams[provider].spec.name;
        match attempt {
            Attempt::Failed {
                kind,
                message,
                outcome,
                failover,
                label,
            } => {
                self.count_attempt(provider, label);
                lock(&self.router).record(provider, Instant::now(), outcome);
                tracing::info!(route = %self.id, provider = %name, %message, failover, "LLM provider attempt failed");
                let failure = (kind, format!("{name}: {message}"));
                if !failover {
                    return Step::Done(Err(failure));
                }
                Step::Next(failure)
            }
            Attempt::Whole {
                headers,
                body,
                ttft,
                total,
            } => {
                self.observe_ttft(provider, ttft);
                self.observe_headers(provider, &headers);
                match self.whole_response(provider, &body) {
                    Ok((bytes, output_tokens)) => {
                        self.count_attempt(provider, "success");
                        lock(&self.router).record(
                            provider,
                            Instant::now(),
                            Outcome::Success {
                                ttft,
                                total,
                                output_tokens,
                            },
                        );
                        let mut response = Response::new(full(bytes));
                        self.decorate(
                            &mut response,
                            provider,
                            plan.as_ref(),
                            attempts,
                            "application/json",
                        );
                        Step::Done(Ok(response))
                    }
                    Err(message) => {
                        // A 200 whose body is not the dialect's JSON: the provider is
                        // broken, and nothing has reached the application yet.
                        self.count_attempt(provider, "failed");
                        lock(&self.router).record(provider, Instant::now(), Outcome::Failed);
                        Step::Next((ErrorKind::ServerError, format!("{name}: {message}")))
                    }
                }
            }
            Attempt::Stream {
                headers,
                first,
                body,
                ttft,
            } => {
                self.observe_ttft(provider, ttft);
                self.observe_headers(provider, &headers);
                let mapper = StreamMapper::new(
                    self.upstreams[provider].spec.kind,
                    self.app,
                    request.model(),
                    OpenAiStreamOptions {
                        created: unix_now(),
                        include_usage: request.include_usage(),
                    },
                );
                let stream = StreamState {
                    gateway: Arc::clone(self),
                    provider,
                    mapper,
                    first: Some(first),
                    body,
                    started,
                    ttft,
                    finished: false,
                };
                let mut response = Response::new(stream.into_body());
                self.decorate(
                    &mut response,
                    provider,
                    plan.as_ref(),
                    attempts,
                    "text/event-stream",
                );
                response
                    .headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                Step::Done(Ok(response))
            }
        }
    }

    pub(super) fn count_attempt(&self, provider: usize, outcome: &str) {
        self.metrics
            .attempts
            .with_label_values(&[
                self.id.as_str(),
                self.upstreams[provider].spec.name.as_str(),
                outcome,
            ])
            .inc();
    }

    fn observe_ttft(&self, provider: usize, ttft: Duration) {
        self.metrics
            .ttft
            .with_label_values(&[
                self.id.as_str(),
                self.upstreams[provider].spec.name.as_str(),
            ])
            .observe(ttft.as_secs_f64());
    }

    pub(super) fn observe_headers(&self, provider: usize, headers: &HeaderMap) {
        let snapshot = routing::parse_rate_limits(
            self.upstreams[provider].spec.kind,
            headers,
            SystemTime::now(),
        );
        lock(&self.router).observe_rate_limits(provider, Instant::now(), &snapshot);
    }

    fn decorate(
        &self,
        response: &mut Response<ProxyBody>,
        provider: usize,
        plan: Option<&EvictionPlan>,
        attempts: usize,
        content_type: &'static str,
    ) {
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Ok(v) = HeaderValue::from_str(&self.upstreams[provider].spec.name) {
            headers.insert(PROVIDER_HEADER, v);
        }
        headers.insert(ATTEMPTS_HEADER, HeaderValue::from(attempts));
        if let Some(plan) = plan
            && let Ok(v) = HeaderValue::from_str(&plan.summary())
        {
            headers.insert(EVICTED_HEADER, v);
        }
    }
}

fn all_failed(no: NoProvider, last: Option<Failure>, tried: usize) -> Failure {
    match last {
        Some((kind, message)) => (
            kind,
            format!("every LLM provider failed ({tried} tried; {no}); the last error: {message}"),
        ),
        None => (ErrorKind::Overloaded, no.to_string()),
    }
}
