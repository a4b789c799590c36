//! `trimtab-bots`: runs a `LoadTest`'s bot users without a cluster, or as one runner
//! pod of an Indexed Job (`JOB_COMPLETION_INDEX` picks the shard), where it registers
//! with the operator (`--control-plane`), starts with every other runner, and reports
//! its results. SIGTERM or SIGINT stops the run like an abort; the results so far are
//! still written and delivered.
//!
//! ```text
//! trimtab-bots run examples/shop-loadtest.yaml --target http://127.0.0.1:8080 --duration 30s
//! ```
#![forbid(unsafe_code)]

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use trimtab_api::{duration::Duration as SpecDuration, load_test::LoadTestSpec};
use trimtab_sidecar::bots::{
    control::{Control, ControlError, ControlSettings},
    gate::UNLIMITED,
    metrics,
    results::{Results, human},
    run::{Compiled, Run, RunError, RunOptions},
    shard::Shard,
};
use trimtab_sidecar::control_plane::TrustAnchors;

#[derive(Debug, Parser)]
#[command(
    name = "trimtab-bots",
    version,
    about = "Stateful bot users for a Trimtab LoadTest"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a LoadTest's scenario against its target (or --target) until its duration.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A LoadTest YAML file (the whole object, or just its spec).
    loadtest: PathBuf,
    /// Replaces spec.target.url, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "TRIMTAB_TARGET")]
    target: Option<String>,
    /// This runner's share, INDEX/COUNT. Default: JOB_COMPLETION_INDEX of
    /// TRIMTAB_SHARDS (or spec.runners.parallelism) in a Job, else 0/1.
    #[arg(long, env = "TRIMTAB_SHARD")]
    shard: Option<Shard>,
    /// Seeds every user's RNG; the same seed replays the same journeys.
    #[arg(long, env = "TRIMTAB_SEED", default_value_t = 0)]
    seed: u64,
    /// Write the serialized results (mergeable histograms and counters) here.
    #[arg(long, env = "TRIMTAB_JSON")]
    json: Option<PathBuf>,
    /// Replaces spec.workload.duration, e.g. 30s.
    #[arg(long, env = "TRIMTAB_DURATION")]
    duration: Option<SpecDuration>,
    /// Give up on a request after this long.
    #[arg(long, env = "TRIMTAB_REQUEST_TIMEOUT", default_value = "30s")]
    request_timeout: SpecDuration,
    /// Print this user's states and think times at the end (replay with --seed).
    #[arg(long, env = "TRIMTAB_TRACE_USER")]
    trace_user: Option<u64>,
    /// Serve /metrics (Prometheus) and /live on this address while running, e.g.
    /// 127.0.0.1:9464 (0.0.0.0:9464 in a pod).
    #[arg(long, env = "TRIMTAB_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// The operator's HTTPS URL: register there, start together with every other
    /// runner, report results and obey its guards (the operator sets this in a
    /// LoadTest's pods). Needs --test, the token and a CA.
    #[arg(long = "control-plane", env = "TRIMTAB_CONTROL_PLANE_URL", requires_all = ["test", "token"])]
    control_plane: Option<String>,
    /// The CA bundle (PEM file) that signs the operator's certificate.
    #[arg(long, env = "TRIMTAB_CONTROL_PLANE_CA")]
    control_plane_ca: Option<PathBuf>,
    /// The same as PEM text (what the operator sets in runner pods).
    #[arg(
        long,
        env = "TRIMTAB_CONTROL_PLANE_CA_PEM",
        hide_env_values = true,
        conflicts_with = "control_plane_ca"
    )]
    control_plane_ca_pem: Option<String>,
    /// The LoadTest, NAMESPACE/NAME.
    #[arg(long, env = "TRIMTAB_LOADTEST")]
    test: Option<String>,
    /// The LoadTest's runner token.
    #[arg(long, env = "TRIMTAB_LOADTEST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// How often results go to the operator.
    #[arg(long, env = "TRIMTAB_REPORT_INTERVAL", default_value = "2s")]
    report_interval: SpecDuration,
    /// How long to wait for every runner to register.
    #[arg(long, env = "TRIMTAB_START_DEADLINE", default_value = "10m")]
    start_deadline: SpecDuration,
}

/// The run finished, but the guard aborted it (criticalLoad): not a success.
#[derive(Debug, thiserror::Error)]
#[error("aborted by the guard: {0}")]
struct Aborted(String);

