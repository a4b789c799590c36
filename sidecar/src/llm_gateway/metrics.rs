//! The LLM gateway's metrics, registered once per sidecar in its registry.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

use crate::metrics::{Metrics, MetricsError};

/// Time-to-first-token buckets in seconds, 10 ms to 60 s: LLM first tokens range from
/// tens of milliseconds (a cached small model) to tens of seconds (a loaded large one).
const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0,
];

/// Every LLM-gateway metric.
#[derive(Debug, Clone)]
pub struct LlmMetrics {
    /// Attempts at a provider by route, provider and outcome (`success`,
    /// `rate_limited`, `failed`, `timeout`, `rejected`, `stream_failed`).
    pub attempts: IntCounterVec,
    /// Requests answered to the application by route and result (`ok`, `error`).
    pub requests: IntCounterVec,
    /// Failovers by route and the provider failed over from.
    pub failovers: IntCounterVec,
    /// Hedged requests by route and the provider that was slow.
    pub hedges: IntCounterVec,
    /// Time to the first byte of the provider's body, by route and provider.
    pub ttft: HistogramVec,
    /// Messages evicted by context fitting, by route and provider.
    pub evicted_messages: IntCounterVec,
}

impl LlmMetrics {
    /// The families, not registered anywhere (for a registration that failed).
    pub fn unregistered() -> Result<Self, MetricsError> {
        Ok(Self {
            attempts: IntCounterVec::new(
                Opts::new(
                    "trimtab_llm_attempts_total",
                    "Attempts at an LLM provider, by outcome",
                ),
                &["route", "provider", "outcome"],
            )?,
            requests: IntCounterVec::new(
                Opts::new(
                    "trimtab_llm_requests_total",
                    "LLM requests answered to the application, by result",
                ),
                &["route", "result"],
            )?,
            failovers: IntCounterVec::new(
                Opts::new(
                    "trimtab_llm_failovers_total",
                    "Requests moved to another LLM provider, by the provider that failed",
                ),
                &["route", "provider"],
            )?,
            hedges: IntCounterVec::new(
                Opts::new(
                    "trimtab_llm_hedges_total",
                    "Requests also sent to a second LLM provider because the first was slower than the route's p95 time to first token",
                ),
                &["route", "provider"],
            )?,
            ttft: HistogramVec::new(
                HistogramOpts::new(
                    "trimtab_llm_ttft_seconds",
                    "Time to the first byte of an LLM provider's answer",
                )
                .buckets(TTFT_BUCKETS.to_vec()),
                &["route", "provider"],
            )?,
            evicted_messages: IntCounterVec::new(
                Opts::new(
                    "trimtab_llm_evicted_messages_total",
                    "Messages removed by context fitting before a request was sent",
                ),
                &["route", "provider"],
            )?,
        })
    }

    /// The families, registered in `metrics`' registry.
    pub fn register(metrics: &Metrics) -> Result<Self, MetricsError> {
        let m = Self::unregistered()?;
        metrics.register(Box::new(m.attempts.clone()))?;
        metrics.register(Box::new(m.requests.clone()))?;
        metrics.register(Box::new(m.failovers.clone()))?;
        metrics.register(Box::new(m.hedges.clone()))?;
        metrics.register(Box::new(m.ttft.clone()))?;
        metrics.register(Box::new(m.evicted_messages.clone()))?;
        Ok(m)
    }
}
