//! Endpoint weights from load samples: the pure core of the `cpuWeighted` algorithm.
//!
//! [`compute`] is "samples in, weights out": it takes what the controller remembered
//! from the last interval ([`WeightState`]), the endpoints it sees now with their
//! newest samples ([`Observation`]), the current time and the policy's [`Weighting`],
//! and returns the weights to publish, the status of every endpoint, the state to
//! remember, and the transitions (throttled, ejected, restored) that become Kubernetes
//! Events. It reads no clock and does no I/O; the controller wraps it.
//!
//! # The formula
//!
//! gRFC A58 (gRPC `weighted_round_robin`, Envoy `client_side_weighted_round_robin`):
//!
//! ```text
//! weight = qps / (utilization + errorRate × errorPenalty)
//! ```
//!
//! `qps / utilization` is requests per second per unit of CPU: an estimate of the
//! endpoint's *capacity*. It does not depend on how much traffic the endpoint gets,
//! because doubling its traffic doubles both numerator and denominator. That is what
//! makes the form self-correcting: whatever the current split, the next weights are
//! proportional to capacity, and the fixed point is equal utilization everywhere.
//!
//! When the metrics source knows no qps (metrics-server and the default Prometheus
//! query report CPU only), the numerator is the endpoint's *share of the traffic*
//! while the sample was taken, which the controller knows because it published the
//! weights the sidecars split by: `share / utilization` is the same capacity
//! estimate up to a factor common to all endpoints. This is the "`1/utilization`"
//! headroom form with the memory it needs. Without that memory both textbook
//! fallbacks fail in a closed loop: headroom `1 − u` settles between equal shares and
//! capacity shares, with unequal utilization; a memoryless `1/u` maps a split `s`
//! to one proportional to `capacity / s`, a gain of −1 on the split, so it flips
//! between two splits for ever. The share is averaged over the sample's own window
//! ([`Sample::window`]), so a `rate(…[1m])` sample is divided by the split of that
//! minute, not by the split of the last ten seconds; mismatching the two puts a
//! delay inside the loop and it rings (the simulation shows both).
//!
//! # Why it is stable for every `smoothing`
//!
//! The EWMA smooths the capacity estimate, not the utilization the estimate is made
//! from. Utilization moves when the weights move; `w ← w / EWMA(u)` is an integrator
//! behind a lag, whose poles are complex (|q| = √(1 − smoothing)): it overshoots and
//! rings, slowest for small smoothing. The capacity estimate does not move when the
//! weights move, so smoothing it only delays a monotone approach to a new capacity:
//! the error shrinks by `(1 − smoothing)` per interval and never changes sign. Only
//! rises are smoothed: a fall is believed at once ([`follow_capacity`]), so an
//! endpoint that lost capacity sheds its traffic in an interval, not in 1/smoothing
//! of them, and the approach stays monotone. This
//! is the question the mixture-of-experts auxiliary load-balancing loss
//! (`n × Σ fᵢ·pᵢ`, see [`balance_score`]) poses for a router: a correction computed
//! from the load it causes itself oscillates unless its loop gain is bounded; here
//! the gain on the current split is zero by construction. `maxStepChange` bounds how
//! far one interval (or one bad sample) can move a weight. The closed-loop test
//! `operator/tests/weights_simulation.rs` checks convergence, re-convergence after a
//! capacity change and the absence of oscillation for every smoothing.
//!
//! # Overload
//!
//! The smoothed utilization is kept too: the status reports it, and `maxLoad` /
//! `criticalLoad` are compared with it, so that one noisy sample cannot eject an
//! endpoint. Above maxLoad the weight is multiplied by `maxLoad / utilization`
//! (Throttled). Above criticalLoad the endpoint is Ejected (weight 0) until it is
//! back below maxLoad, with two refinements the simulation asked for:
//!
//! - An endpoint is only ejected if the rest of the fleet can take its traffic and
//!   stay under maxLoad; otherwise it stays Throttled and the result says
//!   [`Fleet::OutOfCapacity`]. Ejecting it anyway moves the overload to the next
//!   endpoint, which is ejected in turn, and the fleet flips between all traffic on
//!   one group and all on the other.
//! - While Ejected, utilization is followed unsmoothed (its history describes load
//!   it no longer has), and the capacity estimate is reset to the latest
//!   measurement; it comes back at minWeight and grows by maxStepChange per interval.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use trimtab_api::balancer_policy::{EndpointState, EndpointStatus, Weighting, follow_capacity};

/// Below this utilization (plus error penalty) a sample says nothing about capacity:
/// an idle endpoint's `qps / utilization` is noise over noise. gRFC A58 ignores a
/// report with zero utilization the same way.
pub const MIN_UTILIZATION: f64 = 0.01;

/// One measurement of one endpoint, as a metrics source reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// CPU usage ÷ CPU requests; may exceed 1 when the pod has no CPU limit.
    pub utilization: f64,
    /// Requests per second the endpoint served, when the source knows it (ORCA
    /// `rps_fractional`, a Prometheus request-rate query).
    pub qps: Option<f64>,
    /// Fraction of requests that failed, 0–1 (gRFC A58's `eps / qps`), when known.
    pub error_rate: Option<f64>,
    /// When the measurement was taken: the source's timestamp, not when it was fetched.
    pub at: SystemTime,
    /// The span the measurement averages over, ending at `at` (PodMetrics `window`,
    /// the range of a Prometheus `rate()`); `None` for an instantaneous reading.
    pub window: Option<Duration>,
}

impl Sample {
    /// An instantaneous CPU-only sample.
    pub fn cpu(utilization: f64, at: SystemTime) -> Self {
        Self {
            utilization,
            qps: None,
            error_rate: None,
            at,
            window: None,
        }
    }

    /// Checks the numbers a metrics source produced for `address`. Sources should
    /// call this per endpoint and drop a bad sample (marking the policy Degraded), so
    /// that one broken exporter cannot stop the whole policy's weights from updating.
    pub fn check(&self, address: &str) -> Result<(), WeightError> {
        let invalid = |field, value, expected| WeightError::InvalidSample {
            address: address.to_owned(),
            field,
            value,
            expected,
        };
        if !self.utilization.is_finite() || self.utilization < 0.0 {
            return Err(invalid(
                "utilization",
                self.utilization,
                "a finite number >= 0 (CPU usage ÷ requests)",
            ));
        }
        if let Some(qps) = self.qps
            && (!qps.is_finite() || qps < 0.0)
        {
            return Err(invalid("qps", qps, "a finite number >= 0"));
        }
        if let Some(rate) = self.error_rate
            && !(0.0..=1.0).contains(&rate)
        {
            return Err(invalid(
                "errorRate",
                rate,
                "a fraction of requests between 0 and 1",
            ));
        }
        Ok(())
    }
}

/// One endpoint as the controller sees it this interval.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// `ip:port`, the key the state is remembered under.
    pub address: String,
    /// The backing pod, when known; copied to the status and events.
    pub pod: Option<String>,
    /// Ready according to its EndpointSlice. A not-ready endpoint is reported
    /// Unhealthy with weight 0; what was learnt about its load is kept.
    pub ready: bool,
    /// The newest sample the metrics source has for it, if any. The same sample may be
    /// passed again in later intervals; it is only counted once.
    pub sample: Option<Sample>,
}