/// A signal stopped the run before its end (its results so far were still written
/// and delivered), or before it started: not a success.
#[derive(Debug, thiserror::Error)]
#[error("stopped by {} before the end of the run", .0.name())]
struct Stopped(Signal);

/// A signal that stops the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// What Kubernetes sends when the Job is suspended (an abort) or deleted.
    Terminate,
    /// Ctrl-C in a terminal.
    Interrupt,
}

impl Signal {
    /// As `kill -l` and the logs spell it.
    fn name(self) -> &'static str {
        match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
        }
    }

    /// The exit code of a second signal: 128 + the signal's number, as a shell
    /// reports a process the signal killed.
    fn exit_code(self) -> i32 {
        match self {
            Self::Terminate => 128 + 15,
            Self::Interrupt => 128 + 2,
        }
    }
}

/// Listens for SIGTERM and SIGINT; the receiver holds the first one once it arrived.
///
/// Needed because in a pod this process is PID 1, and the kernel applies no default
/// disposition to PID 1: without a handler SIGTERM is ignored, the pod dies only at
/// the grace period's SIGKILL and its results are lost. The first signal stops the run
/// like an operator's abort, so the results still go out (exit code 6); a second one
/// exits at once, for when delivering them hangs.
fn listen_for_signals() -> std::io::Result<watch::Receiver<Option<Signal>>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (sender, receiver) = watch::channel(None::<Signal>);
    tokio::spawn(async move {
        // One turn per signal received; the second ends the process.
        loop {
            let received = tokio::select! {
                Some(()) = terminate.recv() => Signal::Terminate,
                Some(()) = interrupt.recv() => Signal::Interrupt,
                else => return,
            };
            if let Some(first) = *sender.borrow() {
                eprintln!(
                    "trimtab-bots: {} after {}: exiting now, results not delivered",
                    received.name(),
                    first.name()
                );
                std::process::exit(received.exit_code());
            }
            eprintln!(
                "trimtab-bots: {}: stopping the run; its results are still written and \
                 delivered (another signal exits at once)",
                received.name()
            );
            sender.send_replace(Some(received));
        }
    });
    Ok(receiver)
}

/// Resolves with the first signal (never, should the listener be gone).
async fn stop_signal(mut signals: watch::Receiver<Option<Signal>>) -> Signal {
    let first = signals
        .wait_for(Option::is_some)
        .await
        .map(|signal| *signal);
    match first {
        // `wait_for(Option::is_some)` only returns a `Some`; the default is unreachable.
        Ok(signal) => signal.unwrap_or(Signal::Terminate),
        Err(_) => std::future::pending().await,
    }
}

fn read_spec(path: &Path) -> anyhow::Result<LoadTestSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // Deserialized from the text (not from a Value) so errors keep line and column.
    #[derive(Deserialize)]
    struct Object {
        spec: LoadTestSpec,
    }
    let value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("{}: not YAML", path.display()))?;
    if value.get("spec").is_some() {
        let object: Object = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("{}: not a LoadTest", path.display()))?;
        return Ok(object.spec);
    }
    serde_yaml_ng::from_str::<LoadTestSpec>(&text)
        .with_context(|| format!("{}: not a LoadTest spec", path.display()))
}

/// `--shard`, else `JOB_COMPLETION_INDEX` of `TRIMTAB_SHARDS` (or the spec's runner
/// count), else the whole test.
fn shard(args: &RunArgs, spec: &LoadTestSpec) -> anyhow::Result<Shard> {
    if let Some(shard) = args.shard {
        return Ok(shard);
    }
    let Ok(index) = std::env::var("JOB_COMPLETION_INDEX") else {
        return Ok(Shard::WHOLE);
    };
    let count = match std::env::var("TRIMTAB_SHARDS") {
        Ok(n) => n
            .parse()
            .with_context(|| format!("TRIMTAB_SHARDS={n:?}: expected a runner count"))?,
        Err(_) => spec.runners.parallelism,
    };
    let index = index
        .parse()
        .with_context(|| format!("JOB_COMPLETION_INDEX={index:?}: expected a number"))?;
    Ok(Shard::new(index, count)?)
}

