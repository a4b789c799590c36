//! Which provider serves the next LLM request: a pure decision over plain data. The
//! proxy passes the time in (`now`), a uniform random number (`roll`) where a choice is
//! random, and reports back what happened; nothing here reads a clock or does I/O.
//!
//! # Latency estimate
//!
//! Per provider, a time-decayed mean of the routing signal (time to first token, or
//! total latency per output token): every sample weighs `0.5^(age / halfLife)`, and the
//! estimate is `Σ wᵢ·xᵢ / Σ wᵢ` — the CRD's "after halfLife, a sample weighs half as much"
//! taken literally. Unlike a per-sample EWMA, it reacts at the same pace whatever the
//! request rate, and samples arriving together count alike (forward-decay averaging,
//! Cormode et al., "Forward Decay", ICDE 2009). `Σ wᵢ` says how fresh the estimate is.
//!
//! # Strategies
//!
//! - `lowestLatency`: the current provider is kept until another one's estimate is lower
//!   by more than `switchMargin` (`other × (1 + margin) < current`), so two similar
//!   providers do not flap. A share `exploration` of requests goes to the other
//!   provider with the stalest estimate (least recent evidence), which keeps every
//!   estimate fresh and lets traffic return when a provider recovers.
//! - `priority`: the first available provider in list order.
//! - `weighted`: a random split by `providers[].weight` over the available providers.
//!
//! # Availability
//!
//! A provider is unavailable while its circuit breaker is open, or while it cools down
//! after a 429 (`Retry-After`, else [`DEFAULT_COOL_DOWN`]). Among the available ones,
//! those whose last rate-limit headers leave less than [`LOW_HEADROOM`] of a limit (or
//! fewer tokens than the request needs) are used only when nothing else is: traffic
//! moves away *before* the 429. Between two sets of headers the remaining counts are
//! decremented locally for each request sent, since requests in flight consume them too.
//!
//! With [`Router::choose_fitting`], providers whose context window holds the request
//! without eviction come first, whatever the strategy: a bigger window beats a faster
//! model that would have to forget part of the conversation.
//!
//! # Circuit breaker
//!
//! Closed → open after [`BreakerConfig::failure_threshold`] consecutive failures
//! (connect errors, timeouts, 5xx, 529); open for `open_for`, doubled at each trip up to
//! `max_open_for`; then half-open, letting `half_open_probes` requests through: a
//! success closes it, a failure opens it again.
//!
//! # Failover budget
//!
//! Failovers may add at most `budgetPercent` to the route's requests (Finagle's and
//! Linkerd's retry budget): failovers and first attempts are counted with a decay of
//! [`BUDGET_WINDOW`], and a failover is allowed while `failovers < budget% × requests +
//! MIN_FAILOVERS`. The floor lets a quiet route fail over at all.
//!
//! # Hedging
//!
//! With `failover.hedge`, [`Router::hedge_delay`] is the route's p95 time to first token
//! over its last [`RECENT_TTFT_SAMPLES`] answers; a request still without a first byte
//! then may go to a second provider ([`Router::hedge`]), paid from the failover budget.

use std::{
    collections::VecDeque,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http::HeaderMap;
use trimtab_api::balancer_policy::{
    Failover, LatencySignal, Provider, ProviderKind, Routing, RoutingStrategy,
};

/// Cool-down after a 429 that carries no `Retry-After`.
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(5);

/// Longest honoured `Retry-After`: a provider asking for more is retried after this.
pub const MAX_COOL_DOWN: Duration = Duration::from_secs(300);

/// Share of a rate limit (requests or tokens) below which a provider is avoided while
/// another has room.
pub const LOW_HEADROOM: f64 = 0.05;

/// Decay time constant of the failover budget's counters (Finagle's `ttl` default).
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Failovers always allowed within one [`BUDGET_WINDOW`], whatever the traffic
/// (Finagle's `minRetriesPerSec` × ttl, scaled down for LLM request rates).
pub const MIN_FAILOVERS: f64 = 10.0;

/// Recent times to first token kept for the route's p95 (hedging).
pub const RECENT_TTFT_SAMPLES: usize = 200;

/// Samples needed before hedging starts: a p95 of fewer is noise.
pub const MIN_HEDGE_SAMPLES: usize = 20;

/// Circuit-breaker settings. Not in the CRD yet; the defaults are the usual ones
/// (Hystrix-style: a handful of consecutive failures, seconds open, one probe).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long the first opening lasts.
    pub open_for: Duration,
    /// The longest opening, however many trips in a row.
    pub max_open_for: Duration,
    /// Requests let through at once while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(60),
            half_open_probes: 1,
        }
    }
}

/// The state of one provider's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow; failures are counted.
    Closed {
        /// Failures since the last success.
        consecutive_failures: u32,
    },
    /// No requests until `until`.
    Open {
        /// When probing starts.
        until: Instant,
        /// Openings in a row (1 for the first).
        trips: u32,
    },
    /// A few probes go through.
    HalfOpen {
        /// Probes sent and not yet answered.
        probes_in_flight: u32,
        /// Openings in a row so far.
        trips: u32,
    },
}

