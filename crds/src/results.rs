//! What a run measured: HDR histograms per state and overall (corrected for
//! coordinated omission, and raw), and counters. Everything is serializable and merges
//! exactly, so the results of many runner pods combine into the numbers one process
//! would have recorded — percentiles come from merged histograms, never from averaged
//! percentiles.

use std::{collections::BTreeMap, fmt, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use hdrhistogram::{
    Histogram,
    serialization::{Deserializer as HdrDeserializer, Serializer as _, V2Serializer},
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Lowest latency tracked: 1 µs.
pub const LOWEST_MICROS: u64 = 1;
/// Highest latency tracked: 60 s (longer ones are recorded as 60 s).
pub const HIGHEST_MICROS: u64 = 60_000_000;
/// Significant decimal digits: 0.1% value resolution.
pub const SIGNIFICANT_DIGITS: u8 = 3;
/// How many failure examples (and invariant violations) a result keeps.
pub const KEEP_EXAMPLES: usize = 20;

/// A latency histogram in microseconds, serialized as base64 of the HdrHistogram V2
/// format (the same bytes every HdrHistogram implementation reads).
#[derive(Clone, PartialEq)]
pub struct LatencyHistogram(pub Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        // Infallible: the bounds are constants that new_with_bounds accepts
        // (low >= 1, high >= 2·low, sigfig <= 5), checked by a test below.
        Self(
            Histogram::new_with_bounds(LOWEST_MICROS, HIGHEST_MICROS, SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid"),
        )
    }
}

impl fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "LatencyHistogram {{ count: {}, p50: {}µs, p99: {}µs, max: {}µs }}",
            self.0.len(),
            self.0.value_at_quantile(0.5),
            self.0.value_at_quantile(0.99),
            self.0.max()
        )
    }
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.max(LOWEST_MICROS));
    }

    /// Adds another histogram's counts (same bounds, so this is exact).
    pub fn merge(&mut self, other: &Self) {
        // Both sides have the same bounds, so `add` cannot fail; should a histogram
        // from elsewhere have wider bounds, its values are added one by one, saturated.
        if self.0.add(&other.0).is_err() {
            for v in other.0.iter_recorded() {
                self.0
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// The latency at `quantile` (0–1).
    pub fn quantile(&self, quantile: f64) -> Duration {
        Duration::from_micros(self.0.value_at_quantile(quantile))
    }

    /// The largest latency.
    pub fn max(&self) -> Duration {
        Duration::from_micros(self.0.max())
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }
}

impl Serialize for LatencyHistogram {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut bytes)
            .map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&STANDARD.encode(bytes))
    }
}

impl<'de> Deserialize<'de> for LatencyHistogram {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let bytes = STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("histogram: not base64: {e}")))?;
        let histogram: Histogram<u64> = HdrDeserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| {
            serde::de::Error::custom(format!("histogram: not HdrHistogram V2: {e:?}"))
        })?;
        Ok(Self(histogram))
    }
}

/// A latency as people read it: `830µs`, `1.25ms`, `2.10s` (what the histograms'
/// microseconds print best in).
pub fn human(d: Duration) -> String {
    let micros = d.as_micros();
    if micros < 1_000 {
        format!("{micros}µs")
    } else if micros < 1_000_000 {
        format!("{:.2}ms", micros as f64 / 1e3)
    } else {
        format!("{:.2}s", micros as f64 / 1e6)
    }
}

/// Latency as the user experienced it (`corrected`: from when the request should have
/// started, so a stalled generator cannot hide a stalled target — coordinated
/// omission) and as the wire saw it (`raw`: from when it was sent).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// From the intended start time.
    pub corrected: LatencyHistogram,
    /// From the actual send time.
    pub raw: LatencyHistogram,
}

impl Latency {
    /// Records one request.
    pub fn record(&mut self, corrected: Duration, raw: Duration) {
        self.corrected.record(corrected);
        self.raw.record(raw);
    }

    /// Adds another's counts.
    pub fn merge(&mut self, other: &Self) {
        self.corrected.merge(&other.corrected);
        self.raw.merge(&other.raw);
    }
}

/// Why a request counted as failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureKind {
    /// The connection could not be made.
    Connect,
    /// No response within the request timeout.
    Timeout,
    /// The response status was 4xx/5xx and the state has no checks to judge it.
    Status,
    /// A check was false or could not be evaluated.
    Check,
    /// A template could not be rendered (a variable it prints is missing).
    Render,
    /// Anything else on the wire (reset, malformed response, body read error).
    Transport,
}

