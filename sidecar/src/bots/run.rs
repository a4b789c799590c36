//! One run of a `LoadTest` in this process: compile (no I/O, so a broken scenario is
//! refused before any traffic), check that the target answers, run the workload and
//! the invariants until the deadline, check the invariants once more, and hand back
//! the results.

use std::{sync::Arc, time::Duration};

use http::Uri;
use tokio::time::Instant;
use trimtab_api::load_test::LoadTestSpec;

use super::{
    gate::Gate,
    guard::{self, Guard, GuardEvent, GuardState},
    http::BotClient,
    invariants,
    recorder::Recorder,
    results::Results,
    scenario::{CompileError, CompiledInvariant, CompiledScenario},
    shard::Shard,
    user::{JourneyStep, Shared},
    workload::{self, Plan, WorkloadError},
};

/// How a run is told to deviate from the spec, and its knobs that the spec leaves out.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Replaces `spec.target.url` (a local run against a local target).
    pub target: Option<String>,
    /// This process's share.
    pub shard: Shard,
    /// Seeds every user's RNG: the same seed replays the same journeys.
    pub seed: u64,
    /// Replaces `spec.workload.duration`.
    pub duration: Option<Duration>,
    /// Per-request limit. 30 s: past that, a user has given up anyway.
    pub request_timeout: Duration,
    /// Connect limit; also bounds the reachability probe at start.
    pub connect_timeout: Duration,
    /// Journal this user's states and think times.
    pub trace_user: Option<u64>,
    /// Judge `spec.guards` here, on what this process's bots see. Off for a runner under
    /// the operator, which judges every runner's merged results (and the target's CPU).
    pub local_guard: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            target: None,
            shard: Shard::WHOLE,
            seed: 0,
            duration: None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            trace_user: None,
            local_guard: true,
        }
    }
}

/// Why a run did not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The scenario or an invariant does not compile.
    #[error("scenario refused: {0}")]
    Compile(#[from] CompileError),
    /// The workload does not describe a model.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The target URL cannot be used.
    #[error("target.url {url:?}: expected http://HOST[:PORT][/PREFIX]")]
    TargetUrl {
        /// The URL given.
        url: String,
    },
    /// Nothing answers at the target.
    #[error("target {url} is unreachable: {message}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
}

/// A spec compiled for this process, before any I/O.
#[derive(Debug)]
pub struct Compiled {
    scenario: CompiledScenario,
    invariants: Vec<CompiledInvariant>,
    plan: Plan,
    target: TargetUrl,
    duration: Duration,
    guard: Option<(Guard, Duration)>,
    notes: Vec<String>,
}

impl Compiled {
    /// Compiles the scenario and invariants and cuts the workload to the shard.
    pub fn new(spec: &LoadTestSpec, options: &RunOptions) -> Result<Self, RunError> {
        let (scenario, invariants) = CompiledScenario::compile(&spec.scenario, &spec.invariants)?;
        let plan = Plan::for_shard(&spec.workload, options.shard)?;
        let target = TargetUrl::parse(
            options
                .target
                .as_deref()
                .unwrap_or(&spec.target.url)
                .trim_end_matches('/'),
        )?;
        let duration = options.duration.unwrap_or(spec.workload.duration.get());
        let mut notes = Vec::new();
        let local_guards = spec.guards.as_ref().filter(|_| options.local_guard);
        let guard = local_guards.and_then(|guards| {
            let cpu = [&guards.max_load, &guards.critical_load]
                .into_iter()
                .flatten()
                .any(|limits| limits.cpu.is_some());
            if cpu {
                notes.push(
                    "guards: cpu limits need the target pods' metrics, which the operator \
                     reads; this local run guards on errorRate and p99 only"
                        .to_owned(),
                );
            }
            Guard::new(guards, false).map(|guard| (guard, guards.window.get()))
        });
        Ok(Self {
            scenario,
            invariants,
            plan,
            target,
            duration,
            guard,
            notes,
        })
    }

    /// What the run will not do that the spec asks for, and why.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The users this process runs (closed) or may run at once (open).
    pub fn target_users(&self) -> u64 {
        self.plan.target_users()
    }

    /// How long the run lasts.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Checks that the target accepts connections (a TCP connect).
    pub async fn probe(&self, timeout: Duration) -> Result<(), RunError> {
        self.target.probe(timeout).await
    }
}

/// What a finished run hands back.
#[derive(Debug)]
pub struct RunOutput {
    /// Everything measured.
    pub results: Results,
    /// The traced user's journey, when one was asked for.
    pub journey: Vec<JourneyStep>,
    /// Wall time from start to the last invariant check.
    pub elapsed: Duration,
    /// Every hold, resume and abort of the guard.
    pub guard: Vec<GuardEvent>,
}

impl RunOutput {
    /// Why the guard aborted the run, if it did.
    pub fn aborted(&self) -> Option<&str> {
        self.guard
            .iter()
            .find(|e| e.state == GuardState::Aborted)
            .map(|e| e.reason.as_str())
    }
}

/// A run that has started.
#[derive(Debug)]
pub struct Run {
    /// What the users share; the progress bar reads `shared.recorder.live`.
    pub shared: Arc<Shared>,
    invariants: Vec<Arc<CompiledInvariant>>,
    plan: Plan,
    shard: Shard,
    start: Instant,
    guard: Option<(Guard, Duration)>,
}

