//! Balancing quality and reaction of the sidecar's six algorithms, measured in one
//! process against three shops of capacities 1:2:4.
//!
//! - **Quality:** the shops (worker slots × service time, utilization in ORCA
//!   `endpoint-load-metrics` headers) sit behind an in-process sidecar, one fresh
//!   sidecar and fresh shops per algorithm. Bot users offer `--load` (70%) of the total
//!   capacity as an open model (Poisson arrivals at a fixed rate, so a slow proxy does
//!   not lower the offered load, and latency counted from each request's intended start,
//!   corrected for coordinated omission). After `--warmup` the next `--duration` seconds
//!   are measured: rate, p50/p99/p99.9, errors, each shop's share of the requests the
//!   sidecar sent (its per-endpoint counters: answered plus in flight) and mean
//!   utilization (the shops' own meters), and p99 as a ratio of roundRobin's and of
//!   weightedRoundRobin with the oracle weights 1:2:4. Also from when on the split
//!   stayed within `--band` of 1:2:4 (cpuWeighted starts from a static policy's equal
//!   weights and has to learn it).
//! - **Reaction:** cpuWeighted (and peakEwma for comparison) at the same load; at
//!   `--reaction-before` seconds one shop's capacity is cut (the capacity-4 one, halved,
//!   by default). Every `--sample-ms` the shares over the last `--share-window-ms` are
//!   taken; the report says when the cut shop's share entered and stayed within
//!   `--band` (±5%, relative) of its final value (its share over the last
//!   `--final-window` seconds), in seconds and in cpuWeighted update periods
//!   (`weighting.interval`, `--update-period-ms`), and how far it went past that value.
//!
//! Everything listens on 127.0.0.1; every load loop ends by its deadline and every
//! sampling loop after a fixed number of ticks. Prints Markdown tables on stdout and
//! progress on stderr. Run it with `bench/balancing.sh`, which passes its arguments on:
//! `cargo bench -p trimtab-sidecar --bench balancing -- --help` lists them.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use shop::{Shop, ShopHandle};
use tokio::runtime::Runtime;
use trimtab_api::{LoadTestSpec, balancer_policy::Algorithm, sidecar_config::SidecarConfig};
use trimtab_sidecar::{
    bots::{
        results::Results,
        run::{Compiled, Run, RunOptions},
    },
    config_source::parse_policies,
    metrics::Metrics,
    route::RouteRuntime,
    sidecar::{Options, Sidecar},
};

/// The shops' capacities: three node sizes, 1:2:4.
const CAPACITIES: [f64; 3] = [1.0, 2.0, 4.0];
/// weightedRoundRobin's static weights: the capacities, what an oracle would configure.
const ORACLE_WEIGHTS: [u32; 3] = [1, 2, 4];
/// The quality runs, in table order.
const ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RoundRobin,
    Algorithm::WeightedRoundRobin,
    Algorithm::LeastConnections,
    Algorithm::LeastRequest,
    Algorithm::PeakEwma,
    Algorithm::CpuWeighted,
];
/// The reaction runs.
const REACTING: [Algorithm; 2] = [Algorithm::CpuWeighted, Algorithm::PeakEwma];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Quality,
    Reaction,
    All,
}