/// A per-provider circuit breaker (closed → open → half-open).
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed {
                consecutive_failures: 0,
            },
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a request may be sent at `now`.
    pub fn allows(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until, .. } => now >= until,
            BreakerState::HalfOpen {
                probes_in_flight, ..
            } => probes_in_flight < self.config.half_open_probes,
        }
    }

    /// A request is sent at `now` (after [`allows`](Self::allows)).
    pub fn on_dispatch(&mut self, now: Instant) {
        match self.state {
            BreakerState::Open { until, trips } if now >= until => {
                self.state = BreakerState::HalfOpen {
                    probes_in_flight: 1,
                    trips,
                };
            }
            BreakerState::HalfOpen {
                probes_in_flight,
                trips,
            } => {
                self.state = BreakerState::HalfOpen {
                    probes_in_flight: probes_in_flight + 1,
                    trips,
                };
            }
            _ => {}
        }
    }

    /// A request succeeded.
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed {
            consecutive_failures: 0,
        };
    }

    /// A request failed at `now`.
    pub fn on_failure(&mut self, now: Instant) {
        self.state = match self.state {
            BreakerState::Closed {
                consecutive_failures,
            } if consecutive_failures + 1 >= self.config.failure_threshold => self.open(now, 1),
            BreakerState::Closed {
                consecutive_failures,
            } => BreakerState::Closed {
                consecutive_failures: consecutive_failures + 1,
            },
            BreakerState::HalfOpen { trips, .. } => self.open(now, trips.saturating_add(1)),
            // A late answer to a request sent before the breaker opened.
            open @ BreakerState::Open { .. } => open,
        };
    }

    fn open(&self, now: Instant, trips: u32) -> BreakerState {
        let factor = 1u32 << (trips - 1).min(16);
        let open_for = self
            .config
            .open_for
            .saturating_mul(factor)
            .min(self.config.max_open_for);
        BreakerState::Open {
            until: later(now, open_for),
            trips,
        }
    }
}

/// A mean in which a sample's weight halves every `half_life` (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DecayedMean {
    weight: f64,
    weighted_sum: f64,
    at: Option<Instant>,
}

impl DecayedMean {
    fn decay_to(&mut self, now: Instant, half_life: Duration) {
        if let Some(at) = self.at
            && now > at
        {
            let factor = decay_factor(now - at, half_life);
            self.weight *= factor;
            self.weighted_sum *= factor;
        }
        if self.at.is_none_or(|at| now > at) {
            self.at = Some(now);
        }
    }

    /// Adds a sample `x` taken at `now`.
    pub fn add(&mut self, now: Instant, x: f64, half_life: Duration) {
        self.decay_to(now, half_life);
        self.weight += 1.0;
        self.weighted_sum += x;
    }

    /// The estimate, if there was any sample.
    pub fn value(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.weighted_sum / self.weight)
    }

    /// How much evidence backs the estimate at `now`: the decayed count of samples.
    pub fn evidence(&self, now: Instant, half_life: Duration) -> f64 {
        match self.at {
            Some(at) if now > at => self.weight * decay_factor(now - at, half_life),
            _ => self.weight,
        }
    }
}

/// `now + d`, saturating instead of panicking on overflow (a reset time in a header may
/// be anything).
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(86_400 * 365)))
        .unwrap_or(now)
}

/// `0.5^(age / half_life)`.
fn decay_factor(age: Duration, half_life: Duration) -> f64 {
    if half_life.is_zero() {
        return 0.0;
    }
    0.5f64.powf(age.as_secs_f64() / half_life.as_secs_f64())
}

/// A count decaying with time constant [`BUDGET_WINDOW`].
#[derive(Debug, Clone, Copy, Default)]
struct DecayedCount {
    value: f64,
    at: Option<Instant>,
}

impl DecayedCount {
    fn at(&self, now: Instant) -> f64 {
        match self.at {
            Some(at) if now > at => {
                self.value * (-(now - at).as_secs_f64() / BUDGET_WINDOW.as_secs_f64()).exp()
            }
            _ => self.value,
        }
    }

    fn add(&mut self, now: Instant) {
        self.value = self.at(now) + 1.0;
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
    }
}

/// One limit from a provider's rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// What is left in the current window.
    pub remaining: u64,
    /// The window's limit, when the provider says.
    pub limit: Option<u64>,
    /// When the window resets, relative to when the headers were read.
    pub reset_after: Option<Duration>,
}

impl Headroom {
    fn low(&self, needed: u64) -> bool {
        let share_low = self
            .limit
            .filter(|&l| l > 0)
            .is_some_and(|l| (self.remaining as f64) < LOW_HEADROOM * l as f64);
        share_low || self.remaining < needed.max(1)
    }
}

/// What a provider's response headers say about its rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitSnapshot {
    /// Requests left.
    pub requests: Option<Headroom>,
    /// Tokens left (the most constraining of the token limits given).
    pub tokens: Option<Headroom>,
}

/// Reads the rate-limit headers of a response from a provider of dialect `kind`:
/// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (resets as `6m0s`)
/// and Anthropic's `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
/// {limit,remaining,reset}` (resets as RFC 3339 times, read against `now`). Missing or
/// unreadable headers are left out.
pub fn parse_rate_limits(
    kind: ProviderKind,
    headers: &HeaderMap,
    now: SystemTime,
) -> RateLimitSnapshot {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let number = |name: &str| get(name).and_then(|v| v.parse::<u64>().ok());
    match kind {
        ProviderKind::Openai => {
            let read = |what: &str| {
                Some(Headroom {
                    remaining: number(&format!("x-ratelimit-remaining-{what}"))?,
                    limit: number(&format!("x-ratelimit-limit-{what}")),
                    reset_after: get(&format!("x-ratelimit-reset-{what}"))
                        .and_then(|v| v.parse::<trimtab_api::Duration>().ok())
                        .map(trimtab_api::Duration::get),
                })
            };
            RateLimitSnapshot {
                requests: read("requests"),
                tokens: read("tokens"),
            }
        }
        ProviderKind::Anthropic => {
            let read = |what: &str| {
                Some(Headroom {
                    remaining: number(&format!("anthropic-ratelimit-{what}-remaining"))?,
                    limit: number(&format!("anthropic-ratelimit-{what}-limit")),
                    reset_after: get(&format!("anthropic-ratelimit-{what}-reset"))
                        .and_then(parse_rfc3339)
                        .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO)),
                })
            };
            let tokens = ["tokens", "input-tokens", "output-tokens"]
                .into_iter()
                .filter_map(read)
                .min_by(|a, b| share(a).total_cmp(&share(b)));
            RateLimitSnapshot {
                requests: read("requests"),
                tokens,
            }
        }
    }
}

