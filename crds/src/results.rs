//! What a run measured: HDR histograms per state and overall (corrected for
//! coordinated omission, and raw), and counters. Everything is serializable and merges
//! exactly, so the results of many runner pods combine into the numbers one process
//! would have recorded — percentiles come from merged histograms, never from averaged
//! percentiles.

use std::{collections::BTreeMap, fmt, marker::PhantomData, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use hdrhistogram::{
    Histogram,
    serialization::{Deserializer as HdrDeserializer, Serializer as _, V2Serializer},
};
use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{self, MapAccess, SeqAccess, Visitor},
};

use crate::load_test::{MAX_INVARIANTS, MAX_NAME_CHARS, MAX_STATES, MAX_TRANSITIONS_PER_STATE};

/// Lowest latency tracked: 1 µs.
pub const LOWEST_MICROS: u64 = 1;
/// Highest latency tracked: 60 s (longer ones are recorded as 60 s).
pub const HIGHEST_MICROS: u64 = 60_000_000;
/// Significant decimal digits: 0.1% value resolution.
pub const SIGNIFICANT_DIGITS: u8 = 3;
/// How many failure examples (and invariant violations) a result keeps.
pub const KEEP_EXAMPLES: usize = 20;
/// The longest string in a failure example (`state`, `request`, `detail`, `response`),
/// in bytes: room for a rendered request line of a 4 KiB path template and a check's
/// source with its error, while [`Results::check_limits`] keeps a report's examples
/// from carrying megabytes.
pub const MAX_EXAMPLE_TEXT_BYTES: usize = 8 << 10;

/// The HdrHistogram V2 cookie as hdrhistogram writes it: the V2 base `0x1c849303` with
/// the word-size bits `0x10` (`serialization/mod.rs` of hdrhistogram 7.6).
const V2_COOKIE: u32 = 0x1c84_9313;
/// The cookie of V2 wrapped in zlib (`V2DeflateSerializer`), which hdrhistogram's
/// deserializer also accepts. Refused: inflating is unbounded work for a few bytes sent,
/// and [`LatencyHistogram`] never writes it.
const V2_COMPRESSED_COOKIE: u32 = 0x1c84_9314;
/// The V2 header: cookie, payload length, normalizing index offset and significant
/// digits (u32 each), lowest and highest value (u64 each), integer-to-double ratio (f64),
/// all big-endian.
const V2_HEADER_BYTES: usize = 40;
/// Counters of a histogram with the constant bounds: 2048 sub-buckets for 3 digits,
/// 16 buckets to reach 60 s from 1 µs, so (16 + 1) × 1024 (hdrhistogram's counts length;
/// a test checks it against the library).
const HISTOGRAM_COUNTS: usize = 17 * 1024;
/// The longest V2 payload of such a histogram: every counter a 9-byte varint, the most
/// LEB128-64b9B takes (hdrhistogram's `counts_array_max_encoded_size`).
const MAX_HISTOGRAM_PAYLOAD_BYTES: usize = HISTOGRAM_COUNTS * 9;
/// The longest base64 text of a [`LatencyHistogram`]: a dense 1 µs–60 s, 3-digit
/// histogram at the most bytes per counter (~204 KiB). Longer text is refused before it
/// is decoded.
pub const MAX_HISTOGRAM_BASE64_LEN: usize =
    (V2_HEADER_BYTES + MAX_HISTOGRAM_PAYLOAD_BYTES).div_ceil(3) * 4;

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
        /// Reads the text in place (no copy of a string that may be refused for its
        /// length).
        struct V2Base64;

        impl Visitor<'_> for V2Base64 {
            type Value = LatencyHistogram;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("base64 of an HdrHistogram V2 histogram")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                decode_v2_base64(text)
                    .map(LatencyHistogram)
                    .map_err(E::custom)
            }
        }

        deserializer.deserialize_str(V2Base64)
    }
}