/// Balancing quality and reaction of trimtab-sidecar's algorithms (see the file's docs).
#[derive(Debug, Parser)]
#[command(name = "balancing")]
struct Args {
    /// Which measurement to run.
    #[arg(long, value_enum, default_value = "all")]
    part: Part,
    /// Offered load as a share of the three shops' total capacity.
    #[arg(long, default_value_t = 0.7)]
    load: f64,
    /// Worker slots of the capacity-1 shop (the others have 2× and 4×).
    #[arg(long, default_value_t = 4)]
    base_workers: u32,
    /// How long each request holds a worker slot, in milliseconds (a timer, not CPU).
    #[arg(long, default_value_t = 20)]
    service_time_ms: u64,
    /// cpuWeighted's weight update period (`weighting.interval`), in milliseconds.
    #[arg(long, default_value_t = 1000)]
    update_period_ms: u64,
    /// Quality: seconds of load before measuring (cpuWeighted learns its weights).
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Quality: seconds measured per algorithm.
    #[arg(long, default_value_t = 15)]
    duration: u64,
    /// Reaction: seconds of load before the capacity cut (cpuWeighted learns its weights).
    #[arg(long, default_value_t = 20)]
    reaction_before: u64,
    /// Reaction: seconds of load after the capacity cut.
    #[arg(long, default_value_t = 12)]
    reaction_after: u64,
    /// Reaction: which shop is cut, by index (0, 1, 2 = capacities 1, 2, 4).
    #[arg(long, default_value_t = 2)]
    reaction_shop: usize,
    /// Reaction: the cut shop's capacity is multiplied by this.
    #[arg(long, default_value_t = 0.5)]
    reaction_factor: f64,
    /// How often the shares are sampled, in milliseconds.
    #[arg(long, default_value_t = 250)]
    sample_ms: u64,
    /// Each share sample covers the requests of this many milliseconds.
    #[arg(long, default_value_t = 1000)]
    share_window_ms: u64,
    /// Reaction: the final share is the share over this many last seconds.
    #[arg(long, default_value_t = 5)]
    final_window: u64,
    /// Settled means within ± this fraction of the final share (reaction) or of the
    /// capacity share (quality).
    #[arg(long, default_value_t = 0.05)]
    band: f64,
    /// More `spec.weighting` fields, as YAML flow-map entries appended to
    /// `source: loadReports, interval: …`, e.g. `maxLoad: 0.9, criticalLoad: 0.97`.
    #[arg(long, default_value = "")]
    weighting: String,
    /// The shops' `utilization_window`: the time constant of the utilization and rate
    /// averages they report in ORCA headers, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    utilization_window_ms: u64,
    /// Worker threads of the sidecar's runtime (the sidecar binary's default: one per CPU).
    #[arg(long)]
    sidecar_threads: Option<usize>,
    /// Worker threads of the bot users' runtime.
    #[arg(long, default_value_t = 1)]
    bots_threads: usize,
    /// Seeds the arrivals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run only these algorithms (comma-separated names as in YAML, e.g. `cpuWeighted`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Print every run's samples (shares, utilization, weights) once a second on stderr.
    #[arg(long)]
    trace: bool,
    /// Passed by `cargo bench`; without it (`cargo test --benches`) nothing runs.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Args {
    fn service_time(&self) -> Duration {
        Duration::from_millis(self.service_time_ms)
    }

    /// Requests per second a capacity-1 shop serves at full utilization.
    fn unit_rps(&self) -> f64 {
        f64::from(self.base_workers) / self.service_time().as_secs_f64()
    }

    /// The offered load in requests per second.
    fn offered_rps(&self) -> f64 {
        self.load * self.unit_rps() * CAPACITIES.iter().sum::<f64>()
    }

    fn update_period(&self) -> Duration {
        Duration::from_millis(self.update_period_ms)
    }

