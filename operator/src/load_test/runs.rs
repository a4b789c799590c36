//! The LoadTests in progress, as this replica hears them from their runners: who has
//! registered, when they all start, each runner's newest results, and the guard's
//! verdict. The config server's runner endpoint writes here
//! ([`Runs::report`]); the reconciler reads it ([`Runs::snapshot`]) to write status and
//! the report.
//!
//! - **One start.** When the last of a test's runners registers, the start is fixed
//!   [`START_LEAD`] ahead, and every waiting runner's long poll returns it at once;
//!   each runner sleeps until that wall-clock instant, so the skew is what the clocks
//!   and timers add, not what the polls add.
//! - **Exact results.** Reports are cumulative, so keeping each runner's newest and
//!   merging across runners (histograms bucket by bucket) gives exactly what one
//!   process would have recorded.
//! - **Guards.** While a test runs, at most once a [`Window::tick`], the merged totals
//!   are sampled into the guard's window together with the target's CPU, and
//!   [`Guard::observe`] decides; the verdict reaches each runner in the answer to its
//!   next report.
//!
//! State lives in memory on purpose: after a restart or a leader change the next round
//! of reports (every runner reports every few seconds) rebuilds it, the start included
//! (running runners say when they started). A replica that loses the lease drops its
//! board at once ([`Runs::set_leading`]) and answers every runner "not here", so no
//! runner is steered by a replica that no longer writes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;
use trimtab_api::{
    guard::{Decision, Guard, GuardEvent, GuardState, Sample, Window},
    results::{LatencyHistogram, Results},
    runner_protocol::{Directive, RunnerReport, RunnerStage, unix_micros},
};

use super::token::TokenKey;

/// How far ahead of the last registration the start is set: enough for every waiting
/// runner's poll to return and its timer to be armed.
pub const START_LEAD: Duration = Duration::from_secs(2);
/// A run nobody has reported on or reconciled for this long is dropped. An ended run is
/// kept that long too, so that runners still reporting hear the abort, not "not here".
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// A test, by namespace and name.
pub type TestKey = (String, String);

/// What the reconciler knows of a test that the runners do not say.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The test's UID: its token is derived from it.
    pub uid: String,
    /// Runner pods (`spec.runners.parallelism`).
    pub runners: u32,
    /// The guard and its window, when the test has guards.
    pub guard: Option<(Guard, Duration)>,
    /// The names the runners' results may use.
    pub names: Names,
}

/// The state and invariant names of a test: a report with any other is refused, so the
/// merge of many runners' results holds no more entries than one runner's.
#[derive(Debug, Clone, Default)]
pub struct Names {
    /// The scenario's states.
    pub states: BTreeSet<String>,
    /// The test's invariants.
    pub invariants: BTreeSet<String>,
}

impl Names {
    /// The first name in `results` that is not the test's, with the field it is in.
    fn check(&self, results: &Results) -> Result<(), String> {
        for (state, numbers) in &results.states {
            if !self.states.contains(state) {
                return Err(format!(
                    "results.states: {state:?} is not a state of the scenario"
                ));
            }
            if let Some(to) = numbers
                .transitions
                .keys()
                .find(|to| !self.states.contains(*to))
            {
                return Err(format!(
                    "results.states[{state:?}].transitions: {to:?} is not a state of the scenario"
                ));
            }
        }
        match results
            .invariants
            .keys()
            .find(|i| !self.invariants.contains(*i))
        {
            Some(invariant) => Err(format!(
                "results.invariants: {invariant:?} is not an invariant of the test"
            )),
            None => Ok(()),
        }
    }
}

/// Why a report is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// This replica tracks no such test: it is not the leader, has just started, or
    /// the test is gone.
    #[error(
        "LoadTest {0} is not tracked by this operator replica (not the leader, just restarted, or the test was deleted)"
    )]
    Unknown(String),
    /// The token is not this test's.
    #[error("the token is not LoadTest {0}'s runner token")]
    Token(String),
    /// The results are over the limits or name what the test has not.
    #[error("the report's {0}")]
    Results(String),
    /// The runner's index is not one of the test's.
    #[error("runner index {index} is out of range: LoadTest {test} has {runners} runners")]
    Index {
        /// The test.
        test: String,
        /// The index given.
        index: u32,
        /// How many runners the test has.
        runners: u32,
    },
}

