//! Where users record what happened, without contending on one lock.
//!
//! Results are kept in a few stripes (a user always writes to the stripe of its id),
//! each behind a mutex that is held for a handful of additions and never across an
//! `.await`; a snapshot merges the stripes into [`Results`] exactly. Live counters for
//! the progress bar are plain atomics.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use super::results::{
    FailureCounts, FailureExample, FailureKind, InvariantResults, KEEP_EXAMPLES, Latency,
    LatencyHistogram, Results, StateResults,
};

/// Counters the progress bar reads every few hundred milliseconds.
#[derive(Debug, Default)]
pub struct Live {
    /// Users (closed) or sessions (open) running now.
    pub active_users: AtomicU64,
    /// Requests completed.
    pub requests: AtomicU64,
    /// Requests failed.
    pub failures: AtomicU64,
    /// Invariant violations.
    pub violations: AtomicU64,
}

#[derive(Debug, Default)]
struct StateStripe {
    requests: u64,
    failures: FailureCounts,
    checks_passed: u64,
    checks_failed: u64,
    /// Indexed by target state.
    transitions: Vec<u64>,
    latency: Latency,
}

#[derive(Debug, Default)]
struct Stripe {
    states: Vec<StateStripe>,
    latency: Latency,
    sessions_started: u64,
    sessions_completed: u64,
    dropped_arrivals: u64,
    examples: Vec<FailureExample>,
}

/// One request's outcome, as a user reports it.
#[derive(Debug)]
pub struct Outcome {
    /// The state index.
    pub state: usize,
    /// From the intended start (None when there was no request, e.g. a render failure).
    pub latency: Option<(Duration, Duration)>,
    /// Checks that held and that failed.
    pub checks: (u64, u64),
    /// Why the request failed, if it did.
    pub failure: Option<FailureKind>,
}

/// The striped recorder shared by every user of a run.
#[derive(Debug)]
pub struct Recorder {
    state_names: Vec<String>,
    stripes: Box<[Mutex<Stripe>]>,
    invariants: Mutex<std::collections::BTreeMap<String, InvariantResults>>,
    examples_kept: AtomicUsize,
    /// Live counters.
    pub live: Live,
}

impl Recorder {
    /// A recorder for a scenario with these states, striped for this many threads.
    pub fn new(state_names: Vec<String>, threads: usize) -> Self {
        // A few stripes per thread keep contention rare; each stripe costs
        // (states + 1) × 2 histograms, so more would waste memory.
        let count = (threads * 2).clamp(1, 16);
        let stripes = (0..count)
            .map(|_| {
                Mutex::new(Stripe {
                    states: (0..state_names.len())
                        .map(|_| StateStripe {
                            transitions: vec![0; state_names.len()],
                            ..StateStripe::default()
                        })
                        .collect(),
                    ..Stripe::default()
                })
            })
            .collect();
        Self {
            state_names,
            stripes,
            invariants: Mutex::default(),
            examples_kept: AtomicUsize::new(0),
            live: Live::default(),
        }
    }

