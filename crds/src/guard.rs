//! The guard's decision, shared by `trimtab-bots` (a local run judges what its own bots
//! see) and the operator (which judges every runner's merged results and the target
//! pods' CPU): `guards.maxLoad` holds the load, `guards.criticalLoad` aborts, as
//! pt-online-schema-change's `--max-load` pauses and `--critical-load` aborts.
//!
//! - Above any `maxLoad` limit the guard **holds**: the ceiling on active users drops
//!   to the last level whose window was under every limit, so the ramp stops and the
//!   users added since park before their next request.
//! - Once every measure is back under [`RESUME_FRACTION`] of its `maxLoad` limit the
//!   guard **resumes** (the gap is the hysteresis that keeps it from flapping).
//! - Above any `criticalLoad` limit it **aborts**: every user stops at once.
//!
//! Everything here is pure: the callers sample, this decides.

use std::{
    collections::VecDeque,
    fmt,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    load_test::{Guards, LoadLimits, MAX_GUARD_WINDOW},
    results::LatencyHistogram,
};

/// Resume once every measure is under this share of its `maxLoad` limit.
pub const RESUME_FRACTION: f64 = 0.8;
/// Fewer requests than this in a window are too few to judge a rate or a p99 by (one
/// failed request out of three is not a 33% error rate).
pub const MIN_REQUESTS: u64 = 20;

/// One set of limits (`maxLoad` or `criticalLoad`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Target pods' CPU utilization, 0–1 (judged only by whoever can read it).
    pub cpu: Option<f64>,
    /// Failed ÷ all requests, 0–1.
    pub error_rate: Option<f64>,
    /// 99th percentile of corrected latency.
    pub p99: Option<Duration>,
}

impl From<&LoadLimits> for Limits {
    fn from(limits: &LoadLimits) -> Self {
        Self {
            cpu: limits.cpu,
            error_rate: limits.error_rate,
            p99: limits.p99.map(|d| d.get()),
        }
    }
}

impl Limits {
    fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.error_rate.is_none() && self.p99.is_none()
    }

    /// The first limit `window` exceeds once each is scaled by `factor`. Error rate and
    /// p99 are judged only over [`MIN_REQUESTS`] requests; CPU whenever it was read.
    fn exceeded(&self, window: &WindowStats, factor: f64) -> Option<Breach> {
        if let (Some(limit), Some(observed)) = (self.cpu, window.cpu)
            && observed > limit * factor
        {
            return Some(Breach::Cpu {
                observed,
                limit: limit * factor,
            });
        }
        if window.requests < MIN_REQUESTS {
            return None;
        }
        let rate = window.error_rate();
        if let Some(limit) = self.error_rate
            && rate > limit * factor
        {
            return Some(Breach::ErrorRate {
                observed: rate,
                limit: limit * factor,
            });
        }
        if let Some(limit) = self.p99 {
            let limit = limit.mul_f64(factor);
            if window.p99 > limit {
                return Some(Breach::P99 {
                    observed: window.p99,
                    limit,
                });
            }
        }
        None
    }
}

/// What was seen over the last window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowStats {
    /// The target pods' CPU utilization, when it was read.
    pub cpu: Option<f64>,
    /// Requests completed (or failed) in the window.
    pub requests: u64,
    /// Of which failed.
    pub failures: u64,
    /// p99 of corrected latency in the window.
    pub p99: Duration,
}

impl WindowStats {
    /// Failed ÷ all, 0 when there were none.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.failures as f64 / self.requests as f64
        }
    }
}

/// The measure over its limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Breach {
    /// Target CPU over its limit.
    Cpu {
        /// Seen in the window.
        observed: f64,
        /// The limit.
        limit: f64,
    },
    /// Error rate over its limit.
    ErrorRate {
        /// Seen in the window.
        observed: f64,
        /// The limit.
        limit: f64,
    },
    /// p99 over its limit.
    P99 {
        /// Seen in the window.
        observed: Duration,
        /// The limit.
        limit: Duration,
    },
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu { observed, limit } => write!(f, "cpu {observed:.2} > {limit:.2}"),
            Self::ErrorRate { observed, limit } => {
                write!(f, "error rate {observed:.3} > {limit:.3}")
            }
            Self::P99 { observed, limit } => write!(f, "p99 {observed:?} > {limit:?}"),
        }
    }
}