/// The answer to a report.
#[derive(Debug)]
pub enum Answer {
    /// Answer now.
    Now(Directive),
    /// The runner waits for the start: answer when this holds a start time (or the
    /// poll's time is up), with [`Runs::directive`].
    WaitForStart(watch::Receiver<Option<u64>>),
}

/// A test's progress as the runners reported it.
#[derive(Debug, Clone, Default)]
pub struct RunSnapshot {
    /// Runner pods expected.
    pub expected: u32,
    /// Registered and waiting for the start.
    pub waiting: u32,
    /// Sending load.
    pub running: u32,
    /// Reported their final results.
    pub finished: u32,
    /// The start every runner was given.
    pub start_at: Option<SystemTime>,
    /// The spread of the runners' actual starts, once every runner has started.
    pub start_skew: Option<Duration>,
    /// Users active across runners.
    pub active_users: u64,
    /// Users planned across runners.
    pub target_users: u64,
    /// Every runner's newest results, merged.
    pub results: Results,
    /// Requests per second over the last sampling interval.
    pub rps: f64,
    /// The guard's current state and why.
    pub guard: GuardState,
    /// The reason of the last hold or abort.
    pub guard_reason: Option<String>,
    /// Every change of the verdict.
    pub guard_events: Vec<GuardEvent>,
}

#[derive(Debug)]
struct Slot {
    seq: u64,
    stage: RunnerStage,
    started_at: Option<u64>,
    active: u64,
    target: u64,
    /// Shared, so that a snapshot merges outside the lock the reports need.
    results: Arc<Results>,
    /// This runner's share of the hold.
    ceiling: Option<u64>,
}

#[derive(Debug)]
struct RunState {
    uid: String,
    expected: u32,
    names: Names,
    slots: BTreeMap<u32, Slot>,
    start_at: Option<SystemTime>,
    start: watch::Sender<Option<u64>>,
    guard: Option<GuardLoop>,
    cpu: Option<f64>,
    rate: Option<(Instant, u64)>,
    rps: f64,
    touched: Instant,
    /// The test has ended: the reconciler no longer tracks it.
    ended: bool,
}

#[derive(Debug)]
struct GuardLoop {
    guard: Guard,
    window: Window,
    tick: Duration,
    last: Option<Instant>,
    reason: Option<String>,
    events: Vec<GuardEvent>,
}

/// Every tracked test.
#[derive(Debug, Clone)]
pub struct Runs {
    key: TokenKey,
    inner: Arc<Mutex<Board>>,
}

#[derive(Debug)]
struct Board {
    /// Whether this replica leads: only then does it track tests and take reports.
    leading: bool,
    runs: HashMap<TestKey, RunState>,
}

impl Runs {
    /// Tracks nothing yet; tokens are checked with `key`. It leads until told otherwise
    /// ([`Self::set_leading`]), as a single replica does.
    pub fn new(key: TokenKey) -> Self {
        Self {
            key,
            inner: Arc::new(Mutex::new(Board {
                leading: true,
                runs: HashMap::new(),
            })),
        }
    }

    /// Follows this replica's leadership: on losing it, everything tracked is dropped
    /// and every report is refused until the replica leads again (the new leader
    /// rebuilds the board from the runners' next reports).
    pub fn set_leading(&self, leading: bool) {
        let mut board = self.lock();
        board.leading = leading;
        if !leading {
            board.runs.clear();
        }
    }

    /// The runner token of the test with this UID.
    pub fn token(&self, uid: &str) -> String {
        self.key.token(uid)
    }