/// The share of a limit left (the remaining count when the limit is unknown).
fn share(h: &Headroom) -> f64 {
    match h.limit {
        Some(limit) if limit > 0 => h.remaining as f64 / limit as f64,
        _ => h.remaining as f64,
    }
}

/// Parses an RFC 3339 UTC or offset time such as `2025-01-15T10:30:00Z` or
/// `2025-01-15T10:30:00.5+01:00`.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<9}", &frac[..digits.min(9)]);
        nanos = padded.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':' =>
        {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let hours = rest.get(1..3)?.parse::<i64>().ok()?;
            let minutes = rest.get(4..6)?.parse::<i64>().ok()?;
            sign * (hours * 3600 + minutes * 60)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's `days_from_civil`).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Rate-limit headroom as last reported, counted down locally per request sent.
#[derive(Debug, Clone, Copy, Default)]
struct RateLimitState {
    requests: Option<(Headroom, Option<Instant>)>,
    tokens: Option<(Headroom, Option<Instant>)>,
}

impl RateLimitState {
    fn observe(&mut self, snapshot: &RateLimitSnapshot, now: Instant) {
        let with_reset = |h: Headroom| (h, h.reset_after.map(|d| later(now, d)));
        if let Some(h) = snapshot.requests {
            self.requests = Some(with_reset(h));
        }
        if let Some(h) = snapshot.tokens {
            self.tokens = Some(with_reset(h));
        }
    }

    fn expire(&mut self, now: Instant) {
        for slot in [&mut self.requests, &mut self.tokens] {
            if slot.is_some_and(|(_, reset)| reset.is_some_and(|r| now >= r)) {
                *slot = None;
            }
        }
    }

    fn low(&self, tokens_needed: u64) -> bool {
        self.requests.is_some_and(|(h, _)| h.low(1))
            || self.tokens.is_some_and(|(h, _)| h.low(tokens_needed))
    }

    fn consume(&mut self, tokens: u64) {
        if let Some((h, _)) = &mut self.requests {
            h.remaining = h.remaining.saturating_sub(1);
        }
        if let Some((h, _)) = &mut self.tokens {
            h.remaining = h.remaining.saturating_sub(tokens);
        }
    }
}

/// How an attempt at a provider went, as the proxy saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// A complete answer.
    Success {
        /// Time to the first byte of the body (the first token, for streams).
        ttft: Duration,
        /// Time to the end of the body.
        total: Duration,
        /// Tokens generated (from the usage the provider reported).
        output_tokens: u64,
    },
    /// 429: cool down for `retry_after`, else [`DEFAULT_COOL_DOWN`].
    RateLimited {
        /// The provider's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// A failure that counts against the circuit breaker: connect error, reset,
    /// `firstByteTimeout`, 5xx, 529.
    Failed,
    /// The request itself was bad (4xx other than 429): says nothing about the provider.
    Rejected,
    /// The attempt was abandoned before it said anything about the provider (the
    /// application went away, or a hedge was won by the other provider). A half-open
    /// probe is released, so that a later request can probe instead.
    Cancelled,
}

/// Why a provider was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The strategy's choice.
    Chosen,
    /// An exploration request of `lowestLatency`.
    Exploration,
    /// A failover after another provider failed.
    Failover,
    /// A hedge: the first attempt is slower than the route's p95 time to first token.
    Hedge,
}

/// A provider chosen for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Index into the policy's `providers`.
    pub provider: usize,
    /// Why.
    pub reason: Reason,
}

/// No provider can take the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoProvider {
    /// Every provider is open-circuited, cooling down, or already tried.
    #[error(
        "no LLM provider is available: every provider is failing, rate limited or already tried"
    )]
    AllUnavailable,
    /// A failover would exceed `failover.budgetPercent`.
    #[error("the failover budget is exhausted")]
    BudgetExhausted,
    /// `failover.maxAttempts` providers were tried.
    #[error("{0} providers were tried (failover.maxAttempts)")]
    MaxAttempts(u32),
}

#[derive(Debug, Clone)]
struct ProviderState {
    weight: u32,
    latency: DecayedMean,
    rate_limits: RateLimitState,
    cool_down_until: Option<Instant>,
    breaker: Breaker,
}

/// The provider choice of one LLM route.
#[derive(Debug, Clone)]
pub struct Router {
    routing: Routing,
    failover: Failover,
    providers: Vec<ProviderState>,
    current: Option<usize>,
    first_attempts: DecayedCount,
    failovers: DecayedCount,
    recent_ttft: VecDeque<Duration>,
}

impl Router {
    /// A router over `providers` (in the policy's order).
    pub fn new(
        providers: &[Provider],
        routing: Routing,
        failover: Failover,
        breaker: BreakerConfig,
    ) -> Self {
        Self {
            routing,
            failover,
            providers: providers
                .iter()
                .map(|p| ProviderState {
                    weight: p.weight,
                    latency: DecayedMean::default(),
                    rate_limits: RateLimitState::default(),
                    cool_down_until: None,
                    breaker: Breaker::new(breaker),
                })
                .collect(),
            current: None,
            first_attempts: DecayedCount::default(),
            failovers: DecayedCount::default(),
            recent_ttft: VecDeque::with_capacity(RECENT_TTFT_SAMPLES),
        }
    }

    /// The latency estimate of `provider` in seconds (per token for `tokenLatency`).
    pub fn estimate(&self, provider: usize) -> Option<f64> {
        self.providers.get(provider)?.latency.value()
    }