impl Observation {
    /// A ready endpoint with a sample.
    pub fn new(address: impl Into<String>, sample: Option<Sample>) -> Self {
        Self {
            address: address.into(),
            pod: None,
            ready: true,
            sample,
        }
    }
}

/// What the controller remembers about one endpoint between intervals.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointMemory {
    /// Active, Throttled or Ejected: the load state, kept while the endpoint is not
    /// ready so that ejection hysteresis survives a readiness flap.
    pub load_state: EndpointState,
    /// Smoothed utilization; `None` until the first sample, and after samples expire.
    pub utilization: Option<f64>,
    /// Smoothed error rate (0 when the source reports none).
    pub error_rate: f64,
    /// Smoothed requests per second, when the source reports them.
    pub qps: Option<f64>,
    /// Smoothed capacity estimate, in arbitrary units shared by the endpoints of one
    /// policy; `None` until a sample with traffic behind it has been seen.
    pub capacity: Option<f64>,
    /// The weight last published.
    pub weight: u32,
    /// The time of the newest sample absorbed.
    pub last_sampled: Option<SystemTime>,
    /// The share of traffic each published weight gave this endpoint, from when it
    /// was published: the numerator of the capacity estimate when qps is unknown.
    pub shares: Vec<(SystemTime, f64)>,
}

/// Everything the weight controller carries from one interval to the next, per
/// endpoint address. Start with `WeightState::default()`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WeightState {
    /// Per endpoint, by address.
    pub endpoints: BTreeMap<String, EndpointMemory>,
}

/// The verdict over all endpoints, for the policy's conditions and the sidecars.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fleet {
    /// At least one ready endpoint receives traffic.
    Serving,
    /// Some endpoint is above criticalLoad but was not ejected, because the other
    /// endpoints could not take its traffic and stay under maxLoad. It stays
    /// Throttled, with a weight driven down by its overload: ejecting it would only
    /// overload the next one and cascade (the limit Envoy's `max_ejection_percent`
    /// approximates with a count). This is also what an overloaded fleet gets
    /// instead of every weight 0. The controller reports it as Degraded.
    OutOfCapacity,
    /// Every ready endpoint is Ejected: each was ejected while the others still had
    /// room, and those are gone or not ready now. Weights are 0 as ejection says; the
    /// sidecars' panic threshold decides whether to route to them anyway.
    AllEjected,
    /// There is no ready endpoint at all.
    NoReadyEndpoints,
}

/// The kind of a load-state transition, one Kubernetes Event each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransitionKind {
    /// Went above maxLoad: weight driven down.
    Throttled,
    /// Went above criticalLoad: weight 0 until below maxLoad.
    Ejected,
    /// Back to Active: below maxLoad again, or its samples expired.
    Restored,
}

impl TransitionKind {
    /// The Event reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Throttled => "EndpointThrottled",
            Self::Ejected => "EndpointEjected",
            Self::Restored => "EndpointRestored",
        }
    }
}

/// One endpoint changing load state.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The endpoint's address.
    pub address: String,
    /// Its pod, when known (the Event's related object).
    pub pod: Option<String>,
    /// What happened.
    pub kind: TransitionKind,
    /// A sentence for the Event message, with the numbers that caused it.
    pub message: String,
}

/// The result of one interval.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    /// Every observed endpoint, in the order observed: weight, state and smoothed
    /// utilization, as the status and the sidecar config carry them.
    pub endpoints: Vec<EndpointStatus>,
    /// Transitions this interval, for Events.
    pub transitions: Vec<Transition>,
    /// Whether anything can be served.
    pub fleet: Fleet,
    /// Pass this back as `previous` next interval.
    pub state: WeightState,
}

impl Weights {
    /// The balance score of the published weights against the smoothed utilizations
    /// (see [`balance_score`]); `None` unless every endpoint with a weight has a
    /// utilization and some utilization is above zero.
    pub fn balance_score(&self) -> Option<f64> {
        let serving: Vec<&EndpointStatus> =
            self.endpoints.iter().filter(|e| e.weight > 0).collect();
        let traffic: Vec<f64> = serving.iter().map(|e| f64::from(e.weight)).collect();
        let load: Option<Vec<f64>> = serving.iter().map(|e| e.utilization).collect();
        balance_score(&traffic, &load?).ok()
    }
}

/// Why weights could not be computed: names the endpoint or setting, the value and
/// what was expected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WeightError {
    /// A sample holds a number no metrics source should produce.
    #[error("endpoint {address}: {field} is {value}; expected {expected}")]
    InvalidSample {
        /// The endpoint's address.
        address: String,
        /// `utilization`, `qps` or `errorRate`.
        field: &'static str,
        /// The offending value.
        value: f64,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// A `weighting` setting is out of range (the CRD refuses these; a local file or a
    /// hand-built config may not).
    #[error("weighting.{field} is {value}; expected {expected}")]
    InvalidSetting {
        /// The field, as written in YAML.
        field: &'static str,
        /// The offending value.
        value: f64,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// The same address was observed twice.
    #[error("endpoint {address} is observed twice; expected each address once")]
    DuplicateEndpoint {
        /// The repeated address.
        address: String,
    },
    /// The two share lists of a balance score differ in length.
    #[error(
        "balance score: {traffic} traffic shares but {load} load shares; expected one of each per endpoint"
    )]
    ShareCountMismatch {
        /// Number of traffic shares.
        traffic: usize,
        /// Number of load shares.
        load: usize,
    },
    /// A share is negative or not a number.
    #[error("balance score: {which} share #{index} is {value}; expected a finite number >= 0")]
    InvalidShare {
        /// `traffic` or `load`.
        which: &'static str,
        /// Position in the list.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// All shares of one list are zero (or the list is empty): there is nothing to
    /// compare.
    #[error("balance score: the {which} shares sum to zero; expected some traffic and some load")]
    NoShares {
        /// `traffic` or `load`.
        which: &'static str,
    },
}

/// How the load of the fleet is spread, relative to the traffic it is sent:
/// `n × Σ fᵢ·pᵢ`, where fᵢ is endpoint i's share of the traffic and pᵢ its share of
/// the load (utilization). This is the mixture-of-experts auxiliary load-balancing
/// loss (Switch Transformer, Fedus et al. 2021) applied to endpoints.
///
/// It is 1.0 when the load is even (every pᵢ = 1/n), whatever the traffic split: the
/// goal of `cpuWeighted`, which sends more traffic to bigger endpoints precisely so
/// that their utilization matches the others'. Above 1, traffic goes where load is
/// already high (at most n, everything on one endpoint); below 1, the traffic
/// favours the less loaded endpoints, as it does while a controller is correcting an
/// imbalance. The range is 0..=n. Both lists are normalized here, so raw weights and
/// utilizations can be passed as they are.
pub fn balance_score(traffic: &[f64], load: &[f64]) -> Result<f64, WeightError> {
    if traffic.len() != load.len() {
        return Err(WeightError::ShareCountMismatch {
            traffic: traffic.len(),
            load: load.len(),
        });
    }
    let total = |which, values: &[f64]| -> Result<f64, WeightError> {
        if let Some((index, &value)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite() || **v < 0.0)
        {
            return Err(WeightError::InvalidShare {
                which,
                index,
                value,
            });
        }
        let sum: f64 = values.iter().sum();
        if sum > 0.0 {
            Ok(sum)
        } else {
            Err(WeightError::NoShares { which })
        }
    };
    let traffic_total = total("traffic", traffic)?;
    let load_total = total("load", load)?;
    let n = traffic.len() as f64;
    let dot: f64 = traffic
        .iter()
        .zip(load)
        .map(|(f, p)| (f / traffic_total) * (p / load_total))
        .sum();
    Ok(n * dot)
}