/// mimalloc rather than glibc malloc: a proxied request allocates and frees a few dozen
/// small buffers (headers, URIs, body frames), and glibc's free lists were ~6% of the
/// proxy's CPU under load (see docs/benchmarks.md, "Sidecar proxy overhead"). Called
/// through `trimtab_allocator`, which keeps plain allocations off mimalloc's aligned path.
#[global_allocator]
static ALLOCATOR: trimtab_allocator::Allocator = trimtab_allocator::Allocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Run(args) = cli.command;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trimtab-bots: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<RunError>() {
                // Its message already names the field and the cause.
                Some(run_error) => eprintln!("trimtab-bots: {run_error}"),
                None => eprintln!("trimtab-bots: {e:#}"),
            }
            // 2: the scenario was refused; 3: the target did not answer; 4: the guard
            // aborted the run (criticalLoad); 5: the operator refused this runner or
            // could not be reached; 6: SIGTERM or SIGINT stopped the run (its results
            // were still written and delivered; a second signal exits at once with
            // 128 + its number: 143, 130); 1: anything else.
            let code = match e.downcast_ref::<RunError>() {
                Some(RunError::Compile(_) | RunError::Workload(_)) => 2,
                Some(RunError::Unreachable { .. } | RunError::TargetUrl { .. }) => 3,
                None if e.is::<Aborted>() => 4,
                None if e.is::<ControlError>() => 5,
                None if e.is::<Stopped>() => 6,
                None => 1,
            };
            ExitCode::from(code)
        }
    }
}

/// The operator's side of the run, when `--control-plane` is set.
fn control(args: &RunArgs, shard: Shard) -> anyhow::Result<Option<Arc<Control>>> {
    let Some(url) = &args.control_plane else {
        return Ok(None);
    };
    let anchors = match (&args.control_plane_ca, &args.control_plane_ca_pem) {
        (Some(file), _) => TrustAnchors::File(file.clone()),
        (None, Some(pem)) => TrustAnchors::Pem(pem.clone()),
        (None, None) => anyhow::bail!(
            "--control-plane needs the CA that signs the operator's certificate: \
             --control-plane-ca FILE or TRIMTAB_CONTROL_PLANE_CA_PEM"
        ),
    };
    let control = Control::new(ControlSettings {
        url: url.clone(),
        anchors,
        test: args.test.clone().unwrap_or_default(),
        index: shard.index,
        token: args.token.clone().unwrap_or_default(),
        start_deadline: args.start_deadline.get(),
        finish_deadline: Duration::from_secs(60),
    })?;
    Ok(Some(Arc::new(control)))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let signals = listen_for_signals().context("listening for SIGTERM and SIGINT")?;
    let spec = read_spec(&args.loadtest)?;
    let shard = shard(&args, &spec)?;
    let control = control(&args, shard)?;
    let options = RunOptions {
        target: args.target.clone(),
        shard,
        seed: args.seed,
        duration: args.duration.map(SpecDuration::get),
        request_timeout: args.request_timeout.get(),
        trace_user: args.trace_user,
        local_guard: control.is_none(),
        ..RunOptions::default()
    };
    let compiled = Compiled::new(&spec, &options)?;
    for note in compiled.notes() {
        eprintln!("trimtab-bots: note: {note}");
    }
    let (target_users, duration) = (compiled.target_users(), compiled.duration());
    // Bound before the run starts, so a port in use is an error, not a silent gap.
    let metrics = match args.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?,
        ),
        None => None,
    };
    let begin = async {
        anyhow::Ok(match &control {
            None => Run::start(compiled, &options).await?,
            Some(control) => {
                // Only a runner that can run registers: a broken target fails it first.
                compiled.probe(options.connect_timeout).await?;
                let start = control.register(target_users).await?;
                if let Ok(ahead) = start.duration_since(SystemTime::now()) {
                    tokio::time::sleep(ahead).await;
                }
                Run::begin(compiled, &options)
            }
        })
    };
    // Stopped before the start (a registration can wait minutes): nothing to report.
    let run = tokio::select! {
        run = begin => run?,
        signal = stop_signal(signals.clone()) => return Err(Stopped(signal).into()),
    };
    let started = SystemTime::now();
    let shared = run.shared.clone();
    // A signal stops the run as an abort does: nobody sends again, no closing checks,
    // and the results so far are written and delivered below.
    let abort_on_signal = {
        let (shared, signals) = (shared.clone(), signals.clone());
        tokio::spawn(async move {
            stop_signal(signals).await;
            shared.gate.abort();
        })
    };
    // Cancelled once the run has finished, closing checks included: the reporter
    // follows the operator (and its abort) until then.
    let finished = CancellationToken::new();
    if let Some(listener) = metrics {
        tokio::spawn(metrics::serve(listener, shared.clone()));
    }
    let reporter = control.clone().map(|control| {
        if control.aborted().is_some() {
            shared.gate.abort();
        }
        tokio::spawn(control.follow(
            shared.clone(),
            started,
            target_users,
            args.report_interval.get(),
            finished.clone(),
        ))
    });

    let bar = progress_bar(duration);
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut last = (tokio::time::Instant::now(), 0u64);
            let mut interval = tokio::time::interval(Duration::from_millis(500));
            loop {
                interval.tick().await;
                let live = &shared.recorder.live;
                let requests = live.requests.load(Relaxed);
                let now = tokio::time::Instant::now();
                let secs = (now - last.0).as_secs_f64().max(1e-3);
                let rps = (requests - last.1) as f64 / secs;
                last = (now, requests);
                bar.set_position(
                    now.saturating_duration_since(shared.deadline - duration)
                        .as_secs(),
                );
                let guard = match shared.gate.ceiling() {
                    _ if shared.gate.is_aborted() => " · ABORTED".to_owned(),
                    UNLIMITED => String::new(),
                    ceiling => format!(" · holding at {ceiling} users"),
                };
                bar.set_message(format!(
                    "users {}/{} · {:.0} rps · p99 {} · errors {} · violations {}{guard}",
                    live.active_users.load(Relaxed),
                    target_users,
                    rps,
                    human(shared.recorder.p99()),
                    live.failures.load(Relaxed),
                    live.violations.load(Relaxed),
                ));
            }
        })
    };
    let output = run.finish().await;
    // Only a signal that arrived before the run finished stopped it; one during the
    // delivery below changes nothing (a second one exits).
    let stopped = *signals.borrow();
    abort_on_signal.abort();
    finished.cancel();
    ticker.abort();
    bar.finish_and_clear();
    if let Some(reporter) = reporter {
        // It ends now, with at most a report dropped on its way.
        let _ = reporter.await;
    }

    print!("{}", table(&output.results, output.elapsed));
    for event in &output.guard {
        let ceiling = event
            .ceiling
            .map(|c| format!(" at {c} users"))
            .unwrap_or_default();
        println!(
            "guard {:>7.1} s: {:?}{ceiling} {}",
            event.at_seconds, event.state, event.reason
        );
    }
    if !output.journey.is_empty() {
        println!("\njourney of user {}:", args.trace_user.unwrap_or_default());
        for step in &output.journey {
            println!("  {:<20} think {}", step.state, human(step.think));
        }
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&output.results)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(control) = &control {
        control
            .finish(output.results.clone(), started, target_users)
            .await?;
        if let Some(reason) = control.aborted() {
            return Err(Aborted(reason).into());
        }
    }
    if let Some(reason) = output.aborted() {
        return Err(Aborted(reason.to_owned()).into());
    }
    match stopped {
        Some(signal) => Err(Stopped(signal).into()),
        None => Ok(()),
    }
}