    /// The circuit-breaker state of `provider`.
    pub fn breaker(&self, provider: usize) -> Option<BreakerState> {
        self.providers.get(provider).map(|p| p.breaker.state())
    }

    /// The provider `lowestLatency` currently prefers.
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    fn half_life(&self) -> Duration {
        self.routing.half_life.get()
    }

    /// Usable providers at `now` (not excluded, not cooling down, breaker allowing), in
    /// the first non-empty tier of: window fits and rate-limit room; window fits; room;
    /// the rest.
    fn candidates(
        &mut self,
        now: Instant,
        tokens: u64,
        exclude: &[usize],
        fits: &dyn Fn(usize) -> bool,
    ) -> Vec<usize> {
        let mut tiers: [Vec<usize>; 4] = Default::default();
        for (i, p) in self.providers.iter_mut().enumerate() {
            p.rate_limits.expire(now);
            let cooling = p.cool_down_until.is_some_and(|until| now < until);
            if exclude.contains(&i) || cooling || !p.breaker.allows(now) {
                continue;
            }
            let tier = usize::from(!fits(i)) * 2 + usize::from(p.rate_limits.low(tokens));
            tiers[tier].push(i);
        }
        tiers
            .into_iter()
            .find(|t| !t.is_empty())
            .unwrap_or_default()
    }

    /// Chooses the provider for a new request at `now`; `roll` is uniform in [0, 1) and
    /// `tokens` the request's estimated token count (prompt plus expected output).
    pub fn choose(&mut self, now: Instant, roll: f64, tokens: u64) -> Result<Decision, NoProvider> {
        self.choose_fitting(now, roll, tokens, &|_| true)
    }

    /// [`choose`](Self::choose), preferring the providers for which `fits` says the
    /// request fits the context window without eviction.
    pub fn choose_fitting(
        &mut self,
        now: Instant,
        roll: f64,
        tokens: u64,
        fits: &dyn Fn(usize) -> bool,
    ) -> Result<Decision, NoProvider> {
        let candidates = self.candidates(now, tokens, &[], fits);
        let first = *candidates.first().ok_or(NoProvider::AllUnavailable)?;
        let (provider, reason) = match self.routing.strategy {
            RoutingStrategy::Priority => (first, Reason::Chosen),
            RoutingStrategy::Weighted => (self.weighted(&candidates, roll), Reason::Chosen),
            RoutingStrategy::LowestLatency => self.lowest_latency(&candidates, now, roll),
        };
        self.first_attempts.add(now);
        self.dispatch(provider, now, tokens);
        Ok(Decision { provider, reason })
    }

    fn weighted(&self, candidates: &[usize], roll: f64) -> usize {
        let total: u64 = candidates
            .iter()
            .map(|&i| u64::from(self.providers[i].weight))
            .sum();
        if total == 0 {
            return candidates[0];
        }
        let mut point = roll.clamp(0.0, 1.0) * total as f64;
        for &i in candidates {
            let w = f64::from(self.providers[i].weight);
            if point < w {
                return i;
            }
            point -= w;
        }
        candidates[candidates.len() - 1]
    }

    fn lowest_latency(&mut self, candidates: &[usize], now: Instant, roll: f64) -> (usize, Reason) {
        let estimate = |i: usize| self.providers[i].latency.value();
        // The best known estimate; list order breaks ties and ranks unknown ones last.
        let best = candidates
            .iter()
            .copied()
            .filter(|&i| estimate(i).is_some())
            .min_by(|&a, &b| {
                estimate(a)
                    .unwrap_or(f64::MAX)
                    .total_cmp(&estimate(b).unwrap_or(f64::MAX))
            })
            .unwrap_or(candidates[0]);
        let current = match self.current.filter(|c| candidates.contains(c)) {
            Some(current) => match (estimate(best), estimate(current)) {
                (Some(b), Some(c)) if b * (1.0 + self.routing.switch_margin) < c => best,
                // A provider never measured does not hold traffic against a measured one.
                (Some(_), None) => best,
                _ => current,
            },
            None => best,
        };
        self.current = Some(current);

        if candidates.len() > 1 && roll < self.routing.exploration {
            let half_life = self.half_life();
            let stalest = candidates
                .iter()
                .copied()
                .filter(|&i| i != current)
                .min_by(|&a, &b| {
                    let ea = self.providers[a].latency.evidence(now, half_life);
                    let eb = self.providers[b].latency.evidence(now, half_life);
                    ea.total_cmp(&eb)
                });
            if let Some(other) = stalest {
                return (other, Reason::Exploration);
            }
        }
        (current, Reason::Chosen)
    }

    fn dispatch(&mut self, provider: usize, now: Instant, tokens: u64) {
        let p = &mut self.providers[provider];
        p.breaker.on_dispatch(now);
        p.rate_limits.consume(tokens);
    }

    /// The provider to try next after the providers in `tried` failed, within
    /// `failover.maxAttempts` and the failover budget. The order is the strategy's:
    /// lowest estimate first for `lowestLatency`, list order otherwise.
    pub fn failover(
        &mut self,
        now: Instant,
        tried: &[usize],
        tokens: u64,
    ) -> Result<Decision, NoProvider> {
        self.extra_attempt(now, tried, tokens, &|_| true, Reason::Failover)
    }

    /// [`failover`](Self::failover), preferring providers whose window fits.
    pub fn failover_fitting(
        &mut self,
        now: Instant,
        tried: &[usize],
        tokens: u64,
        fits: &dyn Fn(usize) -> bool,
    ) -> Result<Decision, NoProvider> {
        self.extra_attempt(now, tried, tokens, fits, Reason::Failover)
    }