/// Where the guard stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GuardState {
    /// Under every limit: the workload runs as planned.
    #[default]
    Running,
    /// Over `maxLoad`: the load is held at a ceiling of active users.
    Holding,
    /// Over `criticalLoad`: every user stopped.
    Aborted,
}

/// A change of state and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Hold the load at this many active users.
    Hold {
        /// The ceiling.
        ceiling: u64,
        /// The `maxLoad` limit exceeded.
        breach: Breach,
    },
    /// Lift the hold.
    Resume,
    /// Stop every user.
    Abort {
        /// The `criticalLoad` limit exceeded.
        breach: Breach,
    },
}

/// The guard's state machine.
#[derive(Debug, Clone)]
pub struct Guard {
    max: Limits,
    critical: Limits,
    state: GuardState,
    /// Active users the last time the window was under every `maxLoad` limit.
    last_good: u64,
}

impl Guard {
    /// The guard for `guards`, or `None` when it has nothing to judge. Without
    /// `judge_cpu` (a local run, which cannot read the target pods' CPU) the `cpu`
    /// limits are left out.
    pub fn new(guards: &Guards, judge_cpu: bool) -> Option<Self> {
        let limits = |limits: &Option<LoadLimits>| {
            let mut limits = limits.as_ref().map(Limits::from).unwrap_or_default();
            if !judge_cpu {
                limits.cpu = None;
            }
            limits
        };
        let (max, critical) = (limits(&guards.max_load), limits(&guards.critical_load));
        (!max.is_empty() || !critical.is_empty()).then_some(Self {
            max,
            critical,
            state: GuardState::Running,
            last_good: 1,
        })
    }

    /// Where the guard stands.
    pub fn state(&self) -> GuardState {
        self.state
    }

    /// Judges the latest window with `active` users running; returns a decision when
    /// the state changes.
    pub fn observe(&mut self, window: &WindowStats, active: u64) -> Option<Decision> {
        if self.state == GuardState::Aborted {
            return None;
        }
        if window.requests < MIN_REQUESTS && window.cpu.is_none() {
            // Too little traffic to judge. While holding, that means the shed load
            // has long left the window: nothing bad is being seen any more.
            if self.state == GuardState::Holding {
                self.state = GuardState::Running;
                return Some(Decision::Resume);
            }
            return None;
        }
        if let Some(breach) = self.critical.exceeded(window, 1.0) {
            self.state = GuardState::Aborted;
            return Some(Decision::Abort { breach });
        }
        match self.state {
            GuardState::Running => match self.max.exceeded(window, 1.0) {
                Some(breach) => {
                    self.state = GuardState::Holding;
                    Some(Decision::Hold {
                        ceiling: self.last_good.min(active).max(1),
                        breach,
                    })
                }
                None => {
                    self.last_good = active.max(1);
                    None
                }
            },
            GuardState::Holding => match self.max.exceeded(window, RESUME_FRACTION) {
                Some(_) => None,
                None => {
                    self.state = GuardState::Running;
                    Some(Decision::Resume)
                }
            },
            GuardState::Aborted => None,
        }
    }
}

/// One change of the guard's state during a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GuardEvent {
    /// Seconds after the start.
    pub at_seconds: f64,
    /// The new state.
    pub state: GuardState,
    /// The ceiling on active users while holding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<u64>,
    /// Why (the limit and what was seen), empty on resume.
    pub reason: String,
}

impl GuardEvent {
    /// The event `decision` makes, `at_seconds` after the start.
    pub fn new(decision: &Decision, at_seconds: f64) -> Self {
        let (state, ceiling, reason) = match decision {
            Decision::Hold { ceiling, breach } => (
                GuardState::Holding,
                Some(*ceiling),
                format!("maxLoad: {breach}"),
            ),
            Decision::Resume => (GuardState::Running, None, String::new()),
            Decision::Abort { breach } => {
                (GuardState::Aborted, None, format!("criticalLoad: {breach}"))
            }
        };
        Self {
            at_seconds,
            state,
            ceiling,
            reason,
        }
    }
}