    fn lock(&self) -> MutexGuard<'_, Board> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking `test` (the reconciler calls this on every pass; a new UID, a
    /// test deleted and made again, starts over).
    pub fn track(&self, test: &TestKey, plan: Plan) {
        let mut board = self.lock();
        if !board.leading {
            return;
        }
        let now = Instant::now();
        board
            .runs
            .retain(|_, r| now.duration_since(r.touched) < FORGET_AFTER);
        match board.runs.get_mut(test) {
            Some(run) if run.uid == plan.uid => run.touched = now,
            _ => {
                let guard = plan.guard.map(|(guard, span)| GuardLoop {
                    guard,
                    window: Window::new(span),
                    tick: Window::tick(span),
                    last: None,
                    reason: None,
                    events: Vec::new(),
                });
                board.runs.insert(
                    test.clone(),
                    RunState {
                        uid: plan.uid,
                        expected: plan.runners,
                        names: plan.names,
                        slots: BTreeMap::new(),
                        start_at: None,
                        start: watch::channel(None).0,
                        guard,
                        cpu: None,
                        rate: None,
                        rps: 0.0,
                        touched: now,
                        ended: false,
                    },
                );
            }
        }
    }

    /// The test has ended: its verdict stays, for the runners that have yet to hear
    /// it, until [`FORGET_AFTER`] without reports.
    pub fn end(&self, test: &TestKey) {
        if let Some(run) = self.lock().runs.get_mut(test) {
            run.ended = true;
        }
    }

    /// Drops the runs of tests that `exists` no longer finds (by key and UID: deleted,
    /// or deleted and made again) and of those forgotten for [`FORGET_AFTER`]; returns
    /// the tests dropped.
    pub fn sweep(&self, exists: impl Fn(&TestKey, &str) -> bool) -> Vec<TestKey> {
        let mut board = self.lock();
        let now = Instant::now();
        let mut gone = Vec::new();
        board.runs.retain(|test, run| {
            let keep = now.duration_since(run.touched) < FORGET_AFTER && exists(test, &run.uid);
            if !keep {
                gone.push(test.clone());
            }
            keep
        });
        gone
    }

    /// The target pods' CPU utilization, for the guard.
    pub fn set_cpu(&self, test: &TestKey, cpu: Option<f64>) {
        if let Some(run) = self.lock().runs.get_mut(test) {
            run.cpu = cpu;
        }
    }

    /// Checks a runner's credentials and index before its report is read: a stranger
    /// cannot make this replica parse (and hold) megabytes.
    pub fn admit(&self, test: &TestKey, index: u32, token: &str) -> Result<(), ReportError> {
        let board = self.lock();
        let run = board
            .runs
            .get(test)
            .filter(|_| board.leading)
            .ok_or_else(|| ReportError::Unknown(name(test)))?;
        run.admit(&self.key, test, index, token)
    }

    /// Takes runner `index`'s report.
    pub fn report(
        &self,
        test: &TestKey,
        index: u32,
        token: &str,
        report: RunnerReport,
    ) -> Result<Answer, ReportError> {
        let mut board = self.lock();
        let leading = board.leading;
        let run = board
            .runs
            .get_mut(test)
            .filter(|_| leading)
            .ok_or_else(|| ReportError::Unknown(name(test)))?;
        run.admit(&self.key, test, index, token)?;
        if let Some(results) = &report.results {
            results
                .check_limits()
                .map_err(|e| ReportError::Results(e.to_string()))?;
            run.names.check(results).map_err(ReportError::Results)?;
        }
        let now = Instant::now();
        run.touched = now;
        let slot = run.slots.entry(index).or_insert_with(|| Slot {
            seq: 0,
            stage: RunnerStage::Waiting,
            started_at: None,
            active: 0,
            target: 0,
            results: Arc::default(),
            ceiling: None,
        });
        let waiting = report.stage == RunnerStage::Waiting;
        if report.seq >= slot.seq {
            slot.seq = report.seq;
            slot.stage = report.stage;
            slot.started_at = report.started_at_unix_micros.or(slot.started_at);
            slot.active = report.active_users;
            slot.target = report.target_users;
            if let Some(results) = report.results {
                slot.results = Arc::new(results);
            }
        }
        if run.start_at.is_none() {
            // A runner that has started says when: this replica restarted or took over
            // a running test, and keeps the start the runners were given.
            let started = run.slots.values().filter_map(|s| s.started_at).min();
            let at = match started {
                Some(micros) => Some(UNIX_EPOCH + Duration::from_micros(micros)),
                None if run.slots.len() == run.expected as usize => {
                    Some(SystemTime::now() + START_LEAD)
                }
                None => None,
            };
            if let Some(at) = at {
                run.start_at = Some(at);
                run.start.send_replace(Some(unix_micros(at)));
            }
        }
        // An ended test's verdict is final.
        if run.start_at.is_some() && !run.ended {
            run.sample(now);
        }
        if waiting && run.start_at.is_none() {
            return Ok(Answer::WaitForStart(run.start.subscribe()));
        }
        Ok(Answer::Now(run.directive(index)))
    }