    /// How long to wait for the first byte before hedging: the route's p95 time to first
    /// token over the last [`RECENT_TTFT_SAMPLES`] answers. `None` when `failover.hedge`
    /// is off or fewer than [`MIN_HEDGE_SAMPLES`] answers were seen.
    pub fn hedge_delay(&self) -> Option<Duration> {
        if !self.failover.hedge || self.recent_ttft.len() < MIN_HEDGE_SAMPLES {
            return None;
        }
        let mut sorted: Vec<Duration> = self.recent_ttft.iter().copied().collect();
        sorted.sort_unstable();
        // Nearest-rank p95.
        let rank = (sorted.len() * 95).div_ceil(100).max(1);
        sorted.get(rank - 1).copied()
    }

    /// A second provider for a request whose first byte is later than
    /// [`hedge_delay`](Self::hedge_delay); it counts against the failover budget, so
    /// hedging cannot add more load than failover may.
    pub fn hedge(
        &mut self,
        now: Instant,
        tried: &[usize],
        tokens: u64,
    ) -> Result<Decision, NoProvider> {
        self.extra_attempt(now, tried, tokens, &|_| true, Reason::Hedge)
    }

    fn extra_attempt(
        &mut self,
        now: Instant,
        tried: &[usize],
        tokens: u64,
        fits: &dyn Fn(usize) -> bool,
        reason: Reason,
    ) -> Result<Decision, NoProvider> {
        if tried.len() as u32 >= self.failover.max_attempts {
            return Err(NoProvider::MaxAttempts(self.failover.max_attempts));
        }
        let candidates = self.candidates(now, tokens, tried, fits);
        let provider = match self.routing.strategy {
            RoutingStrategy::LowestLatency => candidates.iter().copied().min_by(|&a, &b| {
                let ea = self.providers[a].latency.value().unwrap_or(f64::MAX);
                let eb = self.providers[b].latency.value().unwrap_or(f64::MAX);
                ea.total_cmp(&eb)
            }),
            RoutingStrategy::Priority | RoutingStrategy::Weighted => candidates.first().copied(),
        }
        .ok_or(NoProvider::AllUnavailable)?;
        let allowed = f64::from(self.failover.budget_percent) / 100.0 * self.first_attempts.at(now)
            + MIN_FAILOVERS;
        if self.failovers.at(now) + 1.0 > allowed {
            return Err(NoProvider::BudgetExhausted);
        }
        self.failovers.add(now);
        self.dispatch(provider, now, tokens);
        Ok(Decision { provider, reason })
    }

    /// Reports the rate-limit headers of a response from `provider`.
    pub fn observe_rate_limits(
        &mut self,
        provider: usize,
        now: Instant,
        snapshot: &RateLimitSnapshot,
    ) {
        if let Some(p) = self.providers.get_mut(provider) {
            p.rate_limits.observe(snapshot, now);
        }
    }