fn progress_bar(duration: Duration) -> ProgressBar {
    let bar = ProgressBar::new(duration.as_secs().max(1));
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}

/// The final table: per state and overall, latency from the intended start.
fn table(results: &Results, elapsed: Duration) -> String {
    let mut out = results.latency_table();
    let f = &results.failures;
    out += &format!(
        "\n{:.1} s, {:.0} requests/s; sessions {} started, {} completed; dropped arrivals {}\n",
        elapsed.as_secs_f64(),
        results.requests as f64 / elapsed.as_secs_f64().max(1e-3),
        results.sessions_started,
        results.sessions_completed,
        results.dropped_arrivals,
    );
    out += &format!(
        "checks {} passed, {} failed; failures: connect {}, timeout {}, status {}, check {}, render {}, transport {}\n",
        results.checks_passed,
        results.checks_failed,
        f.connect,
        f.timeout,
        f.status,
        f.check,
        f.render,
        f.transport
    );
    out += &format!(
        "raw p99 (from send) {} vs corrected p99 (from intended start) {}\n",
        human(results.latency.raw.quantile(0.99)),
        human(results.latency.corrected.quantile(0.99)),
    );
    for (name, inv) in &results.invariants {
        out += &format!(
            "invariant {name}: {} checks, {} violations\n",
            inv.checks, inv.violations
        );
        for e in &inv.examples {
            out += &format!(
                "  {} → {:?}: {}\n    {}\n",
                e.request, e.status, e.detail, e.response
            );
        }
    }
    if !results.failure_examples.is_empty() {
        out += "first failures:\n";
        for e in results.failure_examples.iter().take(5) {
            out += &format!(
                "  user {} in {}: {} → {:?}: {}\n    {}\n",
                e.user, e.state, e.request, e.status, e.detail, e.response
            );
        }
    }
    out
}