/// Failed requests by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureCounts {
    /// Connect failures.
    pub connect: u64,
    /// Timeouts.
    pub timeout: u64,
    /// Error statuses without checks.
    pub status: u64,
    /// Failed checks.
    pub check: u64,
    /// Render failures.
    pub render: u64,
    /// Other transport errors.
    pub transport: u64,
}

impl FailureCounts {
    /// Counts one failure.
    pub fn add(&mut self, kind: FailureKind) {
        *match kind {
            FailureKind::Connect => &mut self.connect,
            FailureKind::Timeout => &mut self.timeout,
            FailureKind::Status => &mut self.status,
            FailureKind::Check => &mut self.check,
            FailureKind::Render => &mut self.render,
            FailureKind::Transport => &mut self.transport,
        } += 1;
    }

    /// All failures.
    pub fn total(&self) -> u64 {
        self.connect + self.timeout + self.status + self.check + self.render + self.transport
    }

    /// Adds another's counts.
    pub fn merge(&mut self, other: &Self) {
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.status += other.status;
        self.check += other.check;
        self.render += other.render;
        self.transport += other.transport;
    }
}

/// One state's numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateResults {
    /// Requests sent (states without a request count visits here).
    pub requests: u64,
    /// Failed requests by kind.
    pub failures: FailureCounts,
    /// Checks that held.
    pub checks_passed: u64,
    /// Checks that did not.
    pub checks_failed: u64,
    /// Transitions taken out of this state, by target state name.
    pub transitions: BTreeMap<String, u64>,
    /// Latency of this state's requests.
    pub latency: Latency,
}

impl StateResults {
    /// Adds another's counts.
    pub fn merge(&mut self, other: &Self) {
        self.requests += other.requests;
        self.failures.merge(&other.failures);
        self.checks_passed += other.checks_passed;
        self.checks_failed += other.checks_failed;
        for (to, n) in &other.transitions {
            *self.transitions.entry(to.clone()).or_default() += n;
        }
        self.latency.merge(&other.latency);
    }
}

/// A failed request, kept as evidence: who, where, what was sent, what came back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureExample {
    /// The bot user.
    pub user: u64,
    /// The state it was in.
    pub state: String,
    /// Why it failed.
    pub kind: FailureKind,
    /// `POST /api/cart`.
    pub request: String,
    /// The response status, when there was a response.
    pub status: Option<u16>,
    /// The failed check and its verdict, or the error.
    pub detail: String,
    /// The start of the response body.
    pub response: String,
}

/// One invariant's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InvariantResults {
    /// Times it was checked.
    pub checks: u64,
    /// Times the expectation was false (or the request failed).
    pub violations: u64,
    /// The first few offending responses.
    pub examples: Vec<FailureExample>,
}

impl InvariantResults {
    /// Adds another's counts and keeps the first examples.
    pub fn merge(&mut self, other: &Self) {
        self.checks += other.checks;
        self.violations += other.violations;
        keep_first(&mut self.examples, &other.examples);
    }
}

/// Everything a run measured, mergeable across runners.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Results {
    /// Requests sent.
    pub requests: u64,
    /// Failed requests by kind.
    pub failures: FailureCounts,
    /// Checks that held.
    pub checks_passed: u64,
    /// Checks that did not.
    pub checks_failed: u64,
    /// Sessions begun.
    pub sessions_started: u64,
    /// Sessions that reached a terminal state.
    pub sessions_completed: u64,
    /// Open model: arrivals refused because `maxUsers` sessions were running.
    pub dropped_arrivals: u64,
    /// All requests' latency.
    pub latency: Latency,
    /// Per state, by name.
    pub states: BTreeMap<String, StateResults>,
    /// Per invariant, by name.
    pub invariants: BTreeMap<String, InvariantResults>,
    /// The first few failed requests.
    pub failure_examples: Vec<FailureExample>,
}

impl Results {
    /// Adds `other` into `self`: counters add, histograms add bucket by bucket, and
    /// the examples keep the first [`KEEP_EXAMPLES`].
    pub fn merge(&mut self, other: &Self) {
        self.requests += other.requests;
        self.failures.merge(&other.failures);
        self.checks_passed += other.checks_passed;
        self.checks_failed += other.checks_failed;
        self.sessions_started += other.sessions_started;
        self.sessions_completed += other.sessions_completed;
        self.dropped_arrivals += other.dropped_arrivals;
        self.latency.merge(&other.latency);
        for (name, state) in &other.states {
            self.states.entry(name.clone()).or_default().merge(state);
        }
        for (name, inv) in &other.invariants {
            self.invariants.entry(name.clone()).or_default().merge(inv);
        }
        keep_first(&mut self.failure_examples, &other.failure_examples);
    }