/// Computes one interval's weights. See the module documentation for the formula and
/// why it converges; in order:
///
/// 1. Each new sample (newer than the last one absorbed, younger than
///    `sampleExpiry`) updates the endpoint's smoothed utilization and error rate, and
///    its capacity estimate `qps / (utilization + errorRate × errorPenalty)` (gRFC
///    A58; the traffic share stands in for qps unless every new sample has qps).
///    A sample less than an interval after the last one counts for its share of an
///    interval, in the averages and in `maxStepChange`: how often samples arrive
///    does not change how fast weights move.
/// 2. The smoothed utilization sets the load state: above `criticalLoad` Ejected,
///    which lasts until it falls below `maxLoad`, if the others can take its traffic
///    under maxLoad; above `maxLoad` (or not ejectable) Throttled.
/// 3. Weights are capacity scaled so the largest is `maxWeight`, multiplied by
///    `maxLoad / utilization` when Throttled, bounded to `minWeight..=maxWeight`, and
///    moved at most `maxStepChange` (relative, and at least 1) from the last weight.
///    An endpoint coming back from weight 0 starts at `minWeight` (slow start).
/// 4. An endpoint without a new sample keeps its last weight until its newest sample
///    is older than `sampleExpiry`; then, like a new endpoint whose capacity is not
///    known yet (gRFC A58's blackout), it gets the mean weight of the others, or
///    `maxWeight` when there are none — equal weights, round robin. Missing metrics
///    never take traffic away from an endpoint.
///
/// Returns an error, and changes nothing, when a setting is out of range, an address
/// is observed twice or a sample holds an impossible number ([`Sample::check`]).
pub fn compute(
    previous: &WeightState,
    observations: &[Observation],
    now: SystemTime,
    settings: &Weighting,
) -> Result<Weights, WeightError> {
    check_settings(settings)?;
    let mut seen = BTreeSet::new();
    for observation in observations {
        if !seen.insert(observation.address.as_str()) {
            return Err(WeightError::DuplicateEndpoint {
                address: observation.address.clone(),
            });
        }
        if let Some(sample) = &observation.sample {
            sample.check(&observation.address)?;
        }
    }

    let expiry = settings.sample_expiry.get();
    let interval = settings.interval.get();
    let age = |t: SystemTime| now.duration_since(t).unwrap_or(Duration::ZERO);

    // 1. Absorb new samples.
    let mut work: Vec<Work<'_>> = observations
        .iter()
        .map(|observation| {
            let prior = previous.endpoints.get(&observation.address);
            let new_sample = observation.sample.filter(|s| {
                age(s.at) <= expiry && prior.and_then(|p| p.last_sampled).is_none_or(|t| s.at > t)
            });
            Work {
                observation,
                prior,
                memory: prior.cloned().unwrap_or_default(),
                new_sample,
                span: 1.0,
                raw_capacity: None,
                expired: false,
            }
        })
        .collect();

    let qps_known = work
        .iter()
        .filter_map(|w| w.new_sample)
        .all(|s| s.qps.is_some());
    for w in &mut work {
        let Some(sample) = w.new_sample else { continue };
        w.span = span(w.memory.last_sampled, sample.at, interval);
        let alpha = smoothing_over(settings.smoothing, w.span);
        let error_rate = sample.error_rate.unwrap_or(0.0);
        let load = sample.utilization + error_rate * settings.error_penalty;
        let traffic = if qps_known {
            sample.qps.unwrap_or(0.0)
        } else {
            let from = sample.window.map_or(sample.at, |d| {
                sample.at.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH)
            });
            mean_share(&w.memory.shares, from, sample.at).unwrap_or(0.0)
        };
        if traffic > 0.0 && load >= MIN_UTILIZATION {
            w.raw_capacity = Some(traffic / load);
        }
        let m = &mut w.memory;
        m.utilization = if m.load_state == EndpointState::Ejected {
            // Ejection took the endpoint's traffic away: its history describes load it
            // no longer has. Following the samples as they are lets it come back as
            // soon as it is below maxLoad (at minWeight, then ramping), instead of
            // after the EWMA forgets, which takes ~1/smoothing intervals.
            Some(sample.utilization)
        } else {
            Some(ewma(m.utilization, sample.utilization, alpha))
        };
        m.error_rate = ewma(Some(m.error_rate), error_rate, alpha);
        m.qps = sample.qps.map(|q| ewma(m.qps, q, alpha));
        m.last_sampled = Some(sample.at);
    }

    // Capacity estimates are relative: bring this interval's raw estimates (qps or
    // traffic-share units) to the scale of the remembered ones, so that switching
    // between the two, or the traffic total changing, does not move any weight.
    let (remembered, fresh) = work
        .iter()
        .filter_map(|w| Some((w.memory.capacity?, w.raw_capacity?)))
        .fold((0.0, 0.0), |(a, b), (c, r)| (a + c, b + r));
    let scale = if fresh > 0.0 {
        remembered / fresh
    } else {
        let (count, sum) = work
            .iter()
            .filter_map(|w| w.raw_capacity)
            .fold((0.0, 0.0), |(n, s), r| (n + 1.0, s + r));
        if sum > 0.0 { count / sum } else { 1.0 }
    };
    for w in &mut work {
        if let Some(raw) = w.raw_capacity.as_mut() {
            *raw *= scale;
            let alpha = smoothing_over(settings.smoothing, w.span);
            w.memory.capacity = Some(follow_capacity(w.memory.capacity, *raw, alpha));
        }
    }

    // 2. Expiry and load state.
    for w in &mut work {
        w.expired = w.memory.last_sampled.is_none_or(|t| age(t) > expiry);
        let m = &mut w.memory;
        if w.expired {
            let shares = std::mem::take(&mut m.shares);
            *m = EndpointMemory {
                weight: m.weight,
                shares,
                ..EndpointMemory::default()
            };
        } else if let Some(u) = m.utilization {
            m.load_state = next_load_state(m.load_state, u, settings);
        }
    }
    let out_of_capacity = guard_ejections(&mut work, settings);
    for w in &mut work {
        let before = w.prior.map_or(EndpointState::Active, |p| p.load_state);
        if w.memory.load_state == EndpointState::Ejected
            && before != EndpointState::Ejected
            && let Some(latest) = w.raw_capacity
        {
            // An ejected endpoint gets no traffic, so its estimate cannot improve
            // until it is back. Overload says the smoothed estimate was too high:
            // keep the latest measurement instead, so that it does not come back
            // at a weight that overloads it again.
            w.memory.capacity = Some(latest);
        }
    }

    // 3. Weights of endpoints with a known capacity.
    let largest = work
        .iter()
        .filter(|w| w.observation.ready && !w.expired)
        .filter(|w| w.memory.load_state != EndpointState::Ejected)
        .filter_map(|w| w.memory.capacity)
        .fold(0.0_f64, f64::max);
    let min_weight = f64::from(settings.min_weight);
    let max_weight = f64::from(settings.max_weight);
    let mut plans: Vec<Plan> = work
        .iter()
        .map(|w| {
            let m = &w.memory;
            let had_weight = w.prior.map_or(0, |p| p.weight);
            if !w.observation.ready {
                Plan::Fixed(0)
            } else if w.expired {
                Plan::Mean
            } else if m.load_state == EndpointState::Ejected {
                Plan::Fixed(0)
            } else if w.prior.is_none() {
                // gRFC A58's blackout: a new endpoint's first sample is not trusted.
                Plan::Mean
            } else if w.new_sample.is_none() && had_weight > 0 {
                Plan::Fixed(had_weight)
            } else if let (Some(capacity), true) = (m.capacity, largest > 0.0) {
                let mut target = capacity / largest * max_weight;
                if m.load_state == EndpointState::Throttled
                    && let Some(u) = m.utilization
                {
                    // Proportional to the overload, recomputed every interval, so it
                    // lets go as soon as the endpoint is back under maxLoad.
                    target *= settings.max_load / u;
                }
                Plan::Fixed(limit_step(target, had_weight, w.span, settings))
            } else if had_weight > 0 {
                Plan::Fixed(had_weight)
            } else {
                Plan::Mean
            }
        })
        .collect();

    // 4. Everyone else gets the mean of the measured weights.
    let (count, sum) = plans
        .iter()
        .zip(&work)
        .filter_map(|(p, w)| match p {
            Plan::Fixed(weight) if *weight > 0 && w.observation.ready => Some(*weight),
            _ => None,
        })
        .fold((0u64, 0u64), |(n, s), weight| {
            (n + 1, s + u64::from(weight))
        });
    let mean = if count > 0 {
        // The mean of values in minWeight..=maxWeight stays in that range.
        (sum as f64 / count as f64)
            .round()
            .clamp(min_weight, max_weight) as u32
    } else {
        settings.max_weight
    };
    for plan in &mut plans {
        if matches!(plan, Plan::Mean) {
            *plan = Plan::Fixed(mean);
        }
    }

    // Publish: statuses, transitions, shares, new memory.
    let weights: Vec<u32> = plans
        .iter()
        .map(|p| match p {
            Plan::Fixed(w) => *w,
            Plan::Mean => mean,
        })
        .collect();
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let keep_shares_after = now.checked_sub(expiry.saturating_mul(2));
    let mut endpoints = Vec::with_capacity(work.len());
    let mut transitions = Vec::new();
    let mut state = WeightState::default();
    for (w, &weight) in work.into_iter().zip(&weights) {
        let Work {
            observation,
            prior,
            mut memory,
            expired,
            ..
        } = w;
        let before = prior.map_or(EndpointState::Active, |p| p.load_state);
        if observation.ready
            && let Some(kind) = transition_kind(before, memory.load_state)
        {
            transitions.push(Transition {
                address: observation.address.clone(),
                pod: observation.pod.clone(),
                kind,
                message: transition_message(kind, memory.utilization, expired, weight, settings),
            });
        }
        let share = if total > 0 {
            f64::from(weight) / total as f64
        } else {
            0.0
        };
        memory.weight = weight;
        memory.shares.push((now, share));
        prune_shares(&mut memory.shares, keep_shares_after);
        endpoints.push(EndpointStatus {
            pod: observation.pod.clone(),
            address: observation.address.clone(),
            utilization: memory.utilization,
            weight,
            state: if observation.ready {
                memory.load_state
            } else {
                EndpointState::Unhealthy
            },
        });
        state.endpoints.insert(observation.address.clone(), memory);
    }

    let ready: Vec<&EndpointStatus> = endpoints
        .iter()
        .filter(|e| e.state != EndpointState::Unhealthy)
        .collect();
    let fleet = if ready.is_empty() {
        Fleet::NoReadyEndpoints
    } else if ready.iter().all(|e| e.state == EndpointState::Ejected) {
        Fleet::AllEjected
    } else if out_of_capacity {
        Fleet::OutOfCapacity
    } else {
        Fleet::Serving
    };

    Ok(Weights {
        endpoints,
        transitions,
        fleet,
        state,
    })
}

