//! `trimtab-demo`: three shop replicas of capacities 1:2:4, the Trimtab sidecar and the
//! example LoadTest's bot users in one process; prints round robin against cpuWeighted
//! side by side, then what the stock invariant caught in a flash sale on buggy shops.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use trimtab_api::Duration as SpecDuration;
use trimtab_demo::{DemoError, Options, Progress, phases, render, run_demo};

#[derive(Debug, Parser)]
#[command(
    name = "trimtab-demo",
    version,
    about = "Shop replicas of capacities 1:2:4 behind the Trimtab sidecar, driven by bot users: round robin against cpuWeighted, then the oversell bug caught"
)]
struct Cli {
    /// Length of each of the three phases, e.g. 18s (the whole demo takes about three
    /// of these plus a few seconds).
    #[arg(
        long,
        env = "TRIMTAB_DEMO_PHASE_DURATION",
        default_value_t = SpecDuration::from(phases::DEFAULT_PHASE_DURATION)
    )]
    phase_duration: SpecDuration,
    /// Bot users in the round robin and cpuWeighted phases (the example LoadTest has
    /// 2000, sized for a cluster).
    #[arg(long, env = "TRIMTAB_DEMO_USERS", default_value_t = phases::DEFAULT_USERS)]
    users: u64,
    /// Seeds every bot user: both phases replay the same journeys, and so does the
    /// next run with the same seed.
    #[arg(long, env = "TRIMTAB_DEMO_SEED", default_value_t = 0)]
    seed: u64,
    /// Also write the comparison as JSON to this file.
    #[arg(long, env = "TRIMTAB_DEMO_JSON")]
    json: Option<PathBuf>,
    /// The BalancerPolicy to run (default: examples/local-demo.yaml).
    #[arg(long, env = "TRIMTAB_DEMO_POLICY")]
    policy: Option<PathBuf>,
    /// The LoadTest whose bots to run (default: examples/shop-loadtest.yaml).
    #[arg(long, env = "TRIMTAB_DEMO_LOADTEST")]
    loadtest: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Quiet unless asked: the shops and the sidecar log through `tracing`.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<DemoError>() {
                // Its message already names the file, field or replica and the cause.
                Some(demo) => eprintln!("trimtab-demo: {demo}"),
                None => eprintln!("trimtab-demo: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.users == 0 {
        anyhow::bail!("--users 0: expected at least one bot user");
    }
    if cli.phase_duration.get().is_zero() {
        anyhow::bail!("--phase-duration 0s: expected a positive duration such as 18s");
    }
    let defaults = Options::default();
    let options = Options {
        policy: cli.policy.unwrap_or(defaults.policy.clone()),
        loadtest: cli.loadtest.unwrap_or(defaults.loadtest.clone()),
        phase_duration: cli.phase_duration.get(),
        users: cli.users,
        seed: cli.seed,
        ..defaults
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(run_demo(&options, |p: Progress| eprintln!("{p}")))?;
    print!("{}", render(&report));
    if let Some(path) = &cli.json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
