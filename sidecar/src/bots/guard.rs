//! Local guards: `guards.maxLoad` holds the load, `guards.criticalLoad` aborts the run,
//! judged on what the bots themselves see (error rate and p99 over `guards.window`),
//! as pt-online-schema-change's `--max-load` pauses and `--critical-load` aborts.
//!
//! - Above any `maxLoad` limit the guard **holds**: the ceiling on active users drops
//!   to the last level whose window was under every limit, so the ramp stops and the
//!   users added since park before their next request ([`super::gate`]).
//! - Once every measure is back under [`RESUME_FRACTION`] of its `maxLoad` limit the
//!   guard **resumes** (the gap is the hysteresis that keeps it from flapping).
//! - Above any `criticalLoad` limit it **aborts**: every user stops at once and the
//!   run ends early, with the reason in the report and a distinct exit code.
//!
//! `cpu` limits need the target pods' metrics, which only the operator reads; a local
//! run reports that it ignores them. The decision ([`Guard::observe`]) is pure; the
//! loop that samples the recorder and works the gate ([`watch`]) is the only I/O.

use std::{collections::VecDeque, fmt, sync::Arc, time::Duration};

use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use trimtab_api::load_test::{Guards, LoadLimits};

use super::{gate::UNLIMITED, results::LatencyHistogram, user::Shared};

/// Resume once every measure is under this share of its `maxLoad` limit.
pub const RESUME_FRACTION: f64 = 0.8;
/// Fewer requests than this in a window are too few to judge a rate or a p99 by (one
/// failed request out of three is not a 33% error rate).
pub const MIN_REQUESTS: u64 = 20;

/// The limits a local run can judge.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Failed ÷ all requests, 0–1.
    pub error_rate: Option<f64>,
    /// 99th percentile of corrected latency.
    pub p99: Option<Duration>,
}

impl From<&LoadLimits> for Limits {
    fn from(limits: &LoadLimits) -> Self {
        Self {
            error_rate: limits.error_rate,
            p99: limits.p99.map(|d| d.get()),
        }
    }
}

impl Limits {
    fn is_empty(&self) -> bool {
        self.error_rate.is_none() && self.p99.is_none()
    }

    /// The first limit `window` exceeds once each is scaled by `factor`.
    fn exceeded(&self, window: &WindowStats, factor: f64) -> Option<Breach> {
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

/// What the bots saw over the last window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowStats {
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
            Self::ErrorRate { observed, limit } => {
                write!(f, "error rate {observed:.3} > {limit:.3}")
            }
            Self::P99 { observed, limit } => write!(f, "p99 {observed:?} > {limit:?}"),
        }
    }
}

/// Where the guard stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GuardState {
    /// Under every limit: the workload runs as planned.
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
    /// The guard for `guards`, or `None` when it has nothing a local run can judge.
    pub fn new(guards: &Guards) -> Option<Self> {
        let max = guards
            .max_load
            .as_ref()
            .map(Limits::from)
            .unwrap_or_default();
        let critical = guards
            .critical_load
            .as_ref()
            .map(Limits::from)
            .unwrap_or_default();
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
        if window.requests < MIN_REQUESTS {
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

/// Cumulative counters at one instant; a window is the difference of two.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    requests: u64,
    failures: u64,
    latency: LatencyHistogram,
}

/// The last `window` of samples.
#[derive(Debug)]
struct Window {
    span: Duration,
    samples: VecDeque<Sample>,
}

impl Window {
    fn push(&mut self, sample: Sample) -> WindowStats {
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
                    requests: sample.requests - oldest.requests,
                    failures: sample.failures - oldest.failures,
                    p99,
                }
            }
            None => WindowStats {
                requests: sample.requests,
                failures: sample.failures,
                p99: sample.latency.quantile(0.99),
            },
        };
        self.samples.push_back(sample);
        stats
    }
}

/// One change of the guard's state during a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GuardEvent {
    /// Seconds since the run started.
    pub at_seconds: f64,
    /// The new state.
    pub state: GuardState,
    /// The ceiling on active users while holding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<u64>,
    /// Why (the limit and what was seen), empty on resume.
    pub reason: String,
}