    /// Requests, failures and corrected-latency percentiles per state (states that sent
    /// nothing left out) and overall, as a fixed-width table.
    pub fn latency_table(&self) -> String {
        let row = |name: &str, requests: u64, failures: u64, h: &LatencyHistogram| {
            format!(
                "{name:<20} {requests:>10} {failures:>9} {:>10} {:>10} {:>10} {:>10}\n",
                human(h.quantile(0.5)),
                human(h.quantile(0.9)),
                human(h.quantile(0.99)),
                human(h.max()),
            )
        };
        let mut out = format!(
            "{:<20} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10}\n",
            "state", "requests", "failures", "p50", "p90", "p99", "max"
        );
        for (name, state) in self.states.iter().filter(|(_, s)| s.requests > 0) {
            out += &row(
                name,
                state.requests,
                state.failures.total(),
                &state.latency.corrected,
            );
        }
        out += &row(
            "all",
            self.requests,
            self.failures.total(),
            &self.latency.corrected,
        );
        out
    }

    /// Invariant violations over all invariants.
    pub fn violations(&self) -> u64 {
        self.invariants.values().map(|i| i.violations).sum()
    }
}

fn keep_first(mine: &mut Vec<FailureExample>, theirs: &[FailureExample]) {
    let room = KEEP_EXAMPLES.saturating_sub(mine.len());
    mine.extend(theirs.iter().take(room).cloned());
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    use super::*;

    /// One simulated request outcome.
    struct Event {
        state: &'static str,
        corrected: Duration,
        raw: Duration,
        failure: Option<FailureKind>,
        next: &'static str,
    }

    fn record(results: &mut Results, e: &Event) {
        results.requests += 1;
        results.latency.record(e.corrected, e.raw);
        let state = results.states.entry(e.state.into()).or_default();
        state.requests += 1;
        state.latency.record(e.corrected, e.raw);
        *state.transitions.entry(e.next.into()).or_default() += 1;
        if let Some(kind) = e.failure {
            results.failures.add(kind);
            state.failures.add(kind);
        }
    }

    fn events(n: usize, seed: u64) -> Vec<Event> {
        let mut rng = SmallRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let raw = Duration::from_micros(rng.random_range(1..5_000_000));
                Event {
                    state: ["login", "browse", "checkout"][rng.random_range(0..3)],
                    corrected: raw + Duration::from_micros(rng.random_range(0..1000)),
                    raw,
                    failure: rng.random_bool(0.1).then_some(FailureKind::Check),
                    next: ["browse", "leave"][rng.random_range(0..2)],
                }
            })
            .collect()
    }

    #[test]
    fn merging_two_shards_equals_recording_everything_in_one() {
        let all = events(10_000, 1);
        let mut one = Results::default();
        let (mut a, mut b) = (Results::default(), Results::default());
        for (i, e) in all.iter().enumerate() {
            record(&mut one, e);
            record(if i % 3 == 0 { &mut a } else { &mut b }, e);
        }
        a.merge(&b);
        assert_eq!(a, one);
        assert_eq!(
            a.latency.corrected.quantile(0.99),
            one.latency.corrected.quantile(0.99)
        );
    }

    #[test]
    fn results_round_trip_through_json_exactly() {
        let mut results = Results::default();
        for e in &events(1000, 2) {
            record(&mut results, e);
        }
        results.invariants.insert(
            "stock".into(),
            InvariantResults {
                checks: 3,
                violations: 1,
                examples: vec![],
            },
        );
        let json = serde_json::to_string(&results).expect("serializes");
        let back: Results = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, results);
    }

    #[test]
    fn durations_print_in_the_unit_that_reads_best() {
        assert_eq!(human(Duration::from_micros(830)), "830µs");
        assert_eq!(human(Duration::from_micros(1250)), "1.25ms");
        assert_eq!(human(Duration::from_millis(2100)), "2.10s");
    }

    #[test]
    fn latencies_beyond_the_range_saturate_instead_of_failing() {
        let mut h = LatencyHistogram::default();
        h.record(Duration::from_secs(3600));
        h.record(Duration::ZERO);
        assert_eq!(h.count(), 2);
        assert!(h.max() >= Duration::from_secs(59));
    }

    #[test]
    fn examples_keep_only_the_first_few() {
        let example = FailureExample {
            user: 1,
            state: "s".into(),
            kind: FailureKind::Check,
            request: "GET /".into(),
            status: Some(500),
            detail: String::new(),
            response: String::new(),
        };
        let mut a = Results {
            failure_examples: vec![example.clone(); KEEP_EXAMPLES - 1],
            ..Results::default()
        };
        let b = Results {
            failure_examples: vec![example; 5],
            ..Results::default()
        };
        a.merge(&b);
        assert_eq!(a.failure_examples.len(), KEEP_EXAMPLES);
    }
}