impl Run {
    /// Checks that the target accepts connections, then fixes the start and deadline.
    pub async fn start(compiled: Compiled, options: &RunOptions) -> Result<Self, RunError> {
        compiled.probe(options.connect_timeout).await?;
        Ok(Self::begin(compiled, options))
    }

    /// Fixes the start (now) and the deadline; nothing is sent until [`Self::finish`].
    pub fn begin(compiled: Compiled, options: &RunOptions) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let names = compiled
            .scenario
            .states
            .iter()
            .map(|s| s.name.clone())
            .collect();
        let recorder = Recorder::new(names, threads);
        for inv in &compiled.invariants {
            recorder.declare_invariant(&inv.name);
        }
        let start = Instant::now();
        let shared = Arc::new(Shared {
            scenario: compiled.scenario,
            client: BotClient::new(
                &compiled.target.authority,
                &compiled.target.address,
                options.connect_timeout,
            ),
            base: compiled.target.url,
            recorder,
            seed: options.seed,
            deadline: start + compiled.duration,
            gate: Gate::default(),
            request_timeout: options.request_timeout,
            trace_user: options.trace_user,
            journey: std::sync::Mutex::default(),
        });
        Self {
            shared,
            invariants: compiled.invariants.into_iter().map(Arc::new).collect(),
            plan: compiled.plan,
            shard: options.shard,
            start,
            guard: compiled.guard,
        }
    }

    /// Runs users, invariants and the guard to the deadline (or an abort), then
    /// checks every invariant once more (unless aborted, before or during these
    /// checks) and returns the results.
    pub async fn finish(self) -> RunOutput {
        let guard = self
            .guard
            .map(|(guard, window)| tokio::spawn(guard::watch(self.shared.clone(), guard, window)));
        let pollers: Vec<_> = self
            .invariants
            .iter()
            .map(|inv| tokio::spawn(invariants::poll(self.shared.clone(), inv.clone())))
            .collect();
        workload::run(self.shared.clone(), self.plan, self.shard, self.start).await;
        for poller in pollers {
            // A poller only ends by returning at the deadline; a join error would be a
            // panic inside it, which the final check below still covers.
            let _ = poller.await;
        }
        // The watch ends at the deadline or with its own abort, as the users did.
        let guard = match guard {
            Some(watch) => watch.await.unwrap_or_default(),
            None => Vec::new(),
        };
        // An aborted run stops sending at once: no closing checks either, and an abort
        // that arrives while they run (an operator's answer to a report, a SIGTERM)
        // cuts them short; a check cut short records nothing.
        if !self.shared.gate.is_aborted() {
            let closing_checks = async {
                for inv in &self.invariants {
                    invariants::check_once(&self.shared, inv).await;
                }
            };
            tokio::select! {
                () = closing_checks => {}
                () = self.shared.gate.aborted() => {}
            }
        }
        let journey = match self.shared.journey.lock() {
            Ok(j) => j.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        RunOutput {
            results: self.shared.recorder.snapshot(),
            journey,
            elapsed: self.start.elapsed(),
            guard,
        }
    }
}

/// Compiles, starts and finishes a run: the whole of `trimtab-bots run` without the
/// progress bar.
pub async fn run(spec: &LoadTestSpec, options: &RunOptions) -> Result<RunOutput, RunError> {
    let compiled = Compiled::new(spec, options)?;
    Ok(Run::start(compiled, options).await?.finish().await)
}

/// The target URL, checked before any traffic: `http://HOST[:PORT][/PREFIX]`.
#[derive(Debug)]
struct TargetUrl {
    /// Without a trailing `/`: paths are appended to it.
    url: String,
    /// `host[:port]` as the URL spells it.
    authority: String,
    /// `host:port`, what the connections go to.
    address: String,
}

impl TargetUrl {
    fn parse(url: &str) -> Result<Self, RunError> {
        let bad = || RunError::TargetUrl {
            url: url.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("http") {
            // The client is plain HTTP/1.1; TLS targets go through the sidecar.
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?;
        if authority.host().is_empty() || authority.as_str().contains('@') {
            return Err(bad());
        }
        // `host()` keeps an IPv6 literal's brackets, as `host:port` needs them.
        let address = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        Ok(Self {
            url: url.to_owned(),
            authority: authority.as_str().to_owned(),
            address,
        })
    }

    /// A TCP connect to the target's host and port.
    async fn probe(&self, timeout: Duration) -> Result<(), RunError> {
        let unreachable = |message: String| RunError::Unreachable {
            url: self.url.clone(),
            message,
        };
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&*self.address)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(unreachable(e.to_string())),
            Err(_) => Err(unreachable(format!("no connection within {timeout:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_url_gives_the_address_the_connections_go_to() {
        let cases = [
            ("http://shop", "shop", "shop:80"),
            (
                "http://127.0.0.1:18081/api",
                "127.0.0.1:18081",
                "127.0.0.1:18081",
            ),
            ("http://[::1]:8080", "[::1]:8080", "[::1]:8080"),
        ];
        for (url, authority, address) in cases {
            let target = TargetUrl::parse(url).expect(url);
            assert_eq!(
                (target.authority.as_str(), target.address.as_str()),
                (authority, address),
                "{url}"
            );
        }
    }

    #[test]
    fn a_target_url_that_is_not_plain_http_to_a_host_is_refused() {
        for url in [
            "https://shop",
            "shop:80",
            "http://user@shop",
            "/relative",
            "http://",
        ] {
            assert!(
                matches!(TargetUrl::parse(url), Err(RunError::TargetUrl { .. })),
                "{url}"
            );
        }
    }
}
