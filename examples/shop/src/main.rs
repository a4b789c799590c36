//! `shop`: the shop example service. See the library docs for what it does.
//!
//! Configuration: defaults < environment (`SHOP_*`) < flags; `--print-config` shows
//! the result. (No config file: every setting is one flag.)
#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use shop::{
    Bug, Config, ServiceTimeDistribution, Shop,
    config::{format_duration, parse_duration},
};

/// A small in-memory shop with emulated capacity, for Trimtab's bot users and
/// balancing demos.
#[derive(Debug, Parser)]
#[command(name = "shop", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "SHOP_LISTEN", default_value_t = Config::default().listen)]
    listen: SocketAddr,
    /// Products in the catalog.
    #[arg(long, env = "SHOP_PRODUCTS", default_value_t = Config::default().products)]
    products: u32,
    /// Stock every product starts with.
    #[arg(long, env = "SHOP_INITIAL_STOCK", default_value_t = Config::default().initial_stock)]
    initial_stock: i64,
    /// Products per page of GET /api/products when the request gives no `size`.
    #[arg(long, env = "SHOP_PAGE_SIZE", default_value_t = Config::default().page_size)]
    page_size: u32,
    /// Emulated node size: worker slots = round(capacity × base-workers).
    #[arg(long, env = "SHOP_CAPACITY", default_value_t = Config::default().capacity)]
    capacity: f64,
    /// Worker slots of a capacity-1.0 node.
    #[arg(long, env = "SHOP_BASE_WORKERS", default_value_t = Config::default().base_workers)]
    base_workers: u32,
    /// How long each /api request holds a worker slot (e.g. 5ms, 250us).
    #[arg(long, env = "SHOP_SERVICE_TIME", value_parser = parse_text,
          default_value_t = Text(Config::default().service_time))]
    service_time: Text,
    /// Constant service times, or exponential with that mean.
    #[arg(long, env = "SHOP_SERVICE_TIME_DISTRIBUTION", value_enum,
          default_value_t = Config::default().service_time_distribution)]
    service_time_distribution: ServiceTimeDistribution,
    /// Time constant of the utilization average in ORCA headers and /metrics.
    #[arg(long, env = "SHOP_UTILIZATION_WINDOW", value_parser = parse_text,
          default_value_t = Text(Config::default().utilization_window))]
    utilization_window: Text,
    /// Switch on a deliberate bug (repeatable, or comma-separated in SHOP_BUGS).
    #[arg(long = "bug", env = "SHOP_BUGS", value_enum, value_delimiter = ',')]
    bugs: Vec<Bug>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "SHOP_LOG_JSON")]
    log_json: bool,
    /// Print the resolved configuration as JSON and exit.
    #[arg(long)]
    print_config: bool,
}

/// A duration shown in `--help` the way it is written on the command line.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Text(Duration);

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

fn parse_text(input: &str) -> Result<Text, shop::config::ParseDurationError> {
    parse_duration(input).map(Text)
}

impl Args {
    fn config(&self) -> Config {
        Config {
            listen: self.listen,
            products: self.products,
            initial_stock: self.initial_stock,
            page_size: self.page_size,
            capacity: self.capacity,
            base_workers: self.base_workers,
            service_time: self.service_time.0,
            service_time_distribution: self.service_time_distribution,
            utilization_window: self.utilization_window.0,
            bugs: self.bugs.clone(),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config();
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&config)?);
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let (_, shop) = Shop::bind(config).await.context("starting the shop")?;
    shutdown_signal().await?;
    tracing::info!("shutting down");
    shop.shutdown().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_give_the_library_defaults() {
        let args = Args::try_parse_from(["shop"]).expect("parses");
        assert_eq!(args.config(), Config::default());
    }

    #[test]
    fn flags_set_capacity_service_time_and_bugs() {
        let args = Args::try_parse_from([
            "shop",
            "--capacity",
            "2",
            "--service-time",
            "250us",
            "--bug",
            "oversell",
            "--listen",
            "127.0.0.1:0",
        ])
        .expect("parses");
        let config = args.config();
        assert_eq!(config.capacity, 2.0);
        assert_eq!(config.service_time, Duration::from_micros(250));
        assert_eq!(config.bugs, vec![Bug::Oversell]);
    }

    #[test]
    fn a_bad_duration_is_refused_with_the_flag_named() {
        let error = Args::try_parse_from(["shop", "--service-time", "5"]).expect_err("refused");
        assert!(error.to_string().contains("--service-time"), "{error}");
    }
}
