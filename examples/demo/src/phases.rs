//! The demo's three phases, each on fresh shop replicas behind the one sidecar:
//!
//! 1. **roundRobin**: the policy with its algorithm replaced — the baseline, which
//!    sends the capacity-1 replica a third of the load it cannot carry;
//! 2. **cpuWeighted**: the policy as written — weights learnt from the replicas' ORCA
//!    load reports; same bots, same seed, same length;
//! 3. **oversell**: replicas restarted with `--bug oversell` and little stock, the
//!    bots as a flash sale, and the `stock-never-negative` invariant on watch.
//!
//! Fresh replicas every phase, so that each starts from the same stock and empty
//! sessions; one sidecar throughout, reconfigured between phases the way a policy
//! reload reconfigures it.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use trimtab_api::{balancer_policy::Algorithm, load_test::LoadTestSpec, sidecar_config::Route};
use trimtab_sidecar::bots::run::{RunError, RunOptions, RunOutput, run};

use crate::{
    loadtest::{self, FlashSale, LoadTestError},
    policy::{self, PolicyError},
    proxy::{EndpointCount, Proxy, ProxyError},
    replicas::{ReplicaError, Replicas, Stopped},
    report::{AlgorithmRow, OversellRow, Report, Settings},
};

/// The replicas' sizes: a small, a medium and a large node.
pub const CAPACITIES: [f64; 3] = [1.0, 2.0, 4.0];

/// Round robin, cpuWeighted, oversell.
const PHASES: usize = 3;

/// The invariant the oversell phase is about (the example LoadTest's).
pub const STOCK_INVARIANT: &str = "stock-never-negative";

/// How the replicas emulate capacity: `base_workers` slots per unit of capacity, each
/// held for `service_time`. A capacity-c replica serves c × base_workers ÷
/// service_time requests per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizing {
    /// Worker slots of a capacity-1 replica.
    pub base_workers: u32,
    /// How long each request holds its slot.
    pub service_time: Duration,
}

/// The oversell phase's setup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Oversell {
    /// How the sale's replicas emulate capacity.
    pub sizing: Sizing,
    /// Stock every product starts with: few, so the last units are fought over early.
    pub initial_stock: i64,
    /// The bots' flash sale.
    pub sale: FlashSale,
    /// Users of the flash sale (short pauses make each one a heavy shopper).
    pub users: u64,
}

/// Everything a demo run is told.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The BalancerPolicy file (`examples/local-demo.yaml`).
    pub policy: PathBuf,
    /// The LoadTest file (`examples/shop-loadtest.yaml`).
    pub loadtest: PathBuf,
    /// Length of each phase.
    pub phase_duration: Duration,
    /// Bot users in the comparison phases.
    pub users: u64,
    /// Seeds every bot user; both comparison phases replay the same journeys.
    pub seed: u64,
    /// How the replicas emulate capacity.
    pub sizing: Sizing,
    /// The oversell phase.
    pub oversell: Oversell,
    /// Per-request limit for the bots.
    pub request_timeout: Duration,
}