    /// What runner `index` is told now.
    pub fn directive(&self, test: &TestKey, index: u32) -> Directive {
        self.lock()
            .runs
            .get(test)
            .map(|run| run.directive(index))
            .unwrap_or_default()
    }

    /// Whether the test's runners have been given their start (no merge, unlike
    /// [`Self::snapshot`]).
    pub fn started(&self, test: &TestKey) -> bool {
        self.lock()
            .runs
            .get(test)
            .is_some_and(|r| r.start_at.is_some())
    }

    /// The test's progress, or `None` when this replica tracks it not.
    pub fn snapshot(&self, test: &TestKey) -> Option<RunSnapshot> {
        let mut board = self.lock();
        let run = board.runs.get_mut(test)?;
        let mut snapshot = RunSnapshot {
            expected: run.expected,
            start_at: run.start_at,
            ..RunSnapshot::default()
        };
        let mut total: u64 = 0;
        let mut reported = Vec::with_capacity(run.slots.len());
        for slot in run.slots.values() {
            match slot.stage {
                RunnerStage::Waiting => snapshot.waiting += 1,
                RunnerStage::Running => snapshot.running += 1,
                RunnerStage::Finished => snapshot.finished += 1,
            }
            snapshot.active_users = snapshot.active_users.saturating_add(slot.active);
            snapshot.target_users = snapshot.target_users.saturating_add(slot.target);
            total = total.saturating_add(slot.results.requests);
            reported.push(Arc::clone(&slot.results));
        }
        let starts: Vec<u64> = run.slots.values().filter_map(|s| s.started_at).collect();
        if starts.len() == run.expected as usize
            && let (Some(first), Some(last)) = (starts.iter().min(), starts.iter().max())
        {
            snapshot.start_skew = Some(Duration::from_micros(last - first));
        }
        let now = Instant::now();
        if let Some((at, before)) = run.rate {
            let seconds = now.duration_since(at).as_secs_f64();
            if seconds >= 1.0 {
                run.rps = total.saturating_sub(before) as f64 / seconds;
                run.rate = Some((now, total));
            }
        } else {
            run.rate = Some((now, total));
        }
        snapshot.rps = run.rps;
        if let Some(guard) = &run.guard {
            snapshot.guard = guard.guard.state();
            snapshot.guard_reason = guard.reason.clone();
            snapshot.guard_events = guard.events.clone();
        }
        // Merging dense histograms of many runners takes a while: reports go on
        // meanwhile.
        drop(board);
        for results in reported {
            snapshot.results.merge(&results);
        }
        Some(snapshot)
    }
}

/// A test's name as messages give it.
fn name((namespace, name): &TestKey) -> String {
    format!("{namespace}/{name}")
}

impl RunState {
    fn admit(
        &self,
        key: &TokenKey,
        test: &TestKey,
        index: u32,
        token: &str,
    ) -> Result<(), ReportError> {
        if !key.verify(&self.uid, token) {
            return Err(ReportError::Token(name(test)));
        }
        if index >= self.expected {
            return Err(ReportError::Index {
                test: name(test),
                index,
                runners: self.expected,
            });
        }
        Ok(())
    }

    fn directive(&self, index: u32) -> Directive {
        let mut directive = Directive {
            start_at_unix_micros: self.start_at.map(unix_micros),
            ..Directive::default()
        };
        if let Some(guard) = &self.guard {
            match guard.guard.state() {
                GuardState::Aborted => directive.abort = guard.reason.clone(),
                GuardState::Holding => {
                    directive.ceiling = self.slots.get(&index).and_then(|s| s.ceiling);
                }
                GuardState::Running => {}
            }
        }
        directive
    }