    /// Reports how an attempt at `provider` ended at `now`.
    pub fn record(&mut self, provider: usize, now: Instant, outcome: Outcome) {
        let half_life = self.half_life();
        let signal = self.routing.signal;
        let Some(p) = self.providers.get_mut(provider) else {
            return;
        };
        match outcome {
            Outcome::Success {
                ttft,
                total,
                output_tokens,
            } => {
                p.breaker.on_success();
                let sample = match signal {
                    LatencySignal::Ttft => ttft.as_secs_f64(),
                    LatencySignal::TokenLatency => {
                        total.as_secs_f64() / output_tokens.max(1) as f64
                    }
                };
                p.latency.add(now, sample, half_life);
                if self.recent_ttft.len() == RECENT_TTFT_SAMPLES {
                    self.recent_ttft.pop_front();
                }
                self.recent_ttft.push_back(ttft);
            }
            Outcome::RateLimited { retry_after } => {
                let wait = retry_after.unwrap_or(DEFAULT_COOL_DOWN).min(MAX_COOL_DOWN);
                p.cool_down_until = Some(later(now, wait));
                // The half-open probe ended without a verdict on the provider's health.
                if let BreakerState::HalfOpen { trips, .. } = p.breaker.state {
                    p.breaker.state = BreakerState::Open {
                        until: later(now, wait),
                        trips,
                    };
                }
            }
            Outcome::Failed => p.breaker.on_failure(now),
            Outcome::Rejected => {
                if matches!(p.breaker.state, BreakerState::HalfOpen { .. }) {
                    p.breaker.on_success();
                }
            }
            Outcome::Cancelled => {
                if let BreakerState::HalfOpen {
                    probes_in_flight,
                    trips,
                } = p.breaker.state
                {
                    p.breaker.state = BreakerState::HalfOpen {
                        probes_in_flight: probes_in_flight.saturating_sub(1),
                        trips,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::collections::BTreeMap;

    use http::HeaderValue;
    use trimtab_api::Duration as SpecDuration;

    use super::*;

    fn provider(name: &str, kind: ProviderKind, weight: u32) -> Provider {
        Provider {
            name: name.into(),
            kind,
            base_url: "https://api.example".into(),
            model: "m".into(),
            model_aliases: BTreeMap::new(),
            context_window: 128_000,
            weight,
            api_key: None,
        }
    }

    fn routing(strategy: RoutingStrategy, exploration: f64) -> Routing {
        Routing {
            strategy,
            signal: LatencySignal::Ttft,
            half_life: SpecDuration::from_secs(5),
            switch_margin: 0.2,
            exploration,
        }
    }

    fn failover() -> Failover {
        Failover {
            failover_on: vec![],
            max_attempts: 3,
            first_byte_timeout: SpecDuration::from_secs(10),
            budget_percent: 20,
            hedge: false,
        }
    }

    fn router(strategy: RoutingStrategy, exploration: f64) -> Router {
        let providers = [
            provider("openai", ProviderKind::Openai, 3),
            provider("anthropic", ProviderKind::Anthropic, 1),
        ];
        Router::new(
            &providers,
            routing(strategy, exploration),
            failover(),
            BreakerConfig::default(),
        )
    }

    fn ok(ttft_ms: u64) -> Outcome {
        Outcome::Success {
            ttft: Duration::from_millis(ttft_ms),
            total: Duration::from_millis(ttft_ms * 4),
            output_tokens: 100,
        }
    }

    /// A deterministic uniform sequence (a Weyl sequence: evenly spread, no seed needed).
    fn rolls() -> impl Iterator<Item = f64> {
        (1u64..).map(|i| (i as f64 * 0.618_033_988_749_895).fract())
    }

    /// Runs `seconds` of 20 requests per second; `ttft(provider, t)` is each provider's
    /// time to first token at `t`. Returns, per second, the share sent to provider 0,
    /// and how often the preferred provider changed.
    fn simulate(
        r: &mut Router,
        t0: Instant,
        seconds: u64,
        ttft: impl Fn(usize, u64) -> u64,
        rolls: &mut impl Iterator<Item = f64>,
    ) -> (Vec<f64>, u32) {
        let mut shares = Vec::new();
        let mut switches = 0;
        let mut last = r.current();
        for s in 0..seconds {
            let mut to_first = 0;
            for k in 0..20u64 {
                let now = t0 + Duration::from_millis(s * 1000 + k * 50);
                let d = r.choose(now, rolls.next().unwrap(), 1000).unwrap();
                if d.provider == 0 {
                    to_first += 1;
                }
                let latency = ttft(d.provider, s);
                r.record(
                    d.provider,
                    now + Duration::from_millis(latency),
                    ok(latency),
                );
                if r.current() != last {
                    switches += 1;
                    last = r.current();
                }
            }
            shares.push(f64::from(to_first) / 20.0);
        }
        (shares, switches)
    }

    #[test]
    fn decayed_mean_halves_a_sample_weight_every_half_life() {
        let t0 = Instant::now();
        let hl = Duration::from_secs(10);
        let mut m = DecayedMean::default();
        m.add(t0, 100.0, hl);
        m.add(t0 + hl, 200.0, hl);
        // Weights 0.5 and 1: (50 + 200) / 1.5.
        assert!((m.value().unwrap() - 250.0 / 1.5).abs() < 1e-9);
        assert!((m.evidence(t0 + hl * 2, hl) - 0.75).abs() < 1e-9);
        // Samples at the same instant count alike.
        let mut same = DecayedMean::default();
        same.add(t0, 1.0, hl);
        same.add(t0, 3.0, hl);
        assert_eq!(same.value(), Some(2.0));
    }

    #[test]
    fn traffic_follows_the_faster_provider_without_flapping() {
        let t0 = Instant::now();
        let mut r = router(RoutingStrategy::LowestLatency, 0.05);
        let mut rolls = rolls();
        // Both similar (within the 20% margin) and noisy: traffic must not flap.
        let noisy = |p: usize, s: u64| {
            if p == 0 {
                200 + (s * 37 % 40)
            } else {
                210 + (s * 53 % 40)
            }
        };
        let (shares, switches) = simulate(&mut r, t0, 60, noisy, &mut rolls);
        assert!(
            switches <= 1,
            "flapped {switches} times between similar providers"
        );
        let stayed =
            shares[10..].iter().all(|&s| s >= 0.85) || shares[10..].iter().all(|&s| s <= 0.15);
        assert!(stayed, "{shares:?}");

        // Provider 0 becomes five times slower: traffic moves to provider 1 and stays.
        let t1 = t0 + Duration::from_secs(60);
        let (shares, switches) = simulate(
            &mut r,
            t1,
            30,
            |p, _| if p == 0 { 1000 } else { 210 },
            &mut rolls,
        );
        assert!(switches <= 1, "{switches}");
        let moved_at = shares.iter().position(|&s| s <= 0.10).unwrap();
        assert!(
            moved_at <= 10,
            "90% moved only after {moved_at}s: {shares:?}"
        );
        assert!(shares[moved_at..].iter().all(|&s| s <= 0.10), "{shares:?}");
        assert_eq!(r.current(), Some(1));

        // Provider 0 recovers and is now clearly faster: traffic returns, once.
        let t2 = t1 + Duration::from_secs(30);
        let (shares, switches) = simulate(
            &mut r,
            t2,
            40,
            |p, _| if p == 0 { 100 } else { 210 },
            &mut rolls,
        );
        assert_eq!(switches, 1);
        assert!(shares[25..].iter().all(|&s| s >= 0.90), "{shares:?}");
    }

    #[test]
    fn exploration_keeps_the_slow_providers_estimate_fresh() {
        let t0 = Instant::now();
        let mut r = router(RoutingStrategy::LowestLatency, 0.05);
        let mut rolls = rolls();
        simulate(
            &mut r,
            t0,
            20,
            |p, _| if p == 0 { 100 } else { 400 },
            &mut rolls,
        );
        assert_eq!(r.current(), Some(0));
        // The slow provider gets better while receiving only exploration traffic.
        let t1 = t0 + Duration::from_secs(20);
        let (shares, _) = simulate(
            &mut r,
            t1,
            30,
            |p, _| if p == 0 { 100 } else { 50 },
            &mut rolls,
        );
        let explored = shares.iter().map(|s| 1.0 - s).sum::<f64>() / shares.len() as f64;
        assert!(explored > 0.02, "exploration share {explored}");
        let estimate = r.estimate(1).unwrap();
        assert!(
            estimate < 0.08,
            "estimate of the recovered provider still {estimate}s"
        );
        assert_eq!(
            r.current(),
            Some(1),
            "traffic follows the recovered provider"
        );

        // Without exploration, the slow provider's estimate would stay stale.
        let mut r = router(RoutingStrategy::LowestLatency, 0.0);
        simulate(
            &mut r,
            t0,
            20,
            |p, _| if p == 0 { 100 } else { 400 },
            &mut rolls,
        );
        simulate(
            &mut r,
            t1,
            30,
            |p, _| if p == 0 { 100 } else { 50 },
            &mut rolls,
        );
        assert_eq!(r.current(), Some(0));
    }

    #[test]
    fn a_provider_with_low_remaining_tokens_is_avoided_before_it_429s() {
        let t0 = Instant::now();
        let mut r = router(RoutingStrategy::LowestLatency, 0.0);
        let mut now = t0;
        for _ in 0..20 {
            let d = r.choose(now, 0.5, 2_000).unwrap();
            let latency = if d.provider == 0 { 100 } else { 300 };
            r.record(d.provider, now, ok(latency));
            now += Duration::from_millis(100);
        }
        assert_eq!(r.choose(now, 0.5, 2_000).unwrap().provider, 0);

        // The fast provider reports 30k of 1M tokens left this minute (3%): below the
        // headroom floor, so traffic moves although it is still the fastest.
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-requests", "9000"),
            ("x-ratelimit-limit-tokens", "1000000"),
            ("x-ratelimit-remaining-tokens", "30000"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        let snapshot = parse_rate_limits(ProviderKind::Openai, &headers, SystemTime::now());
        assert_eq!(
            snapshot.tokens.unwrap().reset_after,
            Some(Duration::from_secs(360))
        );
        r.observe_rate_limits(0, now, &snapshot);
        assert_eq!(r.choose(now, 0.5, 2_000).unwrap().provider, 1);

        // When the window resets, the fast provider is used again.
        let later = now + Duration::from_secs(361);
        assert_eq!(r.choose(later, 0.5, 2_000).unwrap().provider, 0);
    }

    #[test]
    fn local_accounting_moves_traffic_before_the_next_headers_arrive() {
        let t0 = Instant::now();
        let mut r = router(RoutingStrategy::Priority, 0.0);
        let snapshot = RateLimitSnapshot {
            requests: None,
            tokens: Some(Headroom {
                remaining: 10_000,
                limit: None,
                reset_after: None,
            }),
        };
        r.observe_rate_limits(0, t0, &snapshot);
        let chosen: Vec<usize> = (0..6)
            .map(|_| r.choose(t0, 0.5, 3_000).unwrap().provider)
            .collect();
        // 10k tokens cover three 3k requests; the fourth would not fit.
        assert_eq!(chosen, [0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn a_429_cools_the_provider_down_for_retry_after() {
        let t0 = Instant::now();
        let mut r = router(RoutingStrategy::Priority, 0.0);
        r.record(
            0,
            t0,
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(20)),
            },
        );
        assert_eq!(
            r.choose(t0 + Duration::from_secs(19), 0.5, 1)
                .unwrap()
                .provider,
            1
        );
        assert_eq!(
            r.choose(t0 + Duration::from_secs(20), 0.5, 1)
                .unwrap()
                .provider,
            0
        );
        r.record(0, t0, Outcome::RateLimited { retry_after: None });
        assert_eq!(
            r.choose(t0 + DEFAULT_COOL_DOWN - Duration::from_millis(1), 0.5, 1)
                .unwrap()
                .provider,
            1
        );
        r.record(
            0,
            t0,
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(86_400)),
            },
        );
        assert_eq!(r.choose(t0 + MAX_COOL_DOWN, 0.5, 1).unwrap().provider, 0);
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_probes_when_half_open() {
        let t0 = Instant::now();
        let mut r = router(RoutingStrategy::Priority, 0.0);
        for _ in 0..4 {
            assert_eq!(r.choose(t0, 0.5, 1).unwrap().provider, 0);
            r.record(0, t0, Outcome::Failed);
        }
        assert_eq!(
            r.breaker(0),
            Some(BreakerState::Closed {
                consecutive_failures: 4
            })
        );
        r.record(0, t0, Outcome::Failed);
        assert!(matches!(
            r.breaker(0),
            Some(BreakerState::Open { trips: 1, .. })
        ));
        assert_eq!(
            r.choose(t0 + Duration::from_secs(4), 0.5, 1)
                .unwrap()
                .provider,
            1
        );

        // After open_for: one probe goes through, the next request goes elsewhere.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(r.choose(t1, 0.5, 1).unwrap().provider, 0);
        assert!(matches!(
            r.breaker(0),
            Some(BreakerState::HalfOpen {
                probes_in_flight: 1,
                trips: 1
            })
        ));
        assert_eq!(r.choose(t1, 0.5, 1).unwrap().provider, 1);
        // A cancelled probe frees its slot without a verdict: the next request probes.
        r.record(0, t1, Outcome::Cancelled);
        assert_eq!(r.choose(t1, 0.5, 1).unwrap().provider, 0);
        // The probe fails: open again, twice as long.
        r.record(0, t1, Outcome::Failed);
        assert_eq!(
            r.breaker(0),
            Some(BreakerState::Open {
                until: t1 + Duration::from_secs(10),
                trips: 2
            })
        );
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(r.choose(t2, 0.5, 1).unwrap().provider, 0);
        r.record(0, t2, ok(100));
        assert_eq!(
            r.breaker(0),
            Some(BreakerState::Closed {
                consecutive_failures: 0
            })
        );
    }

    #[test]
    fn when_every_provider_is_down_there_is_one_clear_error() {
        let t0 = Instant::now();
        let mut r = router(RoutingStrategy::LowestLatency, 0.05);
        for p in 0..2 {
            for _ in 0..5 {
                r.record(p, t0, Outcome::Failed);
            }
        }
        assert_eq!(r.choose(t0, 0.5, 1), Err(NoProvider::AllUnavailable));
        assert_eq!(
            NoProvider::AllUnavailable.to_string(),
            "no LLM provider is available: every provider is failing, rate limited or already tried"
        );
    }

    #[test]
    fn failover_goes_to_the_next_provider_within_attempts_and_budget() {
        let t0 = Instant::now();
        let mut r = router(RoutingStrategy::LowestLatency, 0.0);
        let first = r.choose(t0, 0.5, 1).unwrap();
        let next = r.failover(t0, &[first.provider], 1).unwrap();
        assert_eq!(next.reason, Reason::Failover);
        assert_ne!(next.provider, first.provider);
        assert_eq!(r.failover(t0, &[0, 1], 1), Err(NoProvider::AllUnavailable));
        let mut small = r.clone();
        small.failover.max_attempts = 2;
        assert_eq!(
            small.failover(t0, &[0, 1], 1),
            Err(NoProvider::MaxAttempts(2))
        );

        // 100 requests in a second: at most 20% + the floor of 10 may fail over.
        let mut r = router(RoutingStrategy::Priority, 0.0);
        let mut failed_over = 0;
        for k in 0..100u64 {
            let now = t0 + Duration::from_millis(k * 10);
            let d = r.choose(now, 0.5, 1).unwrap();
            if r.failover(now, &[d.provider], 1).is_ok() {
                failed_over += 1;
            }
        }
        assert!(
            (25..=31).contains(&failed_over),
            "{failed_over} failovers for 100 requests"
        );
    }

    #[test]
    fn a_provider_whose_window_fits_is_preferred_over_a_faster_one_that_does_not() {
        let t0 = Instant::now();
        let mut r = router(RoutingStrategy::LowestLatency, 0.0);
        r.record(0, t0, ok(100));
        r.record(1, t0, ok(300));
        assert_eq!(r.choose(t0, 0.5, 1).unwrap().provider, 0);
        let fits_only_1 = |p: usize| p == 1;
        assert_eq!(
            r.choose_fitting(t0, 0.5, 1, &fits_only_1).unwrap().provider,
            1
        );
        // When none fits, the usual choice stands (and fitting will evict).
        assert_eq!(
            r.choose_fitting(t0, 0.5, 1, &|_| false).unwrap().provider,
            0
        );
        let d = r.failover_fitting(t0, &[1], 1, &fits_only_1).unwrap();
        assert_eq!(d.provider, 0, "the only provider left, fitting or not");
    }

    #[test]
    fn hedging_waits_for_the_routes_p95_ttft_and_spends_the_failover_budget() {
        let t0 = Instant::now();
        let mut r = router(RoutingStrategy::Priority, 0.0);
        for ms in 1..=100u64 {
            r.record(0, t0, ok(ms * 10));
        }
        assert_eq!(r.hedge_delay(), None, "hedging is off by default");
        r.failover.hedge = true;
        assert_eq!(r.hedge_delay(), Some(Duration::from_millis(950)));
        let first = r.choose(t0, 0.5, 1).unwrap();
        let hedge = r.hedge(t0, &[first.provider], 1).unwrap();
        assert_eq!((hedge.provider, hedge.reason), (1, Reason::Hedge));
        let spent = r.failovers.at(t0);
        assert!((spent - 1.0).abs() < 1e-9);
    }

    #[test]
    fn priority_and_weighted_strategies() {
        let t0 = Instant::now();
        let mut r = router(RoutingStrategy::Priority, 0.0);
        r.record(0, t0, ok(1000));
        r.record(1, t0, ok(10));
        assert_eq!(
            r.choose(t0, 0.9, 1).unwrap().provider,
            0,
            "priority ignores latency"
        );

        let mut r = router(RoutingStrategy::Weighted, 0.0);
        let mut counts = [0u32; 2];
        for roll in rolls().take(4000) {
            counts[r.choose(t0, roll, 1).unwrap().provider] += 1;
        }
        assert!(
            (2900..=3100).contains(&counts[0]),
            "weights 3:1 gave {counts:?}"
        );
    }

    #[test]
    fn anthropic_rate_limit_headers_use_the_tightest_token_limit_and_rfc3339_resets() {
        let now = parse_rfc3339("2025-01-15T10:30:00Z").unwrap();
        assert_eq!(
            now.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_736_937_000
        );
        assert_eq!(
            parse_rfc3339("2025-01-15T11:30:00.5+01:00").unwrap(),
            now + Duration::from_millis(500)
        );
        assert_eq!(parse_rfc3339("2025-13-15T10:30:00Z"), None);
        assert_eq!(parse_rfc3339("2025-01-15T10:30:00é1:00"), None);
        assert_eq!(parse_rfc3339("2025-01-15T10:30:00+é:00"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);

        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("anthropic-ratelimit-requests-limit", "4000"),
            ("anthropic-ratelimit-requests-remaining", "3999"),
            ("anthropic-ratelimit-requests-reset", "2025-01-15T10:30:01Z"),
            ("anthropic-ratelimit-input-tokens-limit", "400000"),
            ("anthropic-ratelimit-input-tokens-remaining", "8000"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2025-01-15T10:30:40Z",
            ),
            ("anthropic-ratelimit-output-tokens-limit", "80000"),
            ("anthropic-ratelimit-output-tokens-remaining", "79000"),
            ("anthropic-ratelimit-output-tokens-reset", "not a time"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        let s = parse_rate_limits(ProviderKind::Anthropic, &headers, now);
        assert_eq!(
            s.requests,
            Some(Headroom {
                remaining: 3999,
                limit: Some(4000),
                reset_after: Some(Duration::from_secs(1))
            })
        );
        assert_eq!(
            s.tokens,
            Some(Headroom {
                remaining: 8000,
                limit: Some(400_000),
                reset_after: Some(Duration::from_secs(40))
            })
        );
        assert_eq!(
            parse_rate_limits(ProviderKind::Openai, &headers, now),
            RateLimitSnapshot::default()
        );
    }
}
