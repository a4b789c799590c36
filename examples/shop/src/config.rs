//! What a shop instance is told at start: its catalog size, its emulated capacity and
//! which deliberate bugs are switched on. Plain data, validated once, before binding.

use std::{fmt, net::SocketAddr, time::Duration};

use serde::{Serialize, Serializer};

use crate::capacity::{self, CapacityError};

/// Everything a shop needs to start. `Default` is what the binary runs with when no
/// flag is given; [`Config::ephemeral`] is the same on `127.0.0.1:0`, for tests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Address to listen on. Loopback by default: the shop is a demo target, not a
    /// service to expose.
    pub listen: SocketAddr,
    /// Number of products in the catalog (ids `1..=products`).
    pub products: u32,
    /// Stock every product starts with.
    pub initial_stock: i64,
    /// Products per page of `GET /api/products` when the request does not say `size`.
    pub page_size: u32,
    /// Emulated node size relative to a baseline node: the worker pool has
    /// `round(capacity × base_workers)` slots.
    pub capacity: f64,
    /// Slots of a capacity-1.0 node.
    pub base_workers: u32,
    /// How long each `/api` request holds a worker slot (a timer, not CPU work, so that
    /// several replicas of different sizes can share one small machine honestly).
    /// Tokio timers tick in whole milliseconds and round up, so a 5 ms service time
    /// takes 5–6 ms, and anything under 1 ms takes about 1 ms; `0` skips the timer.
    #[serde(serialize_with = "as_text")]
    pub service_time: Duration,
    /// Whether every request takes exactly `service_time` or an exponentially
    /// distributed time with that mean.
    pub service_time_distribution: ServiceTimeDistribution,
    /// Time constant of the utilization and rate averages reported in ORCA headers
    /// and on `/metrics`.
    #[serde(serialize_with = "as_text")]
    pub utilization_window: Duration,
    /// Deliberate bugs for the bots to find.
    pub bugs: Vec<Bug>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            products: 100,
            initial_stock: 100,
            page_size: 10,
            capacity: 1.0,
            base_workers: 4,
            service_time: Duration::from_millis(5),
            service_time_distribution: ServiceTimeDistribution::Constant,
            utilization_window: Duration::from_secs(1),
            bugs: Vec::new(),
        }
    }
}

impl Config {
    /// The defaults on an ephemeral loopback port: what tests and in-process harnesses
    /// start from.
    pub fn ephemeral() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..Self::default()
        }
    }

    /// Whether `bug` is switched on.
    pub fn has_bug(&self, bug: Bug) -> bool {
        self.bugs.contains(&bug)
    }

    /// Refuses a config that cannot run, naming the field and the accepted range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.products == 0 || self.products > MAX_PRODUCTS {
            return Err(ConfigError::Products {
                value: self.products,
            });
        }
        if self.initial_stock < 0 {
            return Err(ConfigError::InitialStock {
                value: self.initial_stock,
            });
        }
        if self.page_size == 0 || self.page_size > MAX_PAGE_SIZE {
            return Err(ConfigError::PageSize {
                value: self.page_size,
            });
        }
        if self.base_workers == 0 {
            return Err(ConfigError::BaseWorkers);
        }
        capacity::workers_for(self.capacity, self.base_workers)?;
        if self.service_time > MAX_SERVICE_TIME {
            return Err(ConfigError::ServiceTime {
                value: format_duration(self.service_time),
            });
        }
        if self.utilization_window.is_zero() {
            return Err(ConfigError::UtilizationWindow);
        }
        Ok(())
    }
}

/// The largest catalog: `GET /api/admin/stock` lists every product, so keep it sane.
pub const MAX_PRODUCTS: u32 = 1_000_000;
/// The longest service time: beyond this a request would outlive any client timeout.
pub const MAX_SERVICE_TIME: Duration = Duration::from_secs(60);
/// The largest page a client may ask for.
pub const MAX_PAGE_SIZE: u32 = 1_000;