/// Per-endpoint scratch space of [`compute`].
struct Work<'a> {
    observation: &'a Observation,
    prior: Option<&'a EndpointMemory>,
    memory: EndpointMemory,
    new_sample: Option<Sample>,
    /// How much of an interval the new sample adds, see [`span`].
    span: f64,
    raw_capacity: Option<f64>,
    expired: bool,
}

/// How an endpoint's weight is decided.
enum Plan {
    Fixed(u32),
    Mean,
}

/// How many intervals a sample taken at `at` adds to the one absorbed at `last`, at
/// most 1: samples can arrive more often than once per interval (every sidecar posts
/// its load reports at its own phase, and a load step triggers a reconcile at once),
/// and each may only move the averages and the weights by its share of an interval.
/// A first sample, or one an interval or more after the last, counts as one.
fn span(last: Option<SystemTime>, at: SystemTime, interval: Duration) -> f64 {
    match last.and_then(|last| at.duration_since(last).ok()) {
        Some(gap) if !interval.is_zero() => (gap.as_secs_f64() / interval.as_secs_f64()).min(1.0),
        _ => 1.0,
    }
}

/// The EWMA factor for a sample that adds `span` of an interval: `smoothing` per
/// interval, compounded, so that two samples half an interval apart move the average
/// exactly as far as one sample per interval would.
fn smoothing_over(smoothing: f64, span: f64) -> f64 {
    1.0 - (1.0 - smoothing).powf(span)
}

/// Exponentially weighted moving average: the first sample is taken as it is.
fn ewma(previous: Option<f64>, sample: f64, alpha: f64) -> f64 {
    previous.map_or(sample, |p| p + alpha * (sample - p))
}

/// The load state after seeing smoothed utilization `u`. Ejection has hysteresis: it
/// starts above criticalLoad and ends only below maxLoad, so an endpoint whose load
/// falls because it was ejected is not put straight back at the edge.
fn next_load_state(before: EndpointState, u: f64, settings: &Weighting) -> EndpointState {
    match before {
        EndpointState::Ejected if u >= settings.max_load => EndpointState::Ejected,
        _ if u > settings.critical_load => EndpointState::Ejected,
        _ if u > settings.max_load => EndpointState::Throttled,
        _ => EndpointState::Active,
    }
}

/// Ejects endpoints whose load state became Ejected this interval only while the
/// rest of the serving fleet can take their traffic under maxLoad, hottest first;
/// the others are held at Throttled. Returns whether any ejection was withheld.
///
/// Traffic and capacity are in the controller's relative units: an endpoint serves
/// `capacity × load`, where load is utilization plus the error penalty, so the rest
/// would run at `Σ traffic ÷ Σ remaining capacity`. An endpoint whose capacity is not
/// known yet counts as the mean of the known ones (as A58 gives it the mean weight).
fn guard_ejections(work: &mut [Work<'_>], settings: &Weighting) -> bool {
    let load = |m: &EndpointMemory| {
        m.utilization
            .map(|u| u + m.error_rate * settings.error_penalty)
    };
    let was_ejected = |w: &Work<'_>| {
        w.prior
            .is_some_and(|p| p.load_state == EndpointState::Ejected)
    };
    let serving: Vec<usize> = (0..work.len())
        .filter(|&i| {
            let w = &work[i];
            w.observation.ready && !w.expired && load(&w.memory).is_some() && !was_ejected(w)
        })
        .collect();
    let known: Vec<f64> = serving
        .iter()
        .filter_map(|&i| work[i].memory.capacity)
        .collect();
    let fallback = if known.is_empty() {
        1.0
    } else {
        known.iter().sum::<f64>() / known.len() as f64
    };
    let capacity = |w: &Work<'_>| w.memory.capacity.unwrap_or(fallback);
    let traffic: f64 = serving
        .iter()
        .map(|&i| capacity(&work[i]) * load(&work[i].memory).unwrap_or(0.0))
        .sum();
    let mut remaining: f64 = serving.iter().map(|&i| capacity(&work[i])).sum();
    let mut candidates: Vec<(usize, f64)> = serving
        .iter()
        .filter(|&&i| work[i].memory.load_state == EndpointState::Ejected)
        .map(|&i| (i, load(&work[i].memory).unwrap_or(0.0)))
        .collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut withheld = false;
    for (i, _) in candidates {
        let rest = remaining - capacity(&work[i]);
        if rest > 0.0 && traffic / rest <= settings.max_load {
            remaining = rest;
        } else {
            work[i].memory.load_state = EndpointState::Throttled;
            withheld = true;
        }
    }
    withheld
}