/// Why a histogram's text was refused. Runners send these, so each check comes before
/// the work or memory it guards: the text's length before decoding, the header before
/// hdrhistogram allocates from it, the payload before hdrhistogram walks it.
#[derive(Debug, thiserror::Error, PartialEq)]
enum HistogramError {
    #[error("histogram: {len} characters of base64, at most {max} (a dense histogram)", max = MAX_HISTOGRAM_BASE64_LEN)]
    TooLong { len: usize },
    #[error("histogram: not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error(
        "histogram: {len} bytes, shorter than the {V2_HEADER_BYTES}-byte HdrHistogram V2 header"
    )]
    Truncated { len: usize },
    #[error(
        "histogram: compressed HdrHistogram V2 (cookie {V2_COMPRESSED_COOKIE:#010x}) is not accepted; send uncompressed V2 (cookie {V2_COOKIE:#010x})"
    )]
    Compressed,
    #[error("histogram: cookie {0:#010x} is not HdrHistogram V2 ({V2_COOKIE:#010x})")]
    Cookie(u32),
    #[error("histogram: {field} is {found}, expected {expected}")]
    Bounds {
        field: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("histogram: the header declares {declared} payload bytes, but {present} follow it")]
    PayloadLength { declared: u32, present: usize },
    #[error("histogram: payload byte {at}: {what}")]
    Payload { at: usize, what: &'static str },
    #[error("histogram: not HdrHistogram V2: {0}")]
    Decode(String),
}

/// Decodes base64 of HdrHistogram V2 with exactly our bounds, refusing before
/// allocating what the text only claims (a 4 GiB payload, 5 digits over a huge range).
fn decode_v2_base64(text: &str) -> Result<Histogram<u64>, HistogramError> {
    if text.len() > MAX_HISTOGRAM_BASE64_LEN {
        return Err(HistogramError::TooLong { len: text.len() });
    }
    let bytes = STANDARD.decode(text)?;
    let payload = check_v2_header(&bytes)?;
    check_v2_payload(payload)?;
    HdrDeserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| HistogramError::Decode(e.to_string()))
}

/// Checks the V2 header against our constants and the bytes present; returns the
/// payload.
fn check_v2_header(bytes: &[u8]) -> Result<&[u8], HistogramError> {
    let Some((header, payload)) = bytes.split_first_chunk::<V2_HEADER_BYTES>() else {
        return Err(HistogramError::Truncated { len: bytes.len() });
    };
    // The header's fields at their V2 offsets; the ranges are within the 40-byte array.
    let u32_at = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let u64_at = |at: usize| (u64::from(u32_at(at)) << 32) | u64::from(u32_at(at + 4));
    match u32_at(0) {
        V2_COOKIE => {}
        V2_COMPRESSED_COOKIE => return Err(HistogramError::Compressed),
        other => return Err(HistogramError::Cookie(other)),
    }
    for (field, found, expected) in [
        (
            "significant digits",
            u64::from(u32_at(12)),
            u64::from(SIGNIFICANT_DIGITS),
        ),
        ("lowest discernible value", u64_at(16), LOWEST_MICROS),
        ("highest trackable value", u64_at(24), HIGHEST_MICROS),
    ] {
        if found != expected {
            return Err(HistogramError::Bounds {
                field,
                found,
                expected,
            });
        }
    }
    let declared = u32_at(4);
    if usize::try_from(declared).ok() != Some(payload.len()) {
        return Err(HistogramError::PayloadLength {
            declared,
            present: payload.len(),
        });
    }
    Ok(payload)
}

/// Walks the payload's counts (zigzag LEB128-64b9B: a count, or a negative run of
/// zeros) as hdrhistogram will, and refuses what it would mishandle: a zero run of
/// `i64::MIN`, whose negation in hdrhistogram 7.6 overflows (a panic in debug builds),
/// and counts past the histogram's last counter.
fn check_v2_payload(payload: &[u8]) -> Result<(), HistogramError> {
    let mut at = 0;
    let mut index: usize = 0;
    while at < payload.len() {
        let start = at;
        let mut value: u64 = 0;
        for i in 0..9 {
            let Some(&byte) = payload.get(at) else {
                return Err(HistogramError::Payload {
                    at: start,
                    what: "the last varint is cut short",
                });
            };
            at += 1;
            if i == 8 {
                // The ninth byte carries 8 bits, not 7 (LEB128-64b9B).
                value |= u64::from(byte) << 56;
                break;
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                break;
            }
        }
        let decoded = ((value >> 1) as i64) ^ -((value & 1) as i64);
        let step = if decoded < 0 {
            decoded
                .checked_neg()
                .and_then(|zeros| usize::try_from(zeros).ok())
                .ok_or(HistogramError::Payload {
                    at: start,
                    what: "a run of zeros too long to count",
                })?
        } else {
            1
        };
        index = index
            .checked_add(step)
            .filter(|&i| i <= HISTOGRAM_COUNTS)
            .ok_or(HistogramError::Payload {
                at: start,
                what: "counts run past the histogram's last counter",
            })?;
    }
    Ok(())
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
        let counter = match kind {
            FailureKind::Connect => &mut self.connect,
            FailureKind::Timeout => &mut self.timeout,
            FailureKind::Status => &mut self.status,
            FailureKind::Check => &mut self.check,
            FailureKind::Render => &mut self.render,
            FailureKind::Transport => &mut self.transport,
        };
        *counter = counter.saturating_add(1);
    }

    /// All failures (saturating: the counts come from runners' reports).
    pub fn total(&self) -> u64 {
        [
            self.connect,
            self.timeout,
            self.status,
            self.check,
            self.render,
            self.transport,
        ]
        .into_iter()
        .fold(0, u64::saturating_add)
    }

    /// Adds another's counts, saturating (a report may carry any number).
    pub fn merge(&mut self, other: &Self) {
        add(&mut self.connect, other.connect);
        add(&mut self.timeout, other.timeout);
        add(&mut self.status, other.status);
        add(&mut self.check, other.check);
        add(&mut self.render, other.render);
        add(&mut self.transport, other.transport);
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
    #[serde(deserialize_with = "bounded_transitions")]
    pub transitions: BTreeMap<String, u64>,
    /// Latency of this state's requests.
    pub latency: Latency,
}