    fn with_stripe<T>(&self, user: u64, f: impl FnOnce(&mut Stripe) -> T) -> T {
        let slot = (user % self.stripes.len() as u64) as usize;
        // A poisoned stripe only means a panic elsewhere mid-update of plain counters;
        // the counters are still usable.
        let mut stripe = match self.stripes[slot].lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut stripe)
    }

    /// Records one state visit.
    pub fn record(&self, user: u64, outcome: &Outcome) {
        // A state without a request is a visit, not a request; a render failure
        // is a request that could not be sent, and counts.
        let attempted = outcome.latency.is_some() || outcome.failure.is_some();
        if attempted {
            self.live.requests.fetch_add(1, Relaxed);
        }
        if outcome.failure.is_some() {
            self.live.failures.fetch_add(1, Relaxed);
        }
        self.with_stripe(user, |s| {
            if let Some((corrected, raw)) = outcome.latency {
                s.latency.record(corrected, raw);
            }
            let Some(state) = s.states.get_mut(outcome.state) else {
                return;
            };
            if attempted {
                state.requests += 1;
            }
            if let Some((corrected, raw)) = outcome.latency {
                state.latency.record(corrected, raw);
            }
            state.checks_passed += outcome.checks.0;
            state.checks_failed += outcome.checks.1;
            if let Some(kind) = outcome.failure {
                state.failures.add(kind);
            }
        });
    }

    /// Records a transition `from` → `to`.
    pub fn transition(&self, user: u64, from: usize, to: usize) {
        self.with_stripe(user, |s| {
            if let Some(slot) = s
                .states
                .get_mut(from)
                .and_then(|st| st.transitions.get_mut(to))
            {
                *slot += 1;
            }
        });
    }

    /// Records a session's start or end.
    pub fn session(&self, user: u64, completed: bool) {
        self.with_stripe(user, |s| {
            if completed {
                s.sessions_completed += 1;
            } else {
                s.sessions_started += 1;
            }
        });
    }

    /// Records an open-model arrival refused at the cap.
    pub fn dropped(&self, seq: u64) {
        self.with_stripe(seq, |s| s.dropped_arrivals += 1);
    }

    /// Whether another failure example is still wanted (cheap: lets users skip
    /// building the example's strings once enough are kept).
    pub fn wants_example(&self) -> bool {
        self.examples_kept.load(Relaxed) < KEEP_EXAMPLES
    }

    /// Keeps a failure example if fewer than [`KEEP_EXAMPLES`] are kept.
    pub fn example(&self, example: FailureExample) {
        if self.examples_kept.fetch_add(1, Relaxed) < KEEP_EXAMPLES {
            let user = example.user;
            self.with_stripe(user, |s| s.examples.push(example.shortened()));
        }
    }

    /// Records one invariant check.
    pub fn invariant(&self, name: &str, violation: Option<FailureExample>) {
        let mut map = match self.invariants.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let entry = map.entry(name.to_owned()).or_default();
        entry.checks += 1;
        if let Some(example) = violation {
            entry.violations += 1;
            self.live.violations.fetch_add(1, Relaxed);
            if entry.examples.len() < 5 {
                entry.examples.push(example.shortened());
            }
        }
    }

    /// Registers an invariant so it is reported even before its first check.
    pub fn declare_invariant(&self, name: &str) {
        let mut map = match self.invariants.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(name.to_owned()).or_default();
    }

    /// Corrected latency of every request so far, merged (the guard's window is the
    /// difference of two of these).
    pub fn corrected(&self) -> LatencyHistogram {
        let mut merged = LatencyHistogram::default();
        for i in 0..self.stripes.len() {
            self.with_stripe(i as u64, |s| merged.merge(&s.latency.corrected));
        }
        merged
    }

    /// The p99 of corrected latency so far, for the progress bar.
    pub fn p99(&self) -> Duration {
        self.corrected().quantile(0.99)
    }

    /// Everything recorded so far, merged.
    pub fn snapshot(&self) -> Results {
        let mut results = Results::default();
        for i in 0..self.stripes.len() {
            self.with_stripe(i as u64, |s| {
                let mut part = Results {
                    sessions_started: s.sessions_started,
                    sessions_completed: s.sessions_completed,
                    dropped_arrivals: s.dropped_arrivals,
                    latency: s.latency.clone(),
                    failure_examples: s.examples.clone(),
                    ..Results::default()
                };
                for (name, st) in self.state_names.iter().zip(&s.states) {
                    part.requests += st.requests;
                    part.failures.merge(&st.failures);
                    part.checks_passed += st.checks_passed;
                    part.checks_failed += st.checks_failed;
                    let transitions = self
                        .state_names
                        .iter()
                        .zip(&st.transitions)
                        .filter(|(_, n)| **n > 0)
                        .map(|(to, n)| (to.clone(), *n))
                        .collect();
                    part.states.insert(
                        name.clone(),
                        StateResults {
                            requests: st.requests,
                            failures: st.failures.clone(),
                            checks_passed: st.checks_passed,
                            checks_failed: st.checks_failed,
                            transitions,
                            latency: st.latency.clone(),
                        },
                    );
                }
                results.merge(&part);
            });
        }
        let invariants = match self.invariants.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        results.invariants = invariants;
        results
    }
}