/// `target` bounded to `minWeight..=maxWeight` and to `maxStepChange` from `last`,
/// in proportion to the `span` of an interval the new sample adds. The step is at
/// least 1 either way, or rounding would freeze small weights; an endpoint coming
/// back from 0 starts at minWeight.
fn limit_step(target: f64, last: u32, span: f64, settings: &Weighting) -> u32 {
    let min = f64::from(settings.min_weight);
    let max = f64::from(settings.max_weight);
    let bounded = if last == 0 {
        min
    } else {
        let last = f64::from(last);
        let m = settings.max_step_change * span;
        let low = (last * (1.0 - m)).min(last - 1.0);
        let high = (last * (1.0 + m)).max(last + 1.0);
        // low < high by construction, and target is finite (a ratio of positive
        // finite numbers), so clamp cannot panic.
        target.clamp(low, high)
    };
    // min <= max was checked by check_settings.
    bounded.clamp(min, max).round() as u32
}

/// The time-weighted mean of the published share over `from..=to`, from the history
/// of `(published at, share)`; `None` when nothing was published before `to`.
fn mean_share(history: &[(SystemTime, f64)], from: SystemTime, to: SystemTime) -> Option<f64> {
    let in_effect_at = |t: SystemTime| {
        history
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .map(|(_, share)| *share)
    };
    let first = history.first()?.0;
    let from = from.max(first);
    if to <= from {
        return in_effect_at(to);
    }
    let mut weighted = 0.0;
    let mut cursor = from;
    let mut share = in_effect_at(from)?;
    for &(at, next) in history.iter().filter(|(at, _)| *at > from && *at <= to) {
        weighted += share * at.duration_since(cursor).unwrap_or_default().as_secs_f64();
        cursor = at;
        share = next;
    }
    weighted += share * to.duration_since(cursor).unwrap_or_default().as_secs_f64();
    let span = to.duration_since(from).unwrap_or_default().as_secs_f64();
    Some(weighted / span)
}

/// Drops history older than `cutoff`, keeping the entry in effect at `cutoff`.
fn prune_shares(history: &mut Vec<(SystemTime, f64)>, cutoff: Option<SystemTime>) {
    let Some(cutoff) = cutoff else { return };
    let in_effect = history.iter().rposition(|(at, _)| *at <= cutoff);
    if let Some(index) = in_effect {
        history.drain(..index);
    }
}

fn transition_kind(before: EndpointState, after: EndpointState) -> Option<TransitionKind> {
    use EndpointState::{Active, Ejected, Throttled};
    match (before, after) {
        (b, Throttled) if b != Throttled => Some(TransitionKind::Throttled),
        (b, Ejected) if b != Ejected => Some(TransitionKind::Ejected),
        (Throttled | Ejected, Active) => Some(TransitionKind::Restored),
        _ => None,
    }
}

fn transition_message(
    kind: TransitionKind,
    utilization: Option<f64>,
    expired: bool,
    weight: u32,
    s: &Weighting,
) -> String {
    let u = utilization.unwrap_or(0.0);
    match kind {
        TransitionKind::Throttled => format!(
            "utilization {u:.2} is above maxLoad {:.2}: weight driven down to {weight}",
            s.max_load
        ),
        TransitionKind::Ejected => format!(
            "utilization {u:.2} is above criticalLoad {:.2}: no traffic until it falls below maxLoad {:.2}",
            s.critical_load, s.max_load
        ),
        TransitionKind::Restored if expired => format!(
            "no sample for longer than sampleExpiry {}: back to the mean weight {weight}",
            s.sample_expiry
        ),
        TransitionKind::Restored => format!(
            "utilization {u:.2} is below maxLoad {:.2}: weight {weight}",
            s.max_load
        ),
    }
}