impl StateResults {
    /// Adds another's counts, saturating.
    pub fn merge(&mut self, other: &Self) {
        add(&mut self.requests, other.requests);
        self.failures.merge(&other.failures);
        add(&mut self.checks_passed, other.checks_passed);
        add(&mut self.checks_failed, other.checks_failed);
        for (to, n) in &other.transitions {
            add(self.transitions.entry(to.clone()).or_default(), *n);
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

impl FailureExample {
    /// The example with each text cut to [`MAX_EXAMPLE_TEXT_BYTES`] (at a character
    /// boundary, marked with `…`), so that a long rendered path or error cannot get a
    /// whole report refused by [`Results::check_limits`].
    pub fn shortened(mut self) -> Self {
        for text in [
            &mut self.state,
            &mut self.request,
            &mut self.detail,
            &mut self.response,
        ] {
            if text.len() > MAX_EXAMPLE_TEXT_BYTES {
                let mut end = MAX_EXAMPLE_TEXT_BYTES - '…'.len_utf8();
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
                text.push('…');
            }
        }
        self
    }
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
    #[serde(deserialize_with = "bounded_invariant_examples")]
    pub examples: Vec<FailureExample>,
}

impl InvariantResults {
    /// Adds another's counts, saturating, and keeps the first examples.
    pub fn merge(&mut self, other: &Self) {
        add(&mut self.checks, other.checks);
        add(&mut self.violations, other.violations);
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
    #[serde(deserialize_with = "bounded_states")]
    pub states: BTreeMap<String, StateResults>,
    /// Per invariant, by name.
    #[serde(deserialize_with = "bounded_invariants")]
    pub invariants: BTreeMap<String, InvariantResults>,
    /// The first few failed requests.
    #[serde(deserialize_with = "bounded_failure_examples")]
    pub failure_examples: Vec<FailureExample>,
}

impl Results {
    /// Adds `other` into `self`: counters add (saturating: a report may carry any
    /// number), histograms add bucket by bucket, and the examples keep the first
    /// [`KEEP_EXAMPLES`].
    pub fn merge(&mut self, other: &Self) {
        add(&mut self.requests, other.requests);
        self.failures.merge(&other.failures);
        add(&mut self.checks_passed, other.checks_passed);
        add(&mut self.checks_failed, other.checks_failed);
        add(&mut self.sessions_started, other.sessions_started);
        add(&mut self.sessions_completed, other.sessions_completed);
        add(&mut self.dropped_arrivals, other.dropped_arrivals);
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

    /// Invariant violations over all invariants (saturating).
    pub fn violations(&self) -> u64 {
        self.invariants
            .values()
            .map(|i| i.violations)
            .fold(0, u64::saturating_add)
    }

    /// Checks the sizes a runner's report may reach, which every valid scenario's
    /// results are within: at most [`MAX_STATES`] states with at most
    /// [`MAX_TRANSITIONS_PER_STATE`] transitions each, [`MAX_INVARIANTS`] invariants,
    /// [`KEEP_EXAMPLES`] examples per list, names of at most [`MAX_NAME_CHARS`]
    /// characters and example strings of at most [`MAX_EXAMPLE_TEXT_BYTES`] bytes.
    ///
    /// The operator keeps every runner's newest results, and each state holds dense
    /// histograms (~140 KB apiece in memory), so a report is checked before it is kept.
    /// (Deserializing already refuses more entries than these limits, so no report
    /// makes the histograms of thousands of states on its way in; this check adds the
    /// names and strings, and covers results built in code.)
    pub fn check_limits(&self) -> Result<(), LimitError> {
        at_most("results.states", "states", self.states.len(), MAX_STATES)?;
        at_most(
            "results.invariants",
            "invariants",
            self.invariants.len(),
            MAX_INVARIANTS,
        )?;
        check_examples("results.failureExamples", &self.failure_examples)?;
        for (name, state) in &self.states {
            let at = format!("results.states[{}]", preview(name));
            check_name(&at, name)?;
            at_most(
                &format!("{at}.transitions"),
                "transitions",
                state.transitions.len(),
                MAX_TRANSITIONS_PER_STATE,
            )?;
            for to in state.transitions.keys() {
                check_name(&format!("{at}.transitions[{}]", preview(to)), to)?;
            }
        }
        for (name, invariant) in &self.invariants {
            let at = format!("results.invariants[{}]", preview(name));
            check_name(&at, name)?;
            check_examples(&format!("{at}.examples"), &invariant.examples)?;
        }
        Ok(())
    }
}

/// A report's size over [`Results::check_limits`]' bounds; `field` is the path in the
/// report's JSON, e.g. `results.states["login"].transitions`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    /// A map or list has too many entries.
    #[error("{field}: {count} {what}, at most {max}")]
    TooMany {
        /// Where.
        field: String,
        /// What is counted: `states`, `transitions`, `examples`.
        what: &'static str,
        /// How many there are.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A state, transition or invariant name is too long.
    #[error("{field}: a name of {chars} characters, at most {max}", max = MAX_NAME_CHARS)]
    NameTooLong {
        /// Where.
        field: String,
        /// Its length in characters.
        chars: usize,
    },
    /// A failure example's string is too long.
    #[error("{field}: {bytes} bytes, at most {max}", max = MAX_EXAMPLE_TEXT_BYTES)]
    TextTooLong {
        /// Where.
        field: String,
        /// Its length in bytes.
        bytes: usize,
    },
}

fn at_most(field: &str, what: &'static str, count: usize, max: usize) -> Result<(), LimitError> {
    if count > max {
        return Err(LimitError::TooMany {
            field: field.to_owned(),
            what,
            count,
            max,
        });
    }
    Ok(())
}

/// Names are counted in characters, as the API server's `maxLength` counts the
/// scenario's names, so every name a valid scenario has passes.
fn check_name(field: &str, name: &str) -> Result<(), LimitError> {
    let chars = name.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(LimitError::NameTooLong {
            field: field.to_owned(),
            chars,
        });
    }
    Ok(())
}

fn check_examples(field: &str, examples: &[FailureExample]) -> Result<(), LimitError> {
    at_most(field, "examples", examples.len(), KEEP_EXAMPLES)?;
    for (i, example) in examples.iter().enumerate() {
        for (name, text) in [
            ("state", &example.state),
            ("request", &example.request),
            ("detail", &example.detail),
            ("response", &example.response),
        ] {
            if text.len() > MAX_EXAMPLE_TEXT_BYTES {
                return Err(LimitError::TextTooLong {
                    field: format!("{field}[{i}].{name}"),
                    bytes: text.len(),
                });
            }
        }
    }
    Ok(())
}

/// A name as it appears in an error's field path: quoted, and cut short so a
/// megabyte-long name does not land in the operator's log.
fn preview(name: &str) -> String {
    const SHOWN: usize = MAX_NAME_CHARS;
    match name.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}…", &name[..cut]),
        None => format!("{name:?}"),
    }
}

/// Adds a count from a report: saturating, since a crafted `u64::MAX` would otherwise
/// panic (debug) or wrap (release).
fn add(counter: &mut u64, n: u64) {
    *counter = counter.saturating_add(n);
}

fn keep_first(mine: &mut Vec<FailureExample>, theirs: &[FailureExample]) {
    let room = KEEP_EXAMPLES.saturating_sub(mine.len());
    mine.extend(theirs.iter().take(room).cloned());
}

/// `results.states`, refused past [`MAX_STATES`] entries while it is read: each entry
/// holds two dense histograms, so checking after the whole map was built would be too
/// late.
fn bounded_states<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, StateResults>, D::Error> {
    d.deserialize_map(BoundedMap::new("results.states", "states", MAX_STATES))
}

/// `results.invariants`, refused past [`MAX_INVARIANTS`] entries while it is read.
fn bounded_invariants<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, InvariantResults>, D::Error> {
    d.deserialize_map(BoundedMap::new(
        "results.invariants",
        "invariants",
        MAX_INVARIANTS,
    ))
}

/// A state's `transitions`, refused past [`MAX_TRANSITIONS_PER_STATE`] entries.
fn bounded_transitions<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, u64>, D::Error> {
    d.deserialize_map(BoundedMap::new(
        "results.states[].transitions",
        "transitions",
        MAX_TRANSITIONS_PER_STATE,
    ))
}

/// `results.failureExamples`, refused past [`KEEP_EXAMPLES`].
fn bounded_failure_examples<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<FailureExample>, D::Error> {
    d.deserialize_seq(BoundedSeq::new("results.failureExamples", KEEP_EXAMPLES))
}

/// An invariant's `examples`, refused past [`KEEP_EXAMPLES`].
fn bounded_invariant_examples<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<FailureExample>, D::Error> {
    d.deserialize_seq(BoundedSeq::new(
        "results.invariants[].examples",
        KEEP_EXAMPLES,
    ))
}

/// Reads a map of at most `max` entries, failing at the first one more, before its
/// value is read (duplicate keys count: a valid report has none).
struct BoundedMap<V> {
    field: &'static str,
    what: &'static str,
    max: usize,
    value: PhantomData<V>,
}

impl<V> BoundedMap<V> {
    fn new(field: &'static str, what: &'static str, max: usize) -> Self {
        Self {
            field,
            what,
            max,
            value: PhantomData,
        }
    }
}

impl<'de, V: Deserialize<'de>> Visitor<'de> for BoundedMap<V> {
    type Value = BTreeMap<String, V>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a map of at most {} {}", self.max, self.what)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        let mut seen = 0;
        while let Some(key) = map.next_key::<String>()? {
            seen += 1;
            if seen > self.max {
                return Err(de::Error::custom(format!(
                    "{}: more than {} {}",
                    self.field, self.max, self.what
                )));
            }
            out.insert(key, map.next_value()?);
        }
        Ok(out)
    }
}