    fn selects(&self, algorithm: Algorithm) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == algorithm.as_str())
    }

    fn check(&self) -> Result<()> {
        if let Some(unknown) = self
            .only
            .iter()
            .find(|o| !ALGORITHMS.iter().any(|a| a.as_str() == o.as_str()))
        {
            bail!("--only {unknown}: expected algorithm names such as roundRobin or cpuWeighted");
        }
        if !(self.load > 0.0 && self.load <= 2.0) {
            bail!(
                "--load {}: expected a share of capacity in (0, 2]",
                self.load
            );
        }
        if self.base_workers == 0 || self.service_time_ms == 0 {
            bail!("--base-workers and --service-time-ms: expected at least 1");
        }
        if self.duration == 0 || self.reaction_before == 0 || self.reaction_after == 0 {
            bail!("--duration, --reaction-before and --reaction-after: expected at least 1 s");
        }
        if self.reaction_shop >= CAPACITIES.len() {
            bail!(
                "--reaction-shop {}: expected 0, 1 or 2 (capacities 1, 2, 4)",
                self.reaction_shop
            );
        }
        if !(self.reaction_factor > 0.0 && self.reaction_factor.is_finite()) {
            bail!(
                "--reaction-factor {}: expected more than 0",
                self.reaction_factor
            );
        }
        if self.sample_ms == 0 || self.share_window_ms < self.sample_ms {
            bail!("--sample-ms: at least 1, and --share-window-ms: at least --sample-ms");
        }
        if self.final_window == 0 || self.final_window >= self.reaction_after {
            bail!("--final-window: at least 1 s and shorter than --reaction-after");
        }
        if self.update_period_ms == 0 {
            bail!("--update-period-ms: expected at least 1");
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.bench {
        println!("balancing: a benchmark; run it with bench/balancing.sh or `cargo bench`");
        return Ok(());
    }
    args.check()?;
    println!("{}", describe(&args));
    if matches!(args.part, Part::Quality | Part::All) {
        let mut rows = Vec::new();
        for algorithm in ALGORITHMS.into_iter().filter(|a| args.selects(*a)) {
            eprintln!("quality: {} ...", algorithm.as_str());
            let row = quality_run(&args, algorithm)
                .with_context(|| format!("quality run of {}", algorithm.as_str()))?;
            eprintln!("  {row:?}");
            rows.push(row);
        }
        println!("{}", quality_table(&args, &rows));
    }
    if matches!(args.part, Part::Reaction | Part::All) {
        let mut runs = Vec::new();
        for algorithm in REACTING.into_iter().filter(|a| args.selects(*a)) {
            eprintln!("reaction: {} ...", algorithm.as_str());
            let run = reaction_run(&args, algorithm)
                .with_context(|| format!("reaction run of {}", algorithm.as_str()))?;
            runs.push(run);
        }
        println!("{}", reaction_tables(&args, &runs));
    }
    Ok(())
}

/// The setup, as the line above the tables.
fn describe(args: &Args) -> String {
    let workers: Vec<String> = CAPACITIES
        .iter()
        .map(|c| (c * f64::from(args.base_workers)).round().to_string())
        .collect();
    format!(
        "Three shops of capacities 1:2:4 ({} worker slots × {} ms service time = {:.0}/{:.0}/{:.0} req/s), \
         {:.0}% of their {:.0} req/s offered ({:.0} req/s, open model, Poisson arrivals, GET /api/products/1), \
         through an in-process trimtab-sidecar; cpuWeighted updates its weights every {} ms from the shops' \
         ORCA reports (utilization averaged over {} ms){}. {} cores shared by everything.\n",
        workers.join("/"),
        args.service_time_ms,
        args.unit_rps() * CAPACITIES[0],
        args.unit_rps() * CAPACITIES[1],
        args.unit_rps() * CAPACITIES[2],
        args.load * 100.0,
        args.unit_rps() * CAPACITIES.iter().sum::<f64>(),
        args.offered_rps(),
        args.update_period_ms,
        args.utilization_window_ms,
        if args.weighting.trim().is_empty() {
            String::new()
        } else {
            format!(", weighting {{{}}}", args.weighting.trim())
        },
        std::thread::available_parallelism().map_or(1, usize::from),
    )
}

// --- the pieces: shops, sidecar, bot users ------------------------------------------

/// Three shops, each on its own one-thread runtime so that they do not take the
/// proxy's threads (they emulate capacity with timers and need little CPU).
struct Backends {
    shops: Arc<Vec<ShopHandle>>,
    runtimes: Vec<Runtime>,
}

impl Backends {
    fn start(args: &Args) -> Result<Self> {
        let mut shops = Vec::new();
        let mut runtimes = Vec::new();
        for (i, capacity) in CAPACITIES.iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(format!("shop-{i}"))
                .enable_all()
                .build()
                .context("cannot start a shop's runtime")?;
            let config = shop::Config {
                capacity: *capacity,
                base_workers: args.base_workers,
                service_time: args.service_time(),
                utilization_window: Duration::from_millis(args.utilization_window_ms),
                ..shop::Config::ephemeral()
            };
            let (_, handle) = runtime
                .block_on(Shop::bind(config))
                .context("cannot start a shop")?;
            shops.push(handle);
            runtimes.push(runtime);
        }
        Ok(Self {
            shops: Arc::new(shops),
            runtimes,
        })
    }

    fn addresses(&self) -> Vec<SocketAddr> {
        self.shops.iter().map(ShopHandle::local_addr).collect()
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        // Cancel the shops first (dropping a handle stops its shop), then end their
        // runtimes without waiting for queued requests.
        self.shops = Arc::new(Vec::new());
        for runtime in self.runtimes.drain(..) {
            runtime.shutdown_background();
        }
    }
}

/// A sidecar serving one route over the shops, on its own runtime.
struct Proxy {
    /// `None` only while dropping.
    runtime: Option<Runtime>,
    /// Kept alive: dropping it would stop its listeners.
    _sidecar: Arc<Sidecar>,
    port: u16,
    route: Arc<RouteRuntime>,
}