/// Cumulative counters at one instant; a window is the difference of two.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was taken.
    pub at: Instant,
    /// Requests so far.
    pub requests: u64,
    /// Failed requests so far.
    pub failures: u64,
    /// Every corrected latency so far.
    pub latency: LatencyHistogram,
}

/// The last `span` of samples.
#[derive(Debug)]
pub struct Window {
    span: Duration,
    samples: VecDeque<Sample>,
}

impl Window {
    /// An empty window `span` long, but at most [`MAX_GUARD_WINDOW`]: admission refuses
    /// longer windows, and a test admitted before that rule existed is judged over the
    /// longest allowed window rather than holding a histogram per second of, say, a day.
    pub fn new(span: Duration) -> Self {
        Self {
            span: span.min(MAX_GUARD_WINDOW.get()),
            samples: VecDeque::new(),
        }
    }

    /// The span the window covers (the requested one, capped at [`MAX_GUARD_WINDOW`]).
    pub fn span(&self) -> Duration {
        self.span
    }

    /// How often to sample a window of `span`: ten samples a window, at most one a
    /// second, at least one every 100 ms.
    pub fn tick(span: Duration) -> Duration {
        (span / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// Adds `sample` and returns what happened between it and the window's start
    /// (`cpu` is left for the caller to fill).
    pub fn push(&mut self, sample: Sample) -> WindowStats {
        // The baseline is the newest sample at least a span old, so the window covers
        // the whole span (plus at most a tick) once the run is that old.
        while self
            .samples
            .get(1)
            .is_some_and(|s| sample.at.duration_since(s.at) >= self.span)
        {
            self.samples.pop_front();
        }
        let stats = match self.samples.front() {
            Some(oldest) => {
                let mut latency = sample.latency.0.clone();
                // Counts only grow, so the older histogram is contained in the newer
                // one and subtracting cannot fail; if it did, judge the whole run.
                let p99 = match latency.subtract(&oldest.latency.0) {
                    Ok(()) => Duration::from_micros(latency.value_at_quantile(0.99)),
                    Err(_) => sample.latency.quantile(0.99),
                };
                WindowStats {
                    cpu: None,
                    requests: sample.requests.saturating_sub(oldest.requests),
                    failures: sample.failures.saturating_sub(oldest.failures),
                    p99,
                }
            }
            None => WindowStats {
                cpu: None,
                requests: sample.requests,
                failures: sample.failures,
                p99: sample.latency.quantile(0.99),
            },
        };
        self.samples.push_back(sample);
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guards(yaml: &str) -> Guards {
        serde_yaml_ng::from_str(yaml).expect("guards")
    }

    fn window(requests: u64, failures: u64, p99_ms: u64) -> WindowStats {
        WindowStats {
            cpu: None,
            requests,
            failures,
            p99: Duration::from_millis(p99_ms),
        }
    }

    #[test]
    fn cpu_only_guards_are_judged_only_where_cpu_is_read() {
        let cpu_only = guards("maxLoad: {cpu: 0.8}\ncriticalLoad: {cpu: 0.9}");
        assert!(Guard::new(&cpu_only, false).is_none());
        assert!(Guard::new(&guards("maxLoad: {cpu: 0.8, p99: 2s}"), false).is_some());
        let mut guard = Guard::new(&cpu_only, true).expect("guard");
        // CPU is judged even with no traffic in the window.
        let hot = WindowStats {
            cpu: Some(0.85),
            ..WindowStats::default()
        };
        assert!(matches!(
            guard.observe(&hot, 10),
            Some(Decision::Hold {
                breach: Breach::Cpu { .. },
                ..
            })
        ));
        let critical = WindowStats {
            cpu: Some(0.95),
            ..WindowStats::default()
        };
        assert!(matches!(
            guard.observe(&critical, 10),
            Some(Decision::Abort {
                breach: Breach::Cpu { .. }
            })
        ));
    }

    #[test]
    fn holds_at_the_last_good_level_then_resumes_with_hysteresis() {
        let mut guard =
            Guard::new(&guards("maxLoad: {errorRate: 0.05, p99: 200ms}"), false).expect("guard");
        assert_eq!(guard.observe(&window(100, 1, 50), 100), None);
        assert_eq!(guard.observe(&window(100, 2, 120), 200), None);
        // 300 users push p99 over the limit: back to the 200 that were fine.
        let decision = guard.observe(&window(100, 2, 250), 300);
        assert!(
            matches!(
                decision,
                Some(Decision::Hold {
                    ceiling: 200,
                    breach: Breach::P99 { .. }
                })
            ),
            "{decision:?}"
        );
        // Under the limit but not under 80% of it: still holding.
        assert_eq!(guard.observe(&window(100, 2, 190), 200), None);
        assert_eq!(guard.state(), GuardState::Holding);
        assert_eq!(
            guard.observe(&window(100, 2, 150), 200),
            Some(Decision::Resume)
        );
        assert_eq!(guard.state(), GuardState::Running);
    }

    #[test]
    fn aborts_above_critical_load_and_stays_aborted() {
        let mut guard = Guard::new(
            &guards("maxLoad: {errorRate: 0.05}\ncriticalLoad: {errorRate: 0.25}"),
            false,
        )
        .expect("guard");
        let decision = guard.observe(&window(100, 30, 10), 50);
        assert!(
            matches!(
                decision,
                Some(Decision::Abort {
                    breach: Breach::ErrorRate { .. }
                })
            ),
            "{decision:?}"
        );
        assert_eq!(guard.observe(&window(100, 0, 10), 50), None);
        assert_eq!(guard.state(), GuardState::Aborted);
    }

    #[test]
    fn too_few_requests_are_not_judged() {
        let mut guard =
            Guard::new(&guards("criticalLoad: {errorRate: 0.25}"), false).expect("guard");
        assert_eq!(guard.observe(&window(3, 3, 10), 1), None);
        assert_eq!(guard.state(), GuardState::Running);
    }

    #[test]
    fn a_hold_at_the_very_start_keeps_one_user() {
        let mut guard = Guard::new(&guards("maxLoad: {p99: 10ms}"), false).expect("guard");
        let decision = guard.observe(&window(50, 0, 20), 40);
        assert!(
            matches!(decision, Some(Decision::Hold { ceiling: 1, .. })),
            "{decision:?}"
        );
    }

    #[test]
    fn a_window_longer_than_the_maximum_keeps_only_the_maximum_of_samples() {
        let start = Instant::now();
        let mut w = Window::new(Duration::from_secs(24 * 3600));
        assert_eq!(w.span(), MAX_GUARD_WINDOW.get());
        let tick = Window::tick(w.span());
        let ticks = 2 * MAX_GUARD_WINDOW.get().as_secs() / tick.as_secs().max(1);
        for i in 0..ticks {
            w.push(Sample {
                at: start + tick * u32::try_from(i).expect("few ticks"),
                requests: i,
                failures: 0,
                latency: LatencyHistogram::default(),
            });
        }
        // One sample a tick across the span, plus the baseline a span old.
        let most =
            usize::try_from(MAX_GUARD_WINDOW.get().as_secs() / tick.as_secs()).expect("small") + 2;
        assert!(
            w.samples.len() <= most,
            "{} samples, at most {most}",
            w.samples.len()
        );
    }

    #[test]
    fn the_window_is_the_difference_of_its_ends() {
        let start = Instant::now();
        let mut w = Window::new(Duration::from_secs(10));
        let mut latency = LatencyHistogram::default();
        for _ in 0..100 {
            latency.record(Duration::from_millis(5));
        }
        let first = w.push(Sample {
            at: start,
            requests: 100,
            failures: 0,
            latency: latency.clone(),
        });
        assert_eq!(first.requests, 100);
        for _ in 0..100 {
            latency.record(Duration::from_millis(900));
        }
        let second = w.push(Sample {
            at: start + Duration::from_secs(5),
            requests: 200,
            failures: 50,
            latency: latency.clone(),
        });
        assert_eq!((second.requests, second.failures), (100, 50));
        assert!(second.p99 >= Duration::from_millis(890), "{:?}", second.p99);
        // Past the span the first sample leaves the window.
        let third = w.push(Sample {
            at: start + Duration::from_secs(16),
            requests: 300,
            failures: 50,
            latency,
        });
        assert_eq!((third.requests, third.failures), (100, 0));
    }
}