/// A deliberate bug, switched on with `--bug NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Bug {
    /// Checkout reads the stock, pauses, then subtracts (check-then-act), so concurrent
    /// checkouts of the last items sell more than there is and stock goes negative.
    Oversell,
}

/// How long a request holds its worker slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceTimeDistribution {
    /// Exactly the service time (an M/D/c queue): the clearest signal for benchmarks.
    Constant,
    /// Exponential with the service time as mean (an M/M/c queue): closer to real
    /// services, with a heavier latency tail.
    Exponential,
}

/// A config field outside what the shop can run with.
#[allow(missing_docs)] // the fields are described by each variant's message
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("products = {value}: expected 1 to {MAX_PRODUCTS}")]
    Products { value: u32 },
    #[error("initial_stock = {value}: expected 0 or more")]
    InitialStock { value: i64 },
    #[error("page_size = {value}: expected 1 to {MAX_PAGE_SIZE}")]
    PageSize { value: u32 },
    #[error("base_workers = 0: expected at least 1 worker slot per unit of capacity")]
    BaseWorkers,
    #[error("service_time = {value}: expected at most 60s")]
    ServiceTime { value: String },
    #[error("utilization_window = 0: expected a positive duration such as 1s")]
    UtilizationWindow,
    #[error(transparent)]
    Capacity(#[from] CapacityError),
}

/// A duration flag that could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "duration {input:?}: {problem}; expected a number and a unit, such as 5ms, 250us, 1.5s or 2m"
)]
pub struct ParseDurationError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

/// Reads `5ms`, `250us` (or `µs`), `1.5s`, `2m` or a bare `0`: one number and one
/// unit, which is all a service time or a window needs.
pub fn parse_duration(input: &str) -> Result<Duration, ParseDurationError> {
    let error = |problem| ParseDurationError {
        input: input.to_owned(),
        problem,
    };
    let text = input.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| error("missing unit"))?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(error("missing number"));
    }
    let value: f64 = number.parse().map_err(|_| error("not a number"))?;
    let seconds_per_unit = match unit {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        _ => return Err(error("unknown unit")),
    };
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| error("out of range"))
}

/// Writes a duration the way [`parse_duration`] reads it back.
pub fn format_duration(duration: Duration) -> String {
    let micros = duration.as_micros();
    if micros == 0 {
        "0".to_owned()
    } else if micros.is_multiple_of(1_000_000) {
        format!("{}s", micros / 1_000_000)
    } else if micros.is_multiple_of(1_000) {
        format!("{}ms", micros / 1_000)
    } else {
        format!("{micros}us")
    }
}

fn as_text<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_duration(*duration))
}

impl fmt::Display for Bug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Oversell => f.write_str("oversell"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_units_a_service_time_is_written_in() {
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_durations_without_a_number_or_a_known_unit() {
        assert_eq!(
            parse_duration("5").map_err(|e| e.problem),
            Err("missing unit")
        );
        assert_eq!(
            parse_duration("ms").map_err(|e| e.problem),
            Err("missing number")
        );
        assert_eq!(
            parse_duration("5h").map_err(|e| e.problem),
            Err("unknown unit")
        );
        assert_eq!(
            parse_duration("1.2.3s").map_err(|e| e.problem),
            Err("not a number")
        );
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn formats_durations_so_they_parse_back() {
        for d in [
            Duration::ZERO,
            Duration::from_micros(250),
            Duration::from_millis(5),
            Duration::from_secs(2),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn default_config_is_valid_and_listens_on_loopback() {
        let config = Config::default();
        assert_eq!(config.validate(), Ok(()));
        assert!(config.listen.ip().is_loopback());
    }

    #[test]
    fn refuses_an_empty_catalog_and_a_zero_capacity() {
        let config = Config {
            products: 0,
            ..Config::default()
        };
        assert_eq!(config.validate(), Err(ConfigError::Products { value: 0 }));
        let config = Config {
            capacity: 0.0,
            ..Config::default()
        };
        assert!(matches!(config.validate(), Err(ConfigError::Capacity(_))));
    }
}