    /// Samples the merged totals into the guard's window, at most once a tick, and acts
    /// on the guard's decision.
    fn sample(&mut self, now: Instant) {
        let Some(guard) = &mut self.guard else {
            return;
        };
        if guard
            .last
            .is_some_and(|last| now.duration_since(last) < guard.tick)
        {
            return;
        }
        guard.last = Some(now);
        let mut latency = LatencyHistogram::default();
        let (mut requests, mut failures, mut active) = (0, 0, 0);
        for slot in self.slots.values() {
            latency.merge(&slot.results.latency.corrected);
            requests = slot.results.requests.saturating_add(requests);
            failures = slot.results.failures.total().saturating_add(failures);
            active = slot.active.saturating_add(active);
        }
        let mut stats = guard.window.push(Sample {
            at: now,
            requests,
            failures,
            latency,
        });
        stats.cpu = self.cpu;
        let Some(decision) = guard.guard.observe(&stats, active) else {
            return;
        };
        let at_seconds = self
            .start_at
            .and_then(|s| SystemTime::now().duration_since(s).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        let event = GuardEvent::new(&decision, at_seconds);
        match decision {
            Decision::Hold { ceiling, .. } => {
                // Each runner sheds in proportion to its share of the active users.
                for slot in self.slots.values_mut() {
                    let share =
                        (slot.active as f64 * ceiling as f64 / active.max(1) as f64).floor() as u64;
                    slot.ceiling = Some(share.max(1));
                }
            }
            Decision::Resume => {
                for slot in self.slots.values_mut() {
                    slot.ceiling = None;
                }
            }
            Decision::Abort { .. } => {}
        }
        if !event.reason.is_empty() {
            guard.reason = Some(event.reason.clone());
        }
        tracing::warn!(state = ?event.state, ceiling = ?event.ceiling, reason = %event.reason, "load test guard");
        guard.events.push(event);
    }
}

#[cfg(test)]
mod tests {
    use trimtab_api::{load_test::Guards, results::FailureKind};

    use super::*;

    fn runs() -> (Runs, TestKey, String) {
        let key = TokenKey::from_bytes(&[1; 32]);
        let token = key.token("uid-1");
        (Runs::new(key), ("ns".into(), "t".into()), token)
    }

    fn report(seq: u64, stage: RunnerStage, results: Option<Results>) -> RunnerReport {
        RunnerReport {
            seq,
            stage,
            started_at_unix_micros: None,
            active_users: 10,
            target_users: 10,
            results,
        }
    }

    fn results(requests: u64, failed: u64, latency_ms: u64) -> Results {
        let mut r = Results {
            requests,
            ..Results::default()
        };
        for _ in 0..requests {
            r.latency
                .record(Duration::from_millis(latency_ms), Duration::from_millis(1));
        }
        for _ in 0..failed {
            r.failures.add(FailureKind::Check);
        }
        r
    }

    #[test]
    fn the_start_is_fixed_when_the_last_runner_registers() {
        let (runs, test, token) = runs();
        runs.track(
            &test,
            Plan {
                uid: "uid-1".into(),
                runners: 2,
                guard: None,
                names: Names::default(),
            },
        );
        let first = runs
            .report(&test, 0, &token, report(1, RunnerStage::Waiting, None))
            .expect("registered");
        let Answer::WaitForStart(mut waiting) = first else {
            panic!("the first of two runners waits: {first:?}");
        };
        assert_eq!(*waiting.borrow_and_update(), None);
        let second = runs
            .report(&test, 1, &token, report(1, RunnerStage::Waiting, None))
            .expect("registered");
        let Answer::Now(directive) = second else {
            panic!("the last runner gets the start at once: {second:?}");
        };
        let at = directive.start_at_unix_micros.expect("a start");
        // The waiting runner sees the same instant.
        assert!(waiting.has_changed().expect("open"));
        assert_eq!(*waiting.borrow(), Some(at));
        let ahead = at.saturating_sub(unix_micros(SystemTime::now()));
        assert!(ahead > 1_000_000 && ahead <= 2_000_000, "{ahead} µs ahead");
    }