fn check_settings(s: &Weighting) -> Result<(), WeightError> {
    let invalid = |field, value: f64, expected| {
        Err(WeightError::InvalidSetting {
            field,
            value,
            expected,
        })
    };
    if !(s.smoothing > 0.0 && s.smoothing <= 1.0) {
        return invalid("smoothing", s.smoothing, "a factor in (0, 1]");
    }
    if !(s.error_penalty.is_finite() && s.error_penalty >= 0.0) {
        return invalid("errorPenalty", s.error_penalty, "a finite number >= 0");
    }
    if s.min_weight == 0 {
        return invalid("minWeight", 0.0, "at least 1");
    }
    if s.max_weight < s.min_weight {
        return invalid("maxWeight", f64::from(s.max_weight), "at least minWeight");
    }
    if !(s.max_step_change.is_finite() && s.max_step_change > 0.0) {
        return invalid("maxStepChange", s.max_step_change, "a finite number > 0");
    }
    if !(s.max_load.is_finite() && s.max_load > 0.0) {
        return invalid("maxLoad", s.max_load, "a utilization > 0");
    }
    if !(s.critical_load.is_finite() && s.critical_load > s.max_load) {
        return invalid(
            "criticalLoad",
            s.critical_load,
            "a utilization above maxLoad",
        );
    }
    if s.sample_expiry.get().is_zero() {
        return invalid("sampleExpiry", 0.0, "a duration longer than 0s");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn settings() -> Weighting {
        Weighting {
            smoothing: 1.0,
            max_step_change: 10.0,
            ..Weighting::default()
        }
    }

    /// Ready endpoints with `(address, utilization, qps)` sampled at `secs`.
    fn observe(samples: &[(&str, f64, Option<f64>)], secs: u64) -> Vec<Observation> {
        samples
            .iter()
            .map(|&(address, utilization, qps)| {
                let mut sample = Sample::cpu(utilization, at(secs));
                sample.qps = qps;
                Observation::new(address, Some(sample))
            })
            .collect()
    }

    fn run(
        previous: &WeightState,
        samples: &[(&str, f64, Option<f64>)],
        secs: u64,
        s: &Weighting,
    ) -> Weights {
        compute(previous, &observe(samples, secs), at(secs), s).expect("valid input")
    }

    fn weights(w: &Weights) -> Vec<u32> {
        w.endpoints.iter().map(|e| e.weight).collect()
    }

    fn states(w: &Weights) -> Vec<EndpointState> {
        w.endpoints.iter().map(|e| e.state).collect()
    }

    fn kinds(w: &Weights) -> Vec<(&str, TransitionKind)> {
        w.transitions
            .iter()
            .map(|t| (t.address.as_str(), t.kind))
            .collect()
    }

    #[test]
    fn new_endpoints_get_the_mean_weight_until_their_first_sample_is_trusted() {
        let s = settings();
        let w = run(
            &WeightState::default(),
            &[("a:1", 0.2, Some(100.0)), ("b:1", 0.8, Some(100.0))],
            0,
            &s,
        );
        assert_eq!(weights(&w), [100, 100]);
        assert_eq!(w.fleet, Fleet::Serving);
    }

    #[test]
    fn weight_is_qps_over_utilization_as_in_grfc_a58() {
        let s = settings();
        let first = run(
            &WeightState::default(),
            &[("a:1", 0.25, Some(100.0)), ("b:1", 0.5, Some(100.0))],
            0,
            &s,
        );
        // 100/0.25 = 400 and 100/0.5 = 200 requests per second per CPU: 2:1.
        let second = run(
            &first.state,
            &[("a:1", 0.25, Some(100.0)), ("b:1", 0.5, Some(100.0))],
            10,
            &s,
        );
        assert_eq!(weights(&second), [100, 50]);
        assert_eq!(states(&second), [EndpointState::Active; 2]);
    }

    #[test]
    fn errors_count_against_an_endpoint_by_error_penalty() {
        let s = settings();
        let mut observations = observe(&[("a:1", 0.5, Some(100.0)), ("b:1", 0.5, Some(100.0))], 0);
        let first = compute(&WeightState::default(), &observations, at(0), &s).expect("valid");
        for o in &mut observations {
            o.sample = o.sample.map(|mut x| {
                x.at = at(10);
                x
            });
        }
        if let Some(b) = observations[1].sample.as_mut() {
            b.error_rate = Some(0.5);
        }
        let second = compute(&first.state, &observations, at(10), &s).expect("valid");
        // b: 100 / (0.5 + 0.5 × 1.0) is half of a's 100 / 0.5.
        assert_eq!(weights(&second), [100, 50]);
    }

    #[test]
    fn without_qps_the_traffic_share_each_endpoint_had_stands_in_for_it() {
        let s = settings();
        let first = run(
            &WeightState::default(),
            &[("a:1", 0.2, None), ("b:1", 0.4, None)],
            0,
            &s,
        );
        assert_eq!(weights(&first), [100, 100]);
        // Equal shares, b twice as busy: b has half the capacity.
        let second = run(
            &first.state,
            &[("a:1", 0.2, None), ("b:1", 0.4, None)],
            10,
            &s,
        );
        assert_eq!(weights(&second), [100, 50]);
        // With the split 2:1, both endpoints now run at the same utilization: the
        // estimate does not move, the weights stay.
        let third = run(
            &second.state,
            &[("a:1", 0.27, None), ("b:1", 0.27, None)],
            20,
            &s,
        );
        assert_eq!(weights(&third), [100, 50]);
    }

    #[test]
    fn the_share_is_taken_over_the_sample_window() {
        let history = [(at(0), 0.5), (at(10), 0.25)];
        assert_eq!(mean_share(&history, at(0), at(20)), Some(0.375));
        assert_eq!(mean_share(&history, at(15), at(15)), Some(0.25));
        assert_eq!(mean_share(&history, at(5), at(5)), Some(0.5));
        // Before anything was published there is nothing to average.
        assert_eq!(mean_share(&history[1..], at(0), at(5)), None);
    }

    #[test]
    fn a_weight_moves_at_most_max_step_change_per_interval() {
        let s = Weighting {
            max_step_change: 0.5,
            ..settings()
        };
        let samples = [("a:1", 0.1, Some(100.0)), ("b:1", 0.4, Some(100.0))];
        let mut w = run(&WeightState::default(), &samples, 0, &s);
        let mut history = vec![weights(&w)];
        for i in 1..4 {
            w = run(&w.state, &samples, 10 * i, &s);
            history.push(weights(&w));
        }
        assert_eq!(history, [[100, 100], [100, 50], [100, 25], [100, 25]]);
    }

    #[test]
    fn samples_half_an_interval_apart_move_the_average_as_one_per_interval_does() {
        let s = Weighting {
            smoothing: 0.3,
            ..settings()
        };
        let utilization = |w: &Weights| w.endpoints[0].utilization.expect("sampled");
        let first = run(&WeightState::default(), &[("a:1", 0.2, None)], 0, &s);
        let once = run(&first.state, &[("a:1", 0.8, None)], 10, &s);
        let half = run(&first.state, &[("a:1", 0.8, None)], 5, &s);
        let twice = run(&half.state, &[("a:1", 0.8, None)], 10, &s);
        assert!((utilization(&once) - 0.38).abs() < 1e-9);
        assert!(utilization(&half) < utilization(&once));
        assert!((utilization(&twice) - utilization(&once)).abs() < 1e-9);
    }

    #[test]
    fn a_sample_after_part_of_an_interval_moves_a_weight_by_that_part_of_max_step_change() {
        let s = Weighting {
            max_step_change: 0.5,
            ..settings()
        };
        let even = [("a:1", 0.2, Some(100.0)), ("b:1", 0.2, Some(100.0))];
        let busy = [("a:1", 0.2, Some(100.0)), ("b:1", 0.8, Some(100.0))];
        let start = run(&WeightState::default(), &even, 0, &s);
        let settled = run(&start.state, &even, 10, &s);
        assert_eq!(weights(&settled), [100, 100]);
        // A fifth of an interval later: a fifth of the 50% a whole interval allows.
        assert_eq!(weights(&run(&settled.state, &busy, 12, &s))[1], 90);
        assert_eq!(weights(&run(&settled.state, &busy, 20, &s))[1], 50);
    }

    #[test]
    fn small_weights_still_move_by_at_least_one() {
        assert_eq!(
            limit_step(
                5.0,
                1,
                1.0,
                &Weighting {
                    max_step_change: 0.05,
                    ..settings()
                }
            ),
            2
        );
        assert_eq!(
            limit_step(
                1.0,
                3,
                1.0,
                &Weighting {
                    max_step_change: 0.05,
                    ..settings()
                }
            ),
            2
        );
    }

    #[test]
    fn weights_stay_within_min_and_max_weight() {
        let s = Weighting {
            min_weight: 10,
            max_weight: 50,
            ..settings()
        };
        let samples = [("a:1", 0.01, Some(100.0)), ("b:1", 0.7, Some(100.0))];
        let first = run(&WeightState::default(), &samples, 0, &s);
        assert_eq!(weights(&first), [50, 50]);
        let second = run(&first.state, &samples, 10, &s);
        assert_eq!(weights(&second), [50, 10]);
    }

    #[test]
    fn throttles_endpoint_above_max_load_in_proportion_to_the_overload() {
        let s = settings();
        let calm = [("a:1", 0.3, Some(100.0)), ("b:1", 0.3, Some(100.0))];
        let first = run(&WeightState::default(), &calm, 0, &s);
        let second = run(&first.state, &calm, 10, &s);
        assert_eq!(weights(&second), [100, 100]);
        // b slows down: half the capacity (50 qps/CPU against 100) and above maxLoad.
        let hot = [("a:1", 0.45, Some(100.0)), ("b:1", 0.9, Some(100.0))];
        let third = run(&second.state, &hot, 20, &s);
        // 100 × (capacity 1/2) × (maxLoad 0.75 / utilization 0.9) = 41.7.
        assert_eq!(weights(&third), [100, 42]);
        assert_eq!(
            states(&third),
            [EndpointState::Active, EndpointState::Throttled]
        );
        assert_eq!(kinds(&third), [("b:1", TransitionKind::Throttled)]);
        assert!(
            third.transitions[0]
                .message
                .contains("0.90 is above maxLoad 0.75")
        );
        // Back under maxLoad: the throttle lets go, weight by capacity again.
        let cool = [("a:1", 0.45, Some(100.0)), ("b:1", 0.6, Some(80.0))];
        let fourth = run(&third.state, &cool, 30, &s);
        assert_eq!(states(&fourth), [EndpointState::Active; 2]);
        assert_eq!(kinds(&fourth), [("b:1", TransitionKind::Restored)]);
        assert!(fourth.endpoints[1].weight > 42);
    }

    #[test]
    fn ejects_endpoint_above_critical_load_until_it_falls_below_max_load() {
        let s = settings();
        let first = run(
            &WeightState::default(),
            &[("a:1", 0.5, None), ("b:1", 0.5, None)],
            0,
            &s,
        );
        // a has the room to take b's traffic (0.2 + 0.2 < maxLoad).
        let ejected = run(
            &first.state,
            &[("a:1", 0.2, None), ("b:1", 0.97, None)],
            10,
            &s,
        );
        assert_eq!(ejected.endpoints[1].weight, 0);
        assert_eq!(ejected.endpoints[1].state, EndpointState::Ejected);
        assert_eq!(kinds(&ejected), [("b:1", TransitionKind::Ejected)]);
        assert!(
            ejected.transitions[0]
                .message
                .contains("above criticalLoad 0.95")
        );

        // Between maxLoad and criticalLoad: still ejected, and no new event.
        let hysteresis = run(
            &ejected.state,
            &[("a:1", 0.6, None), ("b:1", 0.8, None)],
            20,
            &s,
        );
        assert_eq!(hysteresis.endpoints[1].state, EndpointState::Ejected);
        assert_eq!(hysteresis.endpoints[1].weight, 0);
        assert!(hysteresis.transitions.is_empty());

        // Below maxLoad: restored, starting again from minWeight.
        let restored = run(
            &hysteresis.state,
            &[("a:1", 0.6, None), ("b:1", 0.7, None)],
            30,
            &s,
        );
        assert_eq!(restored.endpoints[1].state, EndpointState::Active);
        assert_eq!(restored.endpoints[1].weight, s.min_weight);
        assert_eq!(kinds(&restored), [("b:1", TransitionKind::Restored)]);
        // …and grows back by maxStepChange per interval.
        let s2 = Weighting {
            max_step_change: 0.5,
            ..s
        };
        let mut w = restored;
        for i in 4..20 {
            w = run(
                &w.state,
                &[("a:1", 0.6, None), ("b:1", 0.01, None)],
                10 * i,
                &s2,
            );
        }
        assert_eq!(w.endpoints[1].weight, 100);
    }

    #[test]
    fn does_not_eject_an_endpoint_the_others_cannot_cover_under_max_load() {
        let s = settings();
        let calm = [("a:1", 0.5, None), ("b:1", 0.5, None)];
        let first = run(&WeightState::default(), &calm, 0, &s);
        // a would run at 0.6 + 0.97 with b's traffic: ejecting b would only move the
        // overload. b is throttled instead, and the fleet is out of capacity.
        let hot = run(
            &first.state,
            &[("a:1", 0.6, None), ("b:1", 0.97, None)],
            10,
            &s,
        );
        assert_eq!(
            states(&hot),
            [EndpointState::Active, EndpointState::Throttled]
        );
        assert_eq!(hot.fleet, Fleet::OutOfCapacity);
        assert!(hot.endpoints[1].weight > 0);
        assert!(hot.endpoints[1].weight < hot.endpoints[0].weight);
        assert_eq!(kinds(&hot), [("b:1", TransitionKind::Throttled)]);
    }

    #[test]
    fn an_overloaded_fleet_is_throttled_and_reported_not_zeroed() {
        let s = settings();
        let hot = [("a:1", 0.99, None), ("b:1", 1.3, None)];
        let first = run(&WeightState::default(), &hot, 0, &s);
        assert_eq!(first.fleet, Fleet::OutOfCapacity);
        assert_eq!(states(&first), [EndpointState::Throttled; 2]);
        assert_eq!(weights(&first), [100, 100]);
        assert_eq!(first.transitions.len(), 2);
    }

    #[test]
    fn says_so_when_every_ready_endpoint_is_ejected() {
        let s = settings();
        let calm = [("a:1", 0.2, None), ("b:1", 0.2, None)];
        let first = run(&WeightState::default(), &calm, 0, &s);
        let mut observations = observe(&[("a:1", 0.99, None), ("b:1", 0.2, None)], 10);
        let ejected = compute(&first.state, &observations, at(10), &s).expect("valid");
        assert_eq!(ejected.endpoints[0].state, EndpointState::Ejected);
        assert_eq!(ejected.fleet, Fleet::Serving);
        // b goes away (not ready); a, still hot, is all there is.
        observations[1].ready = false;
        let alone = compute(&ejected.state, &observations, at(10), &s).expect("valid");
        assert_eq!(alone.fleet, Fleet::AllEjected);
        assert_eq!(weights(&alone), [0, 0]);
    }

    #[test]
    fn stale_samples_keep_the_last_weight_until_expiry() {
        let s = settings(); // sampleExpiry 60s
        let samples = [
            ("a:1", 0.1, Some(100.0)),
            ("b:1", 0.2, Some(100.0)),
            ("c:1", 0.4, Some(100.0)),
        ];
        let first = run(&WeightState::default(), &samples, 0, &s);
        let second = run(&first.state, &samples, 10, &s);
        assert_eq!(weights(&second), [100, 50, 25]);

        // c's metrics stop arriving: the source keeps handing over its last sample.
        let mut w = second;
        for secs in [20, 40, 70] {
            let mut observations = observe(&samples[..2], secs);
            observations.push(Observation::new("c:1", Some(Sample::cpu(0.4, at(10)))));
            w = compute(&w.state, &observations, at(secs), &s).expect("valid");
            assert_eq!(weights(&w), [100, 50, 25], "at {secs}s");
        }
        // 61s after c's last sample: the mean of the fresh endpoints, never zero.
        let mut observations = observe(&samples[..2], 71);
        observations.push(Observation::new("c:1", None));
        let expired = compute(&w.state, &observations, at(71), &s).expect("valid");
        assert_eq!(weights(&expired), [100, 50, 75]);
        assert_eq!(expired.endpoints[2].state, EndpointState::Active);
        assert_eq!(expired.endpoints[2].utilization, None);
    }

    #[test]
    fn missing_metrics_for_the_whole_fleet_fall_back_to_equal_weights() {
        let s = settings();
        let samples = [("a:1", 0.1, Some(100.0)), ("b:1", 0.4, Some(100.0))];
        let first = run(&WeightState::default(), &samples, 0, &s);
        let second = run(&first.state, &samples, 10, &s);
        assert_eq!(weights(&second), [100, 25]);
        let blind = [Observation::new("a:1", None), Observation::new("b:1", None)];
        let kept = compute(&second.state, &blind, at(60), &s).expect("valid");
        assert_eq!(weights(&kept), [100, 25]);
        let expired = compute(&kept.state, &blind, at(80), &s).expect("valid");
        assert_eq!(weights(&expired), [100, 100]);
        assert_eq!(expired.fleet, Fleet::Serving);
    }

    #[test]
    fn ejected_endpoint_whose_samples_expire_is_restored_to_the_mean() {
        let s = settings();
        let samples = [("a:1", 0.1, None), ("b:1", 0.99, None), ("c:1", 0.1, None)];
        let first = run(&WeightState::default(), &samples, 0, &s);
        assert_eq!(first.endpoints[1].state, EndpointState::Ejected);
        let observations = [
            Observation::new("a:1", Some(Sample::cpu(0.3, at(70)))),
            Observation::new("b:1", None),
            Observation::new("c:1", Some(Sample::cpu(0.3, at(70)))),
        ];
        let expired = compute(&first.state, &observations, at(70), &s).expect("valid");
        assert_eq!(expired.endpoints[1].state, EndpointState::Active);
        assert_eq!(weights(&expired), [100, 100, 100]);
        assert_eq!(kinds(&expired), [("b:1", TransitionKind::Restored)]);
        assert!(expired.transitions[0].message.contains("sampleExpiry 1m"));
    }

    #[test]
    fn a_sample_seen_twice_is_counted_once() {
        let s = Weighting {
            smoothing: 0.5,
            ..settings()
        };
        let first = run(&WeightState::default(), &[("a:1", 0.2, None)], 0, &s);
        let second = run(&first.state, &[("a:1", 0.6, None)], 10, &s);
        assert_eq!(second.endpoints[0].utilization, Some(0.4));
        let observations = observe(&[("a:1", 0.6, None)], 10);
        let again = compute(&second.state, &observations, at(20), &s).expect("valid");
        assert_eq!(again.endpoints[0].utilization, Some(0.4));
    }

    #[test]
    fn not_ready_endpoint_is_unhealthy_with_weight_zero() {
        let s = settings();
        let mut observations = observe(&[("a:1", 0.3, None), ("b:1", 0.3, None)], 0);
        observations[1].ready = false;
        let w = compute(&WeightState::default(), &observations, at(0), &s).expect("valid");
        assert_eq!(
            states(&w),
            [EndpointState::Active, EndpointState::Unhealthy]
        );
        assert_eq!(weights(&w), [100, 0]);
        observations[0].ready = false;
        let none = compute(&w.state, &observations, at(10), &s).expect("valid");
        assert_eq!(none.fleet, Fleet::NoReadyEndpoints);
    }

    #[test]
    fn endpoints_that_left_are_forgotten() {
        let s = settings();
        let first = run(
            &WeightState::default(),
            &[("a:1", 0.3, None), ("b:1", 0.3, None)],
            0,
            &s,
        );
        let second = run(&first.state, &[("a:1", 0.3, None)], 10, &s);
        assert_eq!(second.state.endpoints.keys().collect::<Vec<_>>(), ["a:1"]);
    }

    #[test]
    fn refuses_nan_or_negative_utilization_naming_the_endpoint() {
        let s = settings();
        for bad in [f64::NAN, -0.1, f64::INFINITY] {
            let observations = observe(&[("10.0.0.7:8080", bad, None)], 0);
            let err = compute(&WeightState::default(), &observations, at(0), &s)
                .expect_err("invalid utilization");
            let message = err.to_string();
            assert!(
                message.starts_with("endpoint 10.0.0.7:8080: utilization is"),
                "{message}"
            );
            assert!(message.contains(&bad.to_string()), "{message}");
        }
        let mut sample = Sample::cpu(0.5, at(0));
        sample.error_rate = Some(1.5);
        assert_eq!(
            sample.check("a:1").map_err(|e| e.to_string()),
            Err(
                "endpoint a:1: errorRate is 1.5; expected a fraction of requests between 0 and 1"
                    .into()
            )
        );
    }

    #[test]
    fn refuses_an_endpoint_observed_twice() {
        let observations = observe(&[("a:1", 0.3, None), ("a:1", 0.3, None)], 0);
        assert_eq!(
            compute(&WeightState::default(), &observations, at(0), &settings()),
            Err(WeightError::DuplicateEndpoint {
                address: "a:1".into()
            })
        );
    }

    #[test]
    fn refuses_settings_the_crd_would_refuse() {
        let cases = [
            (
                Weighting {
                    smoothing: 0.0,
                    ..settings()
                },
                "weighting.smoothing is 0",
            ),
            (
                Weighting {
                    smoothing: f64::NAN,
                    ..settings()
                },
                "weighting.smoothing is NaN",
            ),
            (
                Weighting {
                    min_weight: 5,
                    max_weight: 4,
                    ..settings()
                },
                "weighting.maxWeight is 4",
            ),
            (
                Weighting {
                    critical_load: 0.5,
                    ..settings()
                },
                "weighting.criticalLoad is 0.5",
            ),
            (
                Weighting {
                    max_step_change: -1.0,
                    ..settings()
                },
                "weighting.maxStepChange is -1",
            ),
        ];
        for (s, expected) in cases {
            let err = compute(&WeightState::default(), &[], at(0), &s).expect_err(expected);
            assert!(err.to_string().starts_with(expected), "{err}");
        }
    }

    #[test]
    fn balance_score_is_one_when_load_is_even() {
        let score = balance_score(&[1.0, 2.0, 4.0], &[0.7, 0.7, 0.7]).expect("valid");
        assert!((score - 1.0).abs() < 1e-12, "{score}");
    }

    #[test]
    fn balance_score_is_n_when_everything_lands_on_one_endpoint() {
        let score = balance_score(&[0.0, 0.0, 5.0], &[0.0, 0.0, 0.9]).expect("valid");
        assert!((score - 3.0).abs() < 1e-12, "{score}");
    }

    #[test]
    fn balance_score_is_above_one_when_traffic_goes_where_load_is_high() {
        let score = balance_score(&[1.0, 1.0, 1.0], &[1.0, 0.5, 0.25]).expect("valid");
        assert!((score - 1.0).abs() < 1e-12, "equal traffic: {score}");
        let score = balance_score(&[2.0, 1.0, 1.0], &[1.0, 0.5, 0.25]).expect("valid");
        assert!(score > 1.0, "{score}");
    }

    #[test]
    fn balance_score_of_converged_weights_is_one() {
        let s = settings();
        let samples = [("a:1", 0.2, None), ("b:1", 0.4, None)];
        let first = run(&WeightState::default(), &samples, 0, &s);
        let second = run(&first.state, &samples, 10, &s);
        // Split 2:1 from now on: both endpoints at the same utilization.
        let third = run(
            &second.state,
            &[("a:1", 0.27, None), ("b:1", 0.27, None)],
            20,
            &s,
        );
        let score = third.balance_score().expect("weights and utilizations");
        assert!((score - 1.0).abs() < 1e-9, "{score}");
    }

    #[test]
    fn balance_score_refuses_lists_that_do_not_match() {
        assert_eq!(
            balance_score(&[1.0], &[1.0, 2.0]),
            Err(WeightError::ShareCountMismatch {
                traffic: 1,
                load: 2
            })
        );
        assert_eq!(
            balance_score(&[1.0, f64::NAN], &[1.0, 2.0]).map_err(|e| e.to_string()),
            Err("balance score: traffic share #1 is NaN; expected a finite number >= 0".into())
        );
        assert_eq!(
            balance_score(&[1.0], &[0.0]),
            Err(WeightError::NoShares { which: "load" })
        );
    }
}