/// Reads a list of at most `max` examples, failing at the first one more.
struct BoundedSeq<T> {
    field: &'static str,
    max: usize,
    item: PhantomData<T>,
}

impl<T> BoundedSeq<T> {
    fn new(field: &'static str, max: usize) -> Self {
        Self {
            field,
            max,
            item: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedSeq<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of at most {} examples", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element()? {
            if out.len() == self.max {
                return Err(de::Error::custom(format!(
                    "{}: more than {} examples",
                    self.field, self.max
                )));
            }
            out.push(item);
        }
        Ok(out)
    }
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

    /// A V2 header with these fields and `payload` after it.
    fn v2(cookie: u32, declared: u32, digits: u32, low: u64, high: u64, payload: &[u8]) -> String {
        let mut bytes = Vec::new();
        bytes.extend(cookie.to_be_bytes());
        bytes.extend(declared.to_be_bytes());
        bytes.extend(0u32.to_be_bytes());
        bytes.extend(digits.to_be_bytes());
        bytes.extend(low.to_be_bytes());
        bytes.extend(high.to_be_bytes());
        bytes.extend(1.0f64.to_be_bytes());
        bytes.extend(payload);
        STANDARD.encode(bytes)
    }

    /// A header with our bounds and an honest length.
    fn ours(payload: &[u8]) -> String {
        let len = u32::try_from(payload.len()).expect("short payload");
        v2(
            V2_COOKIE,
            len,
            u32::from(SIGNIFICANT_DIGITS),
            LOWEST_MICROS,
            HIGHEST_MICROS,
            payload,
        )
    }