    #[test]
    fn wrong_tokens_unknown_tests_and_bad_indexes_are_refused() {
        let (runs, test, token) = runs();
        let waiting = || report(1, RunnerStage::Waiting, None);
        assert!(matches!(
            runs.report(&test, 0, &token, waiting()),
            Err(ReportError::Unknown(_))
        ));
        runs.track(
            &test,
            Plan {
                uid: "uid-1".into(),
                runners: 2,
                guard: None,
                names: Names::default(),
            },
        );
        let other = TokenKey::from_bytes(&[1; 32]).token("uid-2");
        assert_eq!(
            runs.report(&test, 0, &other, waiting()).err(),
            Some(ReportError::Token("ns/t".into()))
        );
        assert!(matches!(
            runs.report(&test, 2, &token, waiting()),
            Err(ReportError::Index { index: 2, .. })
        ));
    }

    fn plan(runners: u32) -> Plan {
        Plan {
            uid: "uid-1".into(),
            runners,
            guard: None,
            names: Names::default(),
        }
    }

    #[test]
    fn a_replica_that_stops_leading_forgets_every_run_and_refuses_reports() {
        let (runs, test, token) = runs();
        runs.track(&test, plan(1));
        runs.admit(&test, 0, &token).expect("admitted");
        runs.set_leading(false);
        assert!(matches!(
            runs.admit(&test, 0, &token),
            Err(ReportError::Unknown(_))
        ));
        // A reconcile that began while it led tracks nothing now.
        runs.track(&test, plan(1));
        assert!(matches!(
            runs.report(&test, 0, &token, report(1, RunnerStage::Waiting, None)),
            Err(ReportError::Unknown(_))
        ));
        assert!(runs.snapshot(&test).is_none());
        runs.set_leading(true);
        runs.track(&test, plan(1));
        runs.admit(&test, 0, &token).expect("admitted again");
    }