impl Default for Options {
    /// The demo as `cargo run --release -p trimtab-demo` runs it: about a minute on a
    /// two-core machine.
    fn default() -> Self {
        let examples = examples_dir();
        Self {
            policy: examples.join("local-demo.yaml"),
            loadtest: examples.join("shop-loadtest.yaml"),
            phase_duration: DEFAULT_PHASE_DURATION,
            users: DEFAULT_USERS,
            seed: 0,
            sizing: DEFAULT_SIZING,
            oversell: DEFAULT_OVERSELL,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Three phases of this length and the start-up between them take about a minute.
pub const DEFAULT_PHASE_DURATION: Duration = Duration::from_secs(18);

/// 2 slots × 20 ms per unit of capacity: the replicas serve 100, 200 and 400
/// requests/s, 700 together.
pub const DEFAULT_SIZING: Sizing = Sizing {
    base_workers: 2,
    service_time: Duration::from_millis(20),
};

/// With the example's one-second think time each user sends a little under one
/// request a second, so 400 users offer about 380 requests/s: more than three times
/// what the capacity-1 replica serves (a third of it under round robin is 127/s
/// against its 100), and a little over half of what the three serve when weighted
/// 1:2:4. Few enough that bots, sidecar and shops share two cores, and that the
/// connections stay far below the usual 1024 open files.
pub const DEFAULT_USERS: u64 = 400;

/// A flash sale: 80 users arrive at once for three of each product, and think 5 ms.
///
/// The bug's race window is a millisecond, so it takes checkouts that arrive within
/// the same millisecond: many quick requests. The sale's replicas are sized for that
/// (4 slots × 5 ms per unit: 800, 1600 and 3200 requests/s), so that the users' first
/// waves of checkouts reach the shops together rather than trickling through a
/// 20 ms queue. Measured on two cores, with one 16-slot replica standing in for
/// replicas that share one store: a violation in 5 runs of 5 (with 20 ms service
/// times, in about half).
pub const DEFAULT_OVERSELL: Oversell = Oversell {
    sizing: Sizing {
        base_workers: 4,
        service_time: Duration::from_millis(5),
    },
    initial_stock: 3,
    sale: FlashSale {
        page: 1,
        think_time: Duration::from_millis(5),
    },
    users: 80,
};

/// `examples/`, where the policy and LoadTest files live (this crate is
/// `examples/demo`).
pub fn examples_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The LoadTest file is unusable.
    #[error(transparent)]
    LoadTest(#[from] LoadTestError),
    /// The policy file is unusable.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The shop replicas did not start.
    #[error(transparent)]
    Replicas(#[from] ReplicaError),
    /// The sidecar did not start or refused the route.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// The bots did not start (the scenario was refused or the sidecar did not answer).
    #[error("the bots did not start in the {phase} phase: {source}")]
    Bots {
        /// The phase.
        phase: &'static str,
        /// Why.
        source: RunError,
    },
}

/// What the demo is doing, for a progress line.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// A phase began.
    Phase {
        /// 1-based.
        number: usize,
        /// Of how many.
        of: usize,
        /// What it runs.
        title: String,
    },
    /// A phase ended.
    Done {
        /// 1-based.
        number: usize,
        /// Of how many.
        of: usize,
        /// Requests the bots sent.
        requests: u64,
        /// Wall time.
        elapsed: Duration,
    },
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Phase { number, of, title } => write!(f, "[{number}/{of}] {title} …"),
            Self::Done {
                number,
                of,
                requests,
                elapsed,
            } => write!(
                f,
                "[{number}/{of}] done: {requests} requests in {:.1}s",
                elapsed.as_secs_f64()
            ),
        }
    }
}

fn read(path: &Path) -> Result<String, DemoError> {
    std::fs::read_to_string(path).map_err(|source| DemoError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The demo's running parts between phases: the files read once, and the sidecar.
#[derive(Debug)]
pub struct Demo {
    options: Options,
    /// The LoadTest fitted to a comparison phase.
    spec: LoadTestSpec,
    /// The policy file's route, before it is pointed at a phase's replicas.
    route: Route,
    proxy: Proxy,
}

impl Demo {
    /// Reads the policy and LoadTest files and starts the sidecar (serving nothing
    /// until a phase starts). Must run inside a multi-threaded Tokio runtime: the
    /// sidecar and the bots share it; each shop replica has its own.
    pub async fn start(options: Options) -> Result<Self, DemoError> {
        let spec = loadtest::parse(&read(&options.loadtest)?, &options.loadtest)?;
        let route = policy::parse(&read(&options.policy)?, &options.policy)?;
        Ok(Self {
            spec: loadtest::fit(&spec, Some(options.users), options.phase_duration),
            route,
            proxy: Proxy::new()?,
            options,
        })
    }

    /// One row of the comparison: the bots through the sidecar serving the policy
    /// with `algorithm`, over fresh replicas.
    pub async fn compare(&mut self, algorithm: Algorithm) -> Result<AlgorithmRow, DemoError> {
        let shop = self.shop_config(self.options.sizing);
        let spec = self.spec.clone();
        let (output, counted, _) = self.phase(&shop, algorithm, &spec).await?;
        Ok(AlgorithmRow::new(
            algorithm.as_str(),
            &output.results,
            output.elapsed,
            &CAPACITIES,
            &counted.endpoints,
        )
        .with_unauthorized(counted.unauthorized))
    }

    /// The bug hunt: replicas restarted with `--bug oversell` and little stock, the
    /// policy as written, and the bots as a flash sale.
    pub async fn oversell(&mut self) -> Result<OversellRow, DemoError> {
        let o = self.options.oversell;
        let shop = shop::Config {
            initial_stock: o.initial_stock,
            bugs: vec![shop::Bug::Oversell],
            ..self.shop_config(o.sizing)
        };
        let sale = loadtest::fit(
            &loadtest::flash_sale(&self.spec, o.sale),
            Some(o.users),
            self.options.phase_duration,
        );
        let (output, _, stopped) = self.phase(&shop, Algorithm::CpuWeighted, &sale).await?;
        Ok(OversellRow::new(
            &output.results,
            output.elapsed,
            STOCK_INVARIANT,
            &stopped,
        ))
    }

    /// Stops the sidecar's listener.
    pub async fn shutdown(self) {
        self.proxy.shutdown().await;
    }

    /// The settings this demo runs with, for the report.
    pub fn settings(&self) -> Settings {
        let o = &self.options;
        Settings {
            capacities: CAPACITIES.to_vec(),
            base_workers: o.sizing.base_workers,
            service_time_ms: o.sizing.service_time.as_secs_f64() * 1e3,
            users: o.users,
            phase_seconds: o.phase_duration.as_secs_f64(),
            seed: o.seed,
            policy: shown(&o.policy),
            loadtest: shown(&o.loadtest),
        }
    }

    fn shop_config(&self, sizing: Sizing) -> shop::Config {
        shop::Config {
            base_workers: sizing.base_workers,
            service_time: sizing.service_time,
            ..shop::Config::ephemeral()
        }
    }

    /// One phase: replicas up, the sidecar pointed at them, the bots run, replicas
    /// down. The replicas are stopped whatever happens.
    async fn phase(
        &mut self,
        shop: &shop::Config,
        algorithm: Algorithm,
        spec: &LoadTestSpec,
    ) -> Result<(RunOutput, Counted, Vec<Stopped>), DemoError> {
        let replicas = Replicas::start(&CAPACITIES, shop).await?;
        let served = policy::for_replicas(
            &self.route,
            &self.options.policy,
            &replicas.addresses(),
            self.proxy.port(),
            algorithm,
        );
        let route = match served {
            Ok(route) => route,
            Err(e) => {
                replicas.stop().await;
                return Err(e.into());
            }
        };
        if let Err(e) = self.proxy.serve(route).await {
            replicas.stop().await;
            return Err(e.into());
        }
        let run_options = RunOptions {
            target: Some(self.proxy.url().await),
            duration: Some(self.options.phase_duration),
            seed: self.options.seed,
            request_timeout: self.options.request_timeout,
            ..RunOptions::default()
        };
        let output = run(spec, &run_options).await;
        // Counted before the replicas stop: the route's endpoints are what they served.
        let counted = Counted {
            endpoints: self.proxy.counts(),
            unauthorized: self.proxy.responses_with_status(UNAUTHORIZED),
        };
        let stopped = replicas.stop().await;
        let phase = if shop.has_bug(shop::Bug::Oversell) {
            "oversell"
        } else {
            algorithm.as_str()
        };
        let output = output.map_err(|source| DemoError::Bots { phase, source })?;
        Ok((output, counted, stopped))
    }
}

/// Runs the three phases and returns what they measured; `progress` hears of each
/// phase as it starts and ends. Must run inside a multi-threaded Tokio runtime.
pub async fn run_demo(
    options: &Options,
    mut progress: impl FnMut(Progress),
) -> Result<Report, DemoError> {
    let mut demo = Demo::start(options.clone()).await?;
    let result = phases(&mut demo, &mut progress).await;
    demo.shutdown().await;
    result
}

async fn phases(demo: &mut Demo, progress: &mut impl FnMut(Progress)) -> Result<Report, DemoError> {
    let seconds = demo.options.phase_duration.as_secs_f64();
    let round_robin = compare(demo, progress, 1, Algorithm::RoundRobin).await?;
    let cpu_weighted = compare(demo, progress, 2, Algorithm::CpuWeighted).await?;

    let o = demo.options.oversell;
    progress(Progress::Phase {
        number: 3,
        of: PHASES,
        title: format!(
            "oversell: shops restarted with --bug oversell and {} of each product; a flash sale of {} users for {seconds:.0}s",
            o.initial_stock, o.users
        ),
    });
    let oversell = demo.oversell().await?;
    progress(Progress::Done {
        number: 3,
        of: PHASES,
        requests: oversell.requests,
        elapsed: Duration::from_secs_f64(oversell.seconds),
    });
    Ok(Report {
        settings: demo.settings(),
        round_robin,
        cpu_weighted,
        oversell,
    })
}

/// One comparison phase, announced and reported to `progress`.
async fn compare(
    demo: &mut Demo,
    progress: &mut impl FnMut(Progress),
    number: usize,
    algorithm: Algorithm,
) -> Result<AlgorithmRow, DemoError> {
    progress(Progress::Phase {
        number,
        of: PHASES,
        title: format!(
            "{}: {} bot users through the sidecar to shops of capacity 1:2:4 for {:.0}s",
            algorithm.as_str(),
            demo.options.users,
            demo.options.phase_duration.as_secs_f64(),
        ),
    });
    let row = demo.compare(algorithm).await?;
    progress(Progress::Done {
        number,
        of: PHASES,
        requests: row.requests,
        elapsed: Duration::from_secs_f64(row.seconds),
    });
    Ok(row)
}

/// What the sidecar counted in one phase.
struct Counted {
    endpoints: Vec<EndpointCount>,
    /// 401 responses: sessions the answering replica did not know.
    unauthorized: u64,
}

/// The status a replica answers a session token it did not issue with.
const UNAUTHORIZED: u16 = 401;

/// `path` relative to the working directory when it is inside it, as a user would
/// type it.
fn shown(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_owned))
        .unwrap_or_else(|| path.to_owned())
        .display()
        .to_string()
}