    fn decode_json(text: &str) -> Result<LatencyHistogram, String> {
        serde_json::from_value(serde_json::Value::String(text.to_owned()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_histogram_round_trips_through_its_base64_text() {
        let mut h = LatencyHistogram::default();
        for micros in [1, 830, 1250, 2_100_000, 59_000_000] {
            h.record(Duration::from_micros(micros));
        }
        let json = serde_json::to_value(&h).expect("serializes");
        let back: LatencyHistogram = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, h);
        assert_eq!(back.count(), 5);
    }

    #[test]
    fn the_counts_length_is_what_hdrhistogram_allocates_for_our_bounds() {
        assert_eq!(
            LatencyHistogram::default().0.distinct_values(),
            HISTOGRAM_COUNTS
        );
    }

    #[test]
    fn the_densest_histogram_fits_the_base64_cap_and_round_trips() {
        let mut h = LatencyHistogram::default();
        let mut value = LOWEST_MICROS;
        while value <= HIGHEST_MICROS {
            // 2^62 zigzags to 2^63: the widest, 9-byte varint for every counter.
            h.0.saturating_record_n(value, 1 << 62);
            value = h.0.next_non_equivalent(value);
        }
        let text = serde_json::to_value(&h).expect("serializes");
        let len = text.as_str().expect("a string").len();
        assert!(
            len <= MAX_HISTOGRAM_BASE64_LEN,
            "{len} > {MAX_HISTOGRAM_BASE64_LEN}"
        );
        let back: LatencyHistogram = serde_json::from_value(text).expect("deserializes");
        assert_eq!(back, h);
    }

    #[test]
    fn a_header_claiming_a_4_gib_payload_is_refused_before_allocating_it() {
        let text = v2(
            V2_COOKIE,
            u32::MAX,
            u32::from(SIGNIFICANT_DIGITS),
            LOWEST_MICROS,
            HIGHEST_MICROS,
            &[2],
        );
        let started = std::time::Instant::now();
        assert_eq!(
            decode_v2_base64(&text),
            Err(HistogramError::PayloadLength {
                declared: u32::MAX,
                present: 1
            })
        );
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        let message = decode_json(&text).expect_err("refused");
        assert!(
            message.starts_with(
                "histogram: the header declares 4294967295 payload bytes, but 1 follow it"
            ),
            "{message}"
        );
    }

    #[test]
    fn a_payload_length_other_than_the_bytes_present_is_refused() {
        let short = v2(V2_COOKIE, 3, 3, LOWEST_MICROS, HIGHEST_MICROS, &[2, 2]);
        let long = v2(V2_COOKIE, 1, 3, LOWEST_MICROS, HIGHEST_MICROS, &[2, 2]);
        assert!(matches!(
            decode_v2_base64(&short),
            Err(HistogramError::PayloadLength { .. })
        ));
        assert!(matches!(
            decode_v2_base64(&long),
            Err(HistogramError::PayloadLength { .. })
        ));
    }

    #[test]
    fn bounds_other_than_ours_are_refused_naming_the_field() {
        let cases = [
            (
                5,
                LOWEST_MICROS,
                HIGHEST_MICROS,
                "histogram: significant digits is 5, expected 3",
            ),
            (
                3,
                1000,
                HIGHEST_MICROS,
                "histogram: lowest discernible value is 1000, expected 1",
            ),
            (
                3,
                LOWEST_MICROS,
                u64::MAX / 2,
                "histogram: highest trackable value is 9223372036854775807, expected 60000000",
            ),
        ];
        for (digits, low, high, expected) in cases {
            let text = v2(V2_COOKIE, 1, digits, low, high, &[2]);
            let message = decode_json(&text).expect_err("refused");
            assert!(message.starts_with(expected), "{message}");
        }
    }

    #[test]
    fn compressed_v2_and_unknown_cookies_are_refused() {
        let mut h = LatencyHistogram::default();
        h.record(Duration::from_millis(5));
        let mut bytes = Vec::new();
        hdrhistogram::serialization::V2DeflateSerializer::new()
            .serialize(&h.0, &mut bytes)
            .expect("serializes");
        let message = decode_json(&STANDARD.encode(bytes)).expect_err("refused");
        assert!(
            message.starts_with(
                "histogram: compressed HdrHistogram V2 (cookie 0x1c849314) is not accepted"
            ),
            "{message}"
        );
        let text = v2(0x1c84_9303, 1, 3, LOWEST_MICROS, HIGHEST_MICROS, &[2]);
        assert_eq!(
            decode_v2_base64(&text),
            Err(HistogramError::Cookie(0x1c84_9303))
        );
    }

    #[test]
    fn text_longer_than_any_histogram_is_refused_before_decoding() {
        let text = "A".repeat(MAX_HISTOGRAM_BASE64_LEN + 4);
        assert_eq!(
            decode_v2_base64(&text),
            Err(HistogramError::TooLong { len: text.len() })
        );
        assert!(matches!(
            decode_v2_base64(&STANDARD.encode([0u8; 12])),
            Err(HistogramError::Truncated { len: 12 })
        ));
        assert!(
            decode_json("not base64!")
                .expect_err("refused")
                .starts_with("histogram: not base64")
        );
    }

    #[test]
    fn a_zero_run_of_i64_min_is_refused_instead_of_overflowing_the_decoder() {
        // u64::MAX as LEB128-64b9B zigzags to i64::MIN, which hdrhistogram negates.
        let payload = [0xff; 9];
        assert_eq!(
            decode_v2_base64(&ours(&payload)),
            Err(HistogramError::Payload {
                at: 0,
                what: "a run of zeros too long to count"
            })
        );
    }

    #[test]
    fn counts_past_the_last_counter_and_cut_varints_are_refused() {
        // A run of HISTOGRAM_COUNTS zeros (zigzag 2n - 1), then one count of 1.
        let mut payload = Vec::new();
        let mut zigzag = 2 * HISTOGRAM_COUNTS as u64 - 1;
        while zigzag >= 0x80 {
            payload.push((zigzag as u8 & 0x7f) | 0x80);
            zigzag >>= 7;
        }
        payload.push(zigzag as u8);
        let run = payload.len();
        assert!(
            decode_v2_base64(&ours(&payload)).is_ok(),
            "zeros up to the end are fine"
        );
        payload.push(2);
        assert_eq!(
            decode_v2_base64(&ours(&payload)),
            Err(HistogramError::Payload {
                at: run,
                what: "counts run past the histogram's last counter"
            })
        );
        assert_eq!(
            decode_v2_base64(&ours(&[0x80])),
            Err(HistogramError::Payload {
                at: 0,
                what: "the last varint is cut short"
            })
        );
    }

    #[test]
    fn merging_u64_max_counters_saturates_instead_of_overflowing() {
        let full = FailureCounts {
            connect: u64::MAX,
            timeout: u64::MAX,
            status: u64::MAX,
            check: u64::MAX,
            render: u64::MAX,
            transport: u64::MAX,
        };
        let crafted = Results {
            requests: u64::MAX,
            failures: full.clone(),
            checks_passed: u64::MAX,
            checks_failed: u64::MAX,
            sessions_started: u64::MAX,
            sessions_completed: u64::MAX,
            dropped_arrivals: u64::MAX,
            states: BTreeMap::from([(
                "s".to_owned(),
                StateResults {
                    requests: u64::MAX,
                    failures: full.clone(),
                    checks_passed: u64::MAX,
                    checks_failed: u64::MAX,
                    transitions: BTreeMap::from([("s".to_owned(), u64::MAX)]),
                    latency: Latency::default(),
                },
            )]),
            invariants: BTreeMap::from([
                (
                    "a".to_owned(),
                    InvariantResults {
                        checks: u64::MAX,
                        violations: u64::MAX,
                        examples: vec![],
                    },
                ),
                (
                    "b".to_owned(),
                    InvariantResults {
                        checks: 1,
                        violations: 1,
                        examples: vec![],
                    },
                ),
            ]),
            ..Results::default()
        };
        let mut merged = crafted.clone();
        merged.merge(&crafted);
        merged.failures.add(FailureKind::Check);
        assert_eq!(merged.requests, u64::MAX);
        assert_eq!(merged.failures, full);
        assert_eq!(merged.failures.total(), u64::MAX);
        assert_eq!(merged.states["s"].transitions["s"], u64::MAX);
        assert_eq!(merged.states["s"].requests, u64::MAX);
        assert_eq!(merged.invariants["a"].checks, u64::MAX);
        assert_eq!(merged.violations(), u64::MAX);
    }

    fn example(text: &str) -> FailureExample {
        FailureExample {
            user: 1,
            state: text.into(),
            kind: FailureKind::Check,
            request: text.into(),
            status: Some(500),
            detail: text.into(),
            response: text.into(),
        }
    }

    /// What the largest valid scenario produces: every state (names at the longest),
    /// every transition, every invariant (names of multi-byte characters, which the API
    /// server counts as characters), every example at the longest.
    fn largest_valid() -> Results {
        let name = |i: usize| format!("{i:0>width$}", width = MAX_NAME_CHARS);
        let transitions: BTreeMap<String, u64> = (0..MAX_TRANSITIONS_PER_STATE)
            .map(|i| (name(i), 1))
            .collect();
        let text = "x".repeat(MAX_EXAMPLE_TEXT_BYTES);
        Results {
            states: (0..MAX_STATES)
                .map(|i| {
                    let state = StateResults {
                        transitions: transitions.clone(),
                        ..StateResults::default()
                    };
                    (name(i), state)
                })
                .collect(),
            invariants: (0..MAX_INVARIANTS)
                .map(|i| {
                    let invariant = InvariantResults {
                        examples: vec![example(&text); KEEP_EXAMPLES],
                        ..InvariantResults::default()
                    };
                    (format!("{i:é>width$}", width = MAX_NAME_CHARS), invariant)
                })
                .collect(),
            failure_examples: vec![example(&text); KEEP_EXAMPLES],
            ..Results::default()
        }
    }

    #[test]
    fn the_results_of_the_largest_valid_scenario_are_within_the_limits() {
        let results = largest_valid();
        assert_eq!(results.check_limits(), Ok(()));
        let json = serde_json::to_string(&results).expect("serializes");
        let back: Results = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back.check_limits(), Ok(()));
    }

    #[test]
    fn results_over_the_limits_are_refused_naming_the_field() {
        let mut too_many_states = largest_valid();
        too_many_states
            .states
            .insert("one-more".into(), StateResults::default());
        let mut too_many_invariants = largest_valid();
        too_many_invariants
            .invariants
            .insert("one-more".into(), InvariantResults::default());
        let mut too_many_transitions = largest_valid();
        too_many_transitions
            .states
            .values_mut()
            .last()
            .expect("states")
            .transitions
            .insert("one-more".into(), 1);
        let mut long_state = largest_valid();
        long_state
            .states
            .insert("s".repeat(MAX_NAME_CHARS + 1), StateResults::default());
        long_state.states.pop_first();
        let mut long_target = largest_valid();
        let first = long_target.states.values_mut().next().expect("states");
        first.transitions.pop_first();
        first.transitions.insert("t".repeat(1000), 1);
        let mut long_detail = largest_valid();
        long_detail.failure_examples[3].detail.push('!');
        let mut many_examples = largest_valid();
        many_examples
            .invariants
            .values_mut()
            .next()
            .expect("invariants")
            .examples
            .push(example("e"));

        let name = |c: char| format!("{:?}", c.to_string().repeat(MAX_NAME_CHARS));
        let last_state = format!("{:?}", format!("{:0>63}", MAX_STATES - 1));
        let first_state = format!("{:?}", format!("{:0>63}", 0));
        let first_invariant = format!(
            "{:?}",
            largest_valid()
                .invariants
                .keys()
                .next()
                .expect("invariants")
        );
        let cases = [
            (
                too_many_states,
                "results.states: 65 states, at most 64".to_owned(),
            ),
            (
                too_many_invariants,
                "results.invariants: 33 invariants, at most 32".to_owned(),
            ),
            (
                too_many_transitions,
                format!("results.states[{last_state}].transitions: 17 transitions, at most 16"),
            ),
            (
                long_state,
                format!(
                    "results.states[{}…]: a name of 64 characters, at most 63",
                    name('s')
                ),
            ),
            (
                long_target,
                format!(
                    "results.states[{first_state}].transitions[{}…]: a name of 1000 characters, at most 63",
                    name('t')
                ),
            ),
            (
                long_detail,
                "results.failureExamples[3].detail: 8193 bytes, at most 8192".to_owned(),
            ),
            (
                many_examples,
                format!("results.invariants[{first_invariant}].examples: 21 examples, at most 20"),
            ),
        ];
        for (results, expected) in cases {
            let error = results.check_limits().expect_err(&expected);
            assert_eq!(error.to_string(), expected);
        }
    }

    #[test]
    fn deserializing_refuses_more_entries_than_the_limits_as_it_reads() {
        let mut json = serde_json::to_value(Results::default()).expect("serializes");
        let state = serde_json::to_value(StateResults::default()).expect("serializes");
        json["states"] = (0..=MAX_STATES)
            .map(|i| (format!("s{i}"), state.clone()))
            .collect::<serde_json::Map<_, _>>()
            .into();
        let message = serde_json::from_value::<Results>(json.clone())
            .expect_err("refused")
            .to_string();
        assert!(
            message.starts_with("results.states: more than 64 states"),
            "{message}"
        );

        let mut busy = state.clone();
        busy["transitions"] = (0..=MAX_TRANSITIONS_PER_STATE)
            .map(|i| (format!("s{i}"), serde_json::Value::from(1)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        json["states"] = serde_json::json!({ "s": busy });
        let message = serde_json::from_value::<Results>(json.clone())
            .expect_err("refused")
            .to_string();
        assert!(
            message.starts_with("results.states[].transitions: more than 16 transitions"),
            "{message}"
        );

        json["states"] = serde_json::json!({});
        json["failureExamples"] =
            serde_json::to_value(vec![example("e"); KEEP_EXAMPLES + 1]).expect("serializes");
        let message = serde_json::from_value::<Results>(json)
            .expect_err("refused")
            .to_string();
        assert!(
            message.starts_with("results.failureExamples: more than 20 examples"),
            "{message}"
        );
    }

    #[test]
    fn shortened_examples_pass_the_limits() {
        let long = "é".repeat(MAX_EXAMPLE_TEXT_BYTES);
        let example = example(&long).shortened();
        assert!(example.detail.len() <= MAX_EXAMPLE_TEXT_BYTES);
        assert!(example.detail.ends_with('…'));
        let results = Results {
            failure_examples: vec![example],
            ..Results::default()
        };
        assert_eq!(results.check_limits(), Ok(()));
        assert_eq!(self::example("short").shortened(), self::example("short"));
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