    #[test]
    fn results_with_names_the_test_has_not_are_refused_naming_the_field() {
        let (runs, test, token) = runs();
        runs.track(
            &test,
            Plan {
                names: Names {
                    states: ["home".to_owned()].into(),
                    invariants: ["stock".to_owned()].into(),
                },
                ..plan(1)
            },
        );
        let send = |results: Results| {
            runs.report(
                &test,
                0,
                &token,
                report(1, RunnerStage::Running, Some(results)),
            )
        };
        let mut ok = results(3, 0, 1);
        ok.states.entry("home".into()).or_default().requests = 3;
        ok.invariants.entry("stock".into()).or_default().checks = 1;
        send(ok.clone()).expect("the test's own names");
        let mut stranger = ok.clone();
        stranger.states.entry("elsewhere".into()).or_default();
        let refused = send(stranger).err().map(|e| e.to_string());
        assert_eq!(
            refused.as_deref(),
            Some(r#"the report's results.states: "elsewhere" is not a state of the scenario"#)
        );
        let mut hop = ok.clone();
        hop.states
            .entry("home".into())
            .or_default()
            .transitions
            .insert("nowhere".into(), 1);
        assert!(matches!(send(hop), Err(ReportError::Results(m)) if m.contains("transitions")));
        let mut rule = ok;
        rule.invariants.entry("other".into()).or_default();
        assert!(matches!(send(rule), Err(ReportError::Results(m)) if m.contains("invariants")));
    }

    #[test]
    fn a_new_leader_keeps_the_start_the_running_runners_were_given() {
        let (runs, test, token) = runs();
        runs.track(&test, plan(2));
        let started = unix_micros(SystemTime::now()) - 60_000_000;
        let mut running = report(7, RunnerStage::Running, Some(results(10, 0, 1)));
        running.started_at_unix_micros = Some(started + 150);
        runs.report(&test, 1, &token, running.clone())
            .expect("taken");
        running.started_at_unix_micros = Some(started);
        // The other runner has not reported again yet; the start is known anyway.
        let answer = runs.report(&test, 0, &token, running).expect("taken");
        let Answer::Now(directive) = answer else {
            panic!("{answer:?}");
        };
        assert_eq!(directive.start_at_unix_micros, Some(started + 150));
        let snapshot = runs.snapshot(&test).expect("tracked");
        assert_eq!(snapshot.start_skew, Some(Duration::from_micros(150)));
        assert_eq!(snapshot.results.requests, 20);
    }

    #[test]
    fn an_ended_run_still_answers_and_deleted_tests_are_swept() {
        let (runs, test, token) = runs();
        runs.track(&test, plan(1));
        runs.report(&test, 0, &token, report(1, RunnerStage::Waiting, None))
            .expect("registered");
        runs.end(&test);
        let answer = runs
            .report(&test, 0, &token, report(2, RunnerStage::Finished, None))
            .expect("an ended test still hears its runners");
        assert!(matches!(answer, Answer::Now(_)));
        assert!(runs.sweep(|_, uid| uid == "uid-1").is_empty());
        // Deleted and made again under the same name: a new UID.
        assert_eq!(runs.sweep(|_, uid| uid == "uid-2"), vec![test.clone()]);
        assert!(runs.snapshot(&test).is_none());
    }

    #[test]
    fn results_merge_the_newest_report_of_each_runner() {
        let (runs, test, token) = runs();
        runs.track(
            &test,
            Plan {
                uid: "uid-1".into(),
                runners: 2,
                guard: None,
                names: Names::default(),
            },
        );
        let send = |index, seq, r| {
            runs.report(
                &test,
                index,
                &token,
                report(seq, RunnerStage::Running, Some(r)),
            )
            .expect("taken");
        };
        send(0, 2, results(100, 0, 5));
        send(1, 2, results(50, 5, 5));
        // A late, older report of runner 0 changes nothing; a repeat neither.
        send(0, 1, results(10, 0, 5));
        send(1, 2, results(50, 5, 5));
        let snapshot = runs.snapshot(&test).expect("tracked");
        assert_eq!(snapshot.results.requests, 150);
        assert_eq!(snapshot.results.failures.total(), 5);
        assert_eq!(snapshot.results.latency.corrected.count(), 150);
        assert_eq!(snapshot.running, 2);
    }

    #[test]
    fn an_abort_reaches_every_runner_and_a_hold_splits_the_ceiling() {
        let guards: Guards = serde_json::from_value(serde_json::json!({
            "maxLoad": {"errorRate": 0.05},
            "criticalLoad": {"errorRate": 0.5},
            "window": "10s",
        }))
        .expect("guards");
        let (runs, test, token) = runs();
        runs.track(
            &test,
            Plan {
                uid: "uid-1".into(),
                runners: 2,
                guard: Some((
                    Guard::new(&guards, true).expect("guard"),
                    Duration::from_secs(10),
                )),
                names: Names::default(),
            },
        );
        for index in 0..2 {
            runs.report(&test, index, &token, report(1, RunnerStage::Waiting, None))
                .expect("registered");
        }
        // One sample a tick: the registration took the first; let the next be taken.
        let next_tick = || {
            runs.lock()
                .runs
                .get_mut(&test)
                .expect("run")
                .guard
                .as_mut()
                .expect("guard")
                .last = None;
        };
        next_tick();
        // 10% errors: over maxLoad, the hold splits 20 users' ceiling between runners.
        let answer = runs
            .report(
                &test,
                0,
                &token,
                report(2, RunnerStage::Running, Some(results(100, 10, 5))),
            )
            .expect("taken");
        let Answer::Now(directive) = answer else {
            panic!("{answer:?}");
        };
        assert_eq!(directive.abort, None);
        let snapshot = runs.snapshot(&test).expect("tracked");
        assert_eq!(snapshot.guard, GuardState::Holding, "{snapshot:?}");
        assert!(directive.ceiling.is_some_and(|c| c >= 1), "{directive:?}");
        next_tick();
        runs.report(
            &test,
            1,
            &token,
            report(2, RunnerStage::Running, Some(results(100, 95, 5))),
        )
        .expect("taken");
        for index in 0..2 {
            let abort = runs.directive(&test, index).abort;
            assert!(
                abort
                    .as_deref()
                    .is_some_and(|r| r.starts_with("criticalLoad: error rate")),
                "{abort:?}"
            );
        }
        // The reconciler ends the test; a runner that reports later still hears the
        // abort (not "unknown test"), and nothing it says changes the verdict.
        runs.end(&test);
        next_tick();
        let late = runs
            .report(
                &test,
                0,
                &token,
                report(3, RunnerStage::Running, Some(results(1000, 0, 5))),
            )
            .expect("taken");
        let Answer::Now(directive) = late else {
            panic!("{late:?}");
        };
        assert!(directive.abort.is_some(), "{directive:?}");
    }
}