/// Samples the run every tick and works the gate until the deadline or an abort;
/// returns the guard's events.
pub async fn watch(shared: Arc<Shared>, mut guard: Guard, span: Duration) -> Vec<GuardEvent> {
    let start = Instant::now();
    // Ten samples a window, at most one a second, at least one every 100 ms.
    let tick = (span / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut window = Window {
        span,
        samples: VecDeque::new(),
    };
    let mut events = Vec::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = tokio::time::sleep_until(shared.deadline) => break,
            () = shared.gate.aborted() => break,
        }
        let live = &shared.recorder.live;
        let stats = window.push(Sample {
            at: Instant::now(),
            requests: live.requests.load(std::sync::atomic::Ordering::Relaxed),
            failures: live.failures.load(std::sync::atomic::Ordering::Relaxed),
            latency: shared.recorder.corrected(),
        });
        let active = live.active_users.load(std::sync::atomic::Ordering::Relaxed);
        let Some(decision) = guard.observe(&stats, active) else {
            continue;
        };
        let at_seconds = start.elapsed().as_secs_f64();
        let event = match decision {
            Decision::Hold { ceiling, breach } => {
                shared.gate.set_ceiling(ceiling);
                GuardEvent {
                    at_seconds,
                    state: GuardState::Holding,
                    ceiling: Some(ceiling),
                    reason: format!("maxLoad: {breach}"),
                }
            }
            Decision::Resume => {
                shared.gate.set_ceiling(UNLIMITED);
                GuardEvent {
                    at_seconds,
                    state: GuardState::Running,
                    ceiling: None,
                    reason: String::new(),
                }
            }
            Decision::Abort { breach } => {
                shared.gate.abort();
                GuardEvent {
                    at_seconds,
                    state: GuardState::Aborted,
                    ceiling: None,
                    reason: format!("criticalLoad: {breach}"),
                }
            }
        };
        tracing::warn!(state = ?event.state, ceiling = ?event.ceiling, reason = %event.reason, "guard");
        events.push(event);
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guards(yaml: &str) -> Guards {
        serde_yaml_ng::from_str(yaml).expect("guards")
    }

    fn window(requests: u64, failures: u64, p99_ms: u64) -> WindowStats {
        WindowStats {
            requests,
            failures,
            p99: Duration::from_millis(p99_ms),
        }
    }

    #[test]
    fn cpu_only_guards_are_not_judged_locally() {
        assert!(Guard::new(&guards("maxLoad: {cpu: 0.8}\ncriticalLoad: {cpu: 0.9}")).is_none());
        assert!(Guard::new(&guards("maxLoad: {cpu: 0.8, p99: 2s}")).is_some());
    }

    #[test]
    fn holds_at_the_last_good_level_then_resumes_with_hysteresis() {
        let mut guard =
            Guard::new(&guards("maxLoad: {errorRate: 0.05, p99: 200ms}")).expect("guard");
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
        let mut guard = Guard::new(&guards(
            "maxLoad: {errorRate: 0.05}\ncriticalLoad: {errorRate: 0.25}",
        ))
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
        let mut guard = Guard::new(&guards("criticalLoad: {errorRate: 0.25}")).expect("guard");
        assert_eq!(guard.observe(&window(3, 3, 10), 1), None);
        assert_eq!(guard.state(), GuardState::Running);
    }

    #[test]
    fn a_hold_at_the_very_start_keeps_one_user() {
        let mut guard = Guard::new(&guards("maxLoad: {p99: 10ms}")).expect("guard");
        let decision = guard.observe(&window(50, 0, 20), 40);
        assert!(
            matches!(decision, Some(Decision::Hold { ceiling: 1, .. })),
            "{decision:?}"
        );
    }

    #[test]
    fn the_window_is_the_difference_of_its_ends() {
        let start = Instant::now();
        let mut w = Window {
            span: Duration::from_secs(10),
            samples: VecDeque::new(),
        };
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