impl Proxy {
    fn start(args: &Args, algorithm: Algorithm, shops: &[SocketAddr]) -> Result<Self> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(threads) = args.sidecar_threads {
            builder.worker_threads(threads.max(1));
        }
        let runtime = builder
            .thread_name("sidecar")
            .enable_all()
            .build()
            .context("cannot start the sidecar's runtime")?;
        let port = free_port()?;
        let config = sidecar_config(args, port, algorithm, shops)?;
        let sidecar = Sidecar::new(
            Options {
                listen_address: [127, 0, 0, 1].into(),
                max_request_body: 64 << 20,
                max_header_bytes: 64 << 10,
                state_dir: None,
            },
            Metrics::new()?,
        );
        runtime
            .block_on(sidecar.apply(config))
            .context("the sidecar refused the config")?;
        let route = sidecar
            .shared()
            .route(port)
            .context("the applied config has no route on its port")?;
        Ok(Self {
            runtime: Some(runtime),
            _sidecar: sidecar,
            port,
            route,
        })
    }

    /// Requests sent to each endpoint so far: the responses (and failed attempts) the
    /// sidecar counted plus the requests in flight. What the balancer decided, whether
    /// or not the endpoint has answered yet: counting only responses would show a
    /// saturated endpoint's capacity, not its traffic.
    fn sent(&self) -> [u64; 3] {
        std::array::from_fn(|i| {
            self.route.endpoints.get(i).map_or(0, |e| {
                e.responses.load(std::sync::atomic::Ordering::Relaxed) + u64::from(e.load.active())
            })
        })
    }

    /// The weights the balancer uses now (cpuWeighted's live weights).
    fn weights(&self) -> [u32; 3] {
        std::array::from_fn(|i| self.route.endpoints.get(i).map_or(0, |e| e.load.weight()))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Listeners, connections and the weight updater end with the runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A port for the sidecar's listener (the config needs a fixed port, not 0).
fn free_port() -> Result<u16> {
    trimtab_test_ports::try_free_port().context("cannot find a free port")
}

/// The route as a BalancerPolicy with static endpoints would give it, with the oracle
/// weights for weightedRoundRobin (a static policy's endpoints all weigh 1).
fn sidecar_config(
    args: &Args,
    port: u16,
    algorithm: Algorithm,
    shops: &[SocketAddr],
) -> Result<SidecarConfig> {
    let endpoints: Vec<String> = shops.iter().map(|a| format!("\"{a}\"")).collect();
    let yaml = format!(
        "apiVersion: trimtab.dev/v1alpha1
kind: BalancerPolicy
metadata: {{name: balancing, namespace: bench}}
spec:
  clients: {{podSelector: {{}}}}
  listener: {{port: {port}}}
  endpoints: [{endpoints}]
  algorithm: {algorithm}
  weighting: {{source: loadReports, interval: {period}ms{extra}}}
",
        endpoints = endpoints.join(", "),
        algorithm = algorithm.as_str(),
        period = args.update_period_ms,
        extra = if args.weighting.trim().is_empty() {
            String::new()
        } else {
            format!(", {}", args.weighting.trim())
        },
    );
    let mut routes = parse_policies(&yaml, Path::new("balancing.yaml"))?;
    if algorithm == Algorithm::WeightedRoundRobin {
        for (endpoint, weight) in routes
            .iter_mut()
            .flat_map(|r| r.endpoints.iter_mut())
            .zip(ORACLE_WEIGHTS)
        {
            endpoint.weight = weight;
        }
    }
    Ok(SidecarConfig { version: 1, routes })
}

/// The bot users' LoadTest: one state, one GET, no think time, no checks (a status of
/// 400 or more still counts as a failure).
fn load_test(args: &Args, port: u16, duration: Duration) -> Result<LoadTestSpec> {
    let yaml = format!(
        "target: {{url: \"http://127.0.0.1:{port}\"}}
workload: {{arrivalRate: \"{rate:.1}/s\", maxUsers: 100000, rampUp: 0s, duration: {ms}ms}}
scenario:
  start: get
  states:
  - name: get
    request: {{method: GET, path: /api/products/1}}
",
        rate = args.offered_rps(),
        ms = duration.as_millis(),
    );
    serde_yaml_ng::from_str(&yaml).context("the bench's LoadTest does not parse")
}

// --- one run: load, sampling, snapshots ---------------------------------------------

/// What the sampler saw at one tick.
#[derive(Debug, Clone)]
struct Tick {
    /// Since the load started.
    at: Duration,
    /// Requests sent to each endpoint so far.
    sent: [u64; 3],
    /// The shops' reported utilization.
    utilization: [f64; 3],
    /// The balancer's weights.
    weights: [u32; 3],
}

/// A capacity change during a run.
#[derive(Debug, Clone, Copy)]
struct Cut {
    at: Duration,
    shop: usize,
    capacity: f64,
}

/// Everything one run measured.
struct Measured {
    ticks: Vec<Tick>,
    /// Bot results at each mark, then at the end.
    snapshots: Vec<(Duration, Results)>,
}

/// Offers the load for `duration` through `proxy`, sampling every `sample`, snapshotting
/// the bot results at each of `marks` and applying `cut`.
fn drive(
    args: &Args,
    backends: &Backends,
    proxy: &Proxy,
    duration: Duration,
    marks: &[Duration],
    cut: Option<Cut>,
) -> Result<Measured> {
    let spec = load_test(args, proxy.port, duration)?;
    let options = RunOptions {
        seed: args.seed,
        ..RunOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.bots_threads.max(1))
        .thread_name("bots")
        .enable_all()
        .build()
        .context("cannot start the bot users' runtime")?;
    let sample = Duration::from_millis(args.sample_ms);
    let measured = runtime.block_on(async {
        let compiled = Compiled::new(&spec, &options)?;
        let run = Run::start(compiled, &options).await?;
        let start = Instant::now();
        let shared = Arc::clone(&run.shared);
        let shops = Arc::clone(&backends.shops);
        let sampler = async {
            let mut ticks = Vec::new();
            let mut snapshots = Vec::new();
            let mut marks = marks.iter().copied().peekable();
            let mut cut = cut;
            let mut interval = tokio::time::interval(sample);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Bounded: one tick per sample period of the run, plus the first.
            let count = duration.as_millis() / sample.as_millis().max(1) + 1;
            for _ in 0..count {
                interval.tick().await;
                let at = start.elapsed();
                while let Some(mark) = marks.next_if(|m| *m <= at) {
                    snapshots.push((mark, shared.recorder.snapshot()));
                }
                if let Some(c) = cut.filter(|c| c.at <= at) {
                    if let Some(shop) = shops.get(c.shop)
                        && let Err(e) = shop.set_capacity(c.capacity)
                    {
                        eprintln!("  could not change the capacity: {e}");
                    }
                    eprintln!(
                        "  {:.2} s: shop {} capacity → {}",
                        at.as_secs_f64(),
                        c.shop,
                        c.capacity
                    );
                    cut = None;
                }
                ticks.push(Tick {
                    at,
                    sent: proxy.sent(),
                    utilization: std::array::from_fn(|i| {
                        shops.get(i).map_or(0.0, |s| s.load().utilization)
                    }),
                    weights: proxy.weights(),
                });
            }
            (ticks, snapshots)
        };
        let (output, (ticks, mut snapshots)) = tokio::join!(run.finish(), sampler);
        snapshots.push((output.elapsed, output.results));
        if args.trace {
            trace(&ticks, sample);
        }
        anyhow::Ok(Measured { ticks, snapshots })
    })?;
    runtime.shutdown_background();
    Ok(measured)
}

/// Once a second: the shares of the last second, the shops' utilization and the
/// balancer's weights.
fn trace(ticks: &[Tick], sample: Duration) {
    let per_second = (1000 / sample.as_millis().max(1)).max(1) as usize;
    for pair in ticks
        .iter()
        .step_by(per_second)
        .collect::<Vec<_>>()
        .windows(2)
    {
        let [from, to] = pair else { continue };
        eprintln!(
            "  {:5.1} s  share {}  utilization {}  weights {:?}",
            to.at.as_secs_f64(),
            percents(&shares(from, to)),
            fractions(&to.utilization),
            to.weights,
        );
    }
}

/// Requests, failures and latency between two snapshots of the bot results.
#[derive(Debug, Clone)]
struct Window {
    seconds: f64,
    requests: u64,
    failures: u64,
    dropped: u64,
    latency: Histogram<u64>,
}

impl Window {
    fn between(from: &(Duration, Results), to: &(Duration, Results)) -> Result<Self> {
        let mut latency = to.1.latency.corrected.0.clone();
        latency
            .subtract(&from.1.latency.corrected.0)
            .context("latency histograms of one run do not subtract")?;
        Ok(Self {
            seconds: (to.0 - from.0).as_secs_f64(),
            requests: to.1.requests - from.1.requests,
            failures: to.1.failures.total() - from.1.failures.total(),
            dropped: to.1.dropped_arrivals - from.1.dropped_arrivals,
            latency,
        })
    }

    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }

    /// Milliseconds at `quantile`, from microseconds.
    fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Each endpoint's share of the responses between two ticks.
fn shares(from: &Tick, to: &Tick) -> [f64; 3] {
    let delta: [u64; 3] = std::array::from_fn(|i| to.sent[i].saturating_sub(from.sent[i]));
    let total: u64 = delta.iter().sum();
    std::array::from_fn(|i| {
        if total == 0 {
            0.0
        } else {
            delta[i] as f64 / total as f64
        }
    })
}

/// Shares over sliding windows of `window` that end after `after`, each placed at the
/// middle of its window (seconds since the load started).
fn sliding_shares(ticks: &[Tick], window: Duration, after: Duration) -> Vec<(f64, [f64; 3])> {
    ticks
        .iter()
        .filter(|t| t.at > after && t.at >= window)
        .filter_map(|t| {
            let from = tick_at(ticks, t.at - window)?;
            Some((
                (t.at.as_secs_f64() + from.at.as_secs_f64()) / 2.0,
                shares(from, t),
            ))
        })
        .collect()
}

/// The time of the first sample from which every later one is `ok`; `None` when the
/// last one is not.
fn settled_from<T>(series: &[(f64, T)], ok: impl Fn(&T) -> bool) -> Option<f64> {
    match series.iter().rposition(|(_, v)| !ok(v)) {
        None => series.first().map(|(t, _)| *t),
        Some(i) => series.get(i + 1).map(|(t, _)| *t),
    }
}

/// The tick closest to `at`.
fn tick_at(ticks: &[Tick], at: Duration) -> Option<&Tick> {
    ticks.iter().min_by_key(|t| t.at.abs_diff(at))
}

// --- quality ------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct QualityRow {
    algorithm: Algorithm,
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    failures: u64,
    dropped: u64,
    share: [f64; 3],
    utilization: [f64; 3],
    /// Seconds since the load started from which the split stayed within the band of
    /// the capacity split.
    converged: Option<f64>,
}

fn quality_run(args: &Args, algorithm: Algorithm) -> Result<QualityRow> {
    let backends = Backends::start(args)?;
    let proxy = Proxy::start(args, algorithm, &backends.addresses())?;
    let warmup = Duration::from_secs(args.warmup);
    let duration = warmup + Duration::from_secs(args.duration);
    let measured = drive(args, &backends, &proxy, duration, &[warmup], None)?;
    let [from, to] = measured.snapshots.as_slice() else {
        bail!("expected two snapshots, got {}", measured.snapshots.len());
    };
    let window = Window::between(from, to)?;
    let in_window: Vec<&Tick> = measured.ticks.iter().filter(|t| t.at >= warmup).collect();
    let (first, last) = match (in_window.first(), in_window.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => bail!("no samples after the warm-up"),
    };
    let n = in_window.len().max(1) as f64;
    let total: f64 = CAPACITIES.iter().sum();
    let series = sliding_shares(
        &measured.ticks,
        Duration::from_millis(args.share_window_ms),
        Duration::ZERO,
    );
    let converged = settled_from(&series, |s| {
        s.iter()
            .zip(CAPACITIES)
            .all(|(share, c)| (share - c / total).abs() <= args.band * c / total)
    });
    Ok(QualityRow {
        converged,
        algorithm,
        rps: window.rps(),
        p50: window.ms(0.5),
        p99: window.ms(0.99),
        p999: window.ms(0.999),
        failures: window.failures,
        dropped: window.dropped,
        share: shares(first, last),
        utilization: std::array::from_fn(|i| {
            in_window.iter().map(|t| t.utilization[i]).sum::<f64>() / n
        }),
    })
}

fn quality_table(args: &Args, rows: &[QualityRow]) -> String {
    let p99_of = |a: Algorithm| rows.iter().find(|r| r.algorithm == a).map(|r| r.p99);
    let rr = p99_of(Algorithm::RoundRobin);
    let oracle = p99_of(Algorithm::WeightedRoundRobin);
    let ratio = |p99: f64, base: Option<f64>| match base {
        Some(b) if b > 0.0 => format!("{:.2}", p99 / b),
        _ => "–".to_owned(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Balancing quality: {:.0} req/s offered ({:.0}% of capacity), {} s warm-up, {} s measured per algorithm\n",
        args.offered_rps(),
        args.load * 100.0,
        args.warmup,
        args.duration,
    );
    let _ = writeln!(
        out,
        "| algorithm | req/s | p50 ms | p99 ms | p99.9 ms | errors | share 1:2:4 (ideal 14/29/57%) | utilization 1:2:4 | split within ±{band:.0}% of 1:2:4 from | p99 ÷ roundRobin | p99 ÷ oracle |",
        band = args.band * 100.0,
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"
    );
    for r in rows {
        let name = if r.algorithm == Algorithm::WeightedRoundRobin {
            "weightedRoundRobin (oracle 1:2:4)".to_owned()
        } else {
            r.algorithm.as_str().to_owned()
        };
        let errors = if r.dropped > 0 {
            format!("{} (+{} dropped)", r.failures, r.dropped)
        } else {
            r.failures.to_string()
        };
        let _ = writeln!(
            out,
            "| {name} | {:.0} | {:.1} | {:.1} | {:.1} | {errors} | {} | {} | {} | {} | {} |",
            r.rps,
            r.p50,
            r.p99,
            r.p999,
            percents(&r.share),
            fractions(&r.utilization),
            r.converged
                .map_or_else(|| "never".to_owned(), |t| format!("{t:.1} s")),
            ratio(r.p99, rr),
            ratio(r.p99, oracle),
        );
    }
    let verdict = |a: Algorithm| {
        let p99 = p99_of(a)?;
        Some(format!(
            "{} p99 ÷ roundRobin {} (target ≤ 0.5)",
            a.as_str(),
            ratio(p99, rr)
        ))
    };
    let mut lines: Vec<String> = [Algorithm::CpuWeighted, Algorithm::PeakEwma]
        .into_iter()
        .filter_map(verdict)
        .collect();
    if let Some(cpu) = p99_of(Algorithm::CpuWeighted) {
        lines.push(format!(
            "cpuWeighted p99 ÷ oracle {} (target ≤ 1.2)",
            ratio(cpu, oracle)
        ));
    }
    if let Some(cpu) = rows.iter().find(|r| r.algorithm == Algorithm::CpuWeighted) {
        let period = args.update_period().as_secs_f64();
        lines.push(match cpu.converged {
            Some(t) => format!(
                "cpuWeighted, starting from a static policy's equal weights, held the 1:2:4 split from {t:.1} s = {:.1} update periods",
                t / period
            ),
            None => "cpuWeighted never held the 1:2:4 split".to_owned(),
        });
    }
    let _ = writeln!(out, "\n{}.", lines.join("; "));
    out
}

fn percents(values: &[f64; 3]) -> String {
    values
        .iter()
        .map(|v| format!("{:.0}%", v * 100.0))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn fractions(values: &[f64; 3]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

// --- reaction -----------------------------------------------------------------------

#[derive(Debug, Clone)]
struct ReactionRun {
    algorithm: Algorithm,
    /// Seconds since the cut → the cut shop's share over the window ending then,
    /// placed at the window's middle.
    series: Vec<(f64, f64)>,
    /// The balancer's weights (cpuWeighted's live ones) at each tick, from 2 s before the cut.
    weights: Vec<(f64, [u32; 3])>,
    before: f64,
    last: f64,
    settled: Option<f64>,
    overshoot: f64,
    jitter: f64,
    after: Window,
}

fn reaction_run(args: &Args, algorithm: Algorithm) -> Result<ReactionRun> {
    let backends = Backends::start(args)?;
    let proxy = Proxy::start(args, algorithm, &backends.addresses())?;
    let cut_at = Duration::from_secs(args.reaction_before);
    let duration = cut_at + Duration::from_secs(args.reaction_after);
    let cut = Cut {
        at: cut_at,
        shop: args.reaction_shop,
        capacity: CAPACITIES[args.reaction_shop] * args.reaction_factor,
    };
    let measured = drive(args, &backends, &proxy, duration, &[cut_at], Some(cut))?;
    let [at_cut, end] = measured.snapshots.as_slice() else {
        bail!("expected two snapshots, got {}", measured.snapshots.len());
    };
    let after = Window::between(at_cut, end)?;
    let ticks = &measured.ticks;
    let shop = args.reaction_shop;
    let window = Duration::from_millis(args.share_window_ms);
    let cut_s = cut_at.as_secs_f64();
    let series: Vec<(f64, f64)> = sliding_shares(ticks, window, cut_at)
        .into_iter()
        .map(|(t, s)| (t - cut_s, s[shop]))
        .collect();
    let end_at = ticks.last().map_or(duration, |t| t.at);
    let final_window = Duration::from_secs(args.final_window);
    let share_between = |from: Duration, to: Duration| -> Result<f64> {
        match (tick_at(ticks, from), tick_at(ticks, to)) {
            (Some(a), Some(b)) => Ok(shares(a, b)[shop]),
            _ => bail!("no samples"),
        }
    };
    let last = share_between(end_at.saturating_sub(final_window), end_at)?;
    let before = share_between(cut_at.saturating_sub(Duration::from_secs(3)), cut_at)?;
    let in_band = |share: f64| (share - last).abs() <= args.band * last;
    let settled = settled_from(&series, |s| in_band(*s)).map(|t| t.max(0.0));
    // Overshoot: the furthest the share went past its final value, against the
    // direction of the change, as a fraction of the final value.
    let overshoot = if last <= 0.0 {
        0.0
    } else if last < before {
        let low = series.iter().map(|(_, s)| *s).fold(f64::MAX, f64::min);
        ((last - low) / last).max(0.0)
    } else {
        let high = series.iter().map(|(_, s)| *s).fold(0.0, f64::max);
        ((high - last) / last).max(0.0)
    };
    // The noise floor: how much the share wanders once settled (relative std dev over
    // the final window).
    let tail: Vec<f64> = series
        .iter()
        .filter(|(t, _)| *t + cut_s >= (end_at - final_window).as_secs_f64())
        .map(|(_, s)| *s)
        .collect();
    let jitter = if tail.len() > 1 && last > 0.0 {
        let mean = tail.iter().sum::<f64>() / tail.len() as f64;
        let var = tail.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (tail.len() - 1) as f64;
        var.sqrt() / last
    } else {
        0.0
    };
    let weights = ticks
        .iter()
        .filter(|t| t.at + Duration::from_secs(2) >= cut_at)
        .map(|t| (t.at.as_secs_f64() - cut_s, t.weights))
        .collect();
    eprintln!(
        "  before {:.3}, final {:.3}, settled {:?} s, overshoot {:.1}%, jitter {:.1}%",
        before,
        last,
        settled,
        overshoot * 100.0,
        jitter * 100.0
    );
    Ok(ReactionRun {
        algorithm,
        series,
        weights,
        before,
        last,
        settled,
        overshoot,
        jitter,
        after,
    })
}

fn reaction_tables(args: &Args, runs: &[ReactionRun]) -> String {
    let period = args.update_period().as_secs_f64();
    let capacity: Vec<f64> = CAPACITIES
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i == args.reaction_shop {
                c * args.reaction_factor
            } else {
                *c
            }
        })
        .collect();
    let expected_before = CAPACITIES[args.reaction_shop] / CAPACITIES.iter().sum::<f64>();
    let expected_after = capacity[args.reaction_shop] / capacity.iter().sum::<f64>();
    let load_after = args.offered_rps() / (args.unit_rps() * capacity.iter().sum::<f64>());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Reaction: the capacity-{} shop cut to {}× after {} s ({:.0}% → {:.0}% of the remaining capacity offered), {} s after\n",
        CAPACITIES[args.reaction_shop],
        args.reaction_factor,
        args.reaction_before,
        args.load * 100.0,
        load_after * 100.0,
        args.reaction_after,
    );
    let _ = writeln!(
        out,
        "Shares over sliding {} ms windows sampled every {} ms; settled = within ±{:.0}% of the share over the last {} s and staying there; \
         one update period = cpuWeighted's `weighting.interval` = {} ms.\n",
        args.share_window_ms,
        args.sample_ms,
        args.band * 100.0,
        args.final_window,
        args.update_period_ms,
    );
    let _ = writeln!(
        out,
        "| algorithm | share before (capacity share {:.0}%) | final share (capacity share {:.0}%) | settled after | in update periods | overshoot | share jitter when settled | p99 after the cut ms | errors after the cut |",
        expected_before * 100.0,
        expected_after * 100.0,
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in runs {
        let (settled, periods) = match r.settled {
            Some(s) => (format!("{s:.2} s"), format!("{:.1}", s / period)),
            None => ("not settled".to_owned(), "–".to_owned()),
        };
        let _ = writeln!(
            out,
            "| {} | {:.1}% | {:.1}% | {settled} | {periods} | {:.1}% | ±{:.1}% | {:.1} | {} |",
            r.algorithm.as_str(),
            r.before * 100.0,
            r.last * 100.0,
            r.overshoot * 100.0,
            r.jitter * 100.0,
            r.after.ms(0.99),
            r.after.failures + r.after.dropped,
        );
    }
    // The cut shop's share second by second (and cpuWeighted's weights), so the shape of
    // the reaction can be read, not only its summary.
    let _ = writeln!(
        out,
        "\nThe cut shop's share around the cut (window middle, seconds after the cut){}:\n",
        if runs.iter().any(|r| r.algorithm == Algorithm::CpuWeighted) {
            ", with cpuWeighted's weights 1:2:4 at that moment"
        } else {
            ""
        }
    );
    let mut header = "| s |".to_owned();
    let mut rule = "| ---: |".to_owned();
    for r in runs {
        let _ = write!(header, " {} |", r.algorithm.as_str());
        rule.push_str(" ---: |");
    }
    let cpu = runs.iter().find(|r| r.algorithm == Algorithm::CpuWeighted);
    if cpu.is_some() {
        header.push_str(" cpuWeighted weights |");
        rule.push_str(" --- |");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    let step = 1.0;
    let mut t = 0.0;
    while t <= args.reaction_after as f64 + 1e-9 {
        let mut row = format!("| {t:.0} |");
        let mut any = false;
        for r in runs {
            match nearest(&r.series, t) {
                Some(s) => {
                    any = true;
                    let _ = write!(row, " {:.1}% |", s * 100.0);
                }
                None => row.push_str(" – |"),
            }
        }
        if let Some(c) = cpu {
            match nearest(&c.weights, t) {
                Some(w) => {
                    let _ = write!(row, " {}:{}:{} |", w[0], w[1], w[2]);
                }
                None => row.push_str(" – |"),
            }
        }
        if any {
            let _ = writeln!(out, "{row}");
        }
        t += step;
    }
    out
}

/// The value whose time is nearest `t`, if one is within a quarter second.
fn nearest<T: Copy>(series: &[(f64, T)], t: f64) -> Option<T> {
    series
        .iter()
        .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
        .filter(|(at, _)| (at - t).abs() <= 0.25)
        .map(|(_, v)| *v)
}
