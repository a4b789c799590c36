//! The bots' LoadTest (`examples/shop-loadtest.yaml`), read as `trimtab-bots` reads it
//! and fitted to one machine and one short phase. The scenario — states, checks,
//! extraction, think times, the stock invariant — runs as written; only the workload's
//! size and timing change, and the oversell phase turns it into a flash sale.

use std::{path::Path, time::Duration};

use serde::Deserialize;
use trimtab_api::{
    Duration as SpecDuration,
    load_test::{LoadTestSpec, Method},
};

/// A LoadTest file the demo cannot use.
#[derive(Debug, thiserror::Error)]
pub enum LoadTestError {
    /// Not YAML, or not a LoadTest (the message carries line and column).
    #[error("{path}: not a LoadTest: {message}")]
    Yaml {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
}

/// The spec of a LoadTest file's text: the whole object, or just its spec (as
/// `trimtab-bots run` accepts). `path` only names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<LoadTestSpec, LoadTestError> {
    let yaml_error = |e: serde_yaml_ng::Error| LoadTestError::Yaml {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    #[derive(Deserialize)]
    struct Object {
        spec: LoadTestSpec,
    }
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(yaml_error)?;
    // Deserialized from the text (not from the Value) so errors keep line and column.
    if value.get("spec").is_some() {
        Ok(serde_yaml_ng::from_str::<Object>(text)
            .map_err(yaml_error)?
            .spec)
    } else {
        serde_yaml_ng::from_str(text).map_err(yaml_error)
    }
}

/// The longest ramp-up a phase gets, as a share of the phase: the example ramps over
/// 30 s of a 2 min test, which would leave a 20 s phase half-loaded.
const RAMP_SHARE: u32 = 8;

/// How often an invariant is checked at least, as a share of the phase: the example's
/// 10 s would check a short phase once or twice.
const INVARIANT_CHECKS_PER_PHASE: u32 = 8;

/// `spec` fitted to a phase of `duration` with `users` bot users (the spec's own
/// count when `None`). Pure.
///
/// - `workload.users` is replaced; `workload.duration` too (the run options also say
///   it, this keeps the spec self-consistent).
/// - `workload.rampUp` is cut to an eighth of the phase, so most of it runs at full load.
/// - Every invariant is checked at least eight times a phase.
/// - `guards` are dropped: a guard that held the load in one phase and not in the
///   other would change the offered load between the two rows of the comparison,
///   and the demo is about what round robin does to the slow replica, not about
///   stopping it. (The guards are the LoadTest controller's and the bots' own tests'.)
pub fn fit(spec: &LoadTestSpec, users: Option<u64>, duration: Duration) -> LoadTestSpec {
    let mut spec = spec.clone();
    if let Some(users) = users {
        spec.workload.users = Some(users);
        spec.workload.arrival_rate = None;
        spec.workload.max_users = None;
    }
    spec.workload.duration = SpecDuration::from(duration);
    let ramp = spec.workload.ramp_up.get().min(duration / RAMP_SHARE);
    spec.workload.ramp_up = SpecDuration::from(ramp);
    let every = duration / INVARIANT_CHECKS_PER_PHASE;
    for invariant in &mut spec.invariants {
        if invariant.every.get() > every {
            invariant.every = SpecDuration::from(every);
        }
    }
    spec.guards = None;
    spec
}

/// How the oversell phase turns the scenario into a flash sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashSale {
    /// The catalog page every user browses, so that everyone wants the same product.
    pub page: u32,
    /// Think time between requests instead of the scenario's: shoppers racing for
    /// the last items do not dawdle.
    pub think_time: Duration,
}

/// `spec` as a flash sale: the sale opens and every user arrives at once (no ramp-up),
/// every catalog request asks for `sale.page` (the scenario takes the first product
/// of the page it browsed, so every cart holds the same product), and users think for
/// `sale.think_time`. Checkouts of the last units then overlap, which is the race
/// `--bug oversell` loses. Pure.
pub fn flash_sale(spec: &LoadTestSpec, sale: FlashSale) -> LoadTestSpec {
    let mut spec = spec.clone();
    spec.workload.ramp_up = SpecDuration::from(Duration::ZERO);
    for state in &mut spec.scenario.states {
        if let Some(request) = &mut state.request
            && request.method == Method::Get
            && request.path.starts_with("/api/products?")
        {
            request.path = format!("/api/products?page={}", sale.page);
        }
        state.think_time = None;
    }
    spec.scenario.think_time = Some(trimtab_api::load_test::ThinkTime {
        distribution: trimtab_api::load_test::Distribution::Constant,
        mean: Some(SpecDuration::from(sale.think_time)),
        stddev: None,
        min: None,
        max: None,
    });
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOP_LOADTEST: &str = include_str!("../../shop-loadtest.yaml");

    fn example() -> LoadTestSpec {
        parse(SHOP_LOADTEST, Path::new("examples/shop-loadtest.yaml")).expect("example parses")
    }

    #[test]
    fn reads_the_example_as_trimtab_bots_does() {
        let spec = example();
        assert_eq!(spec.workload.users, Some(2000));
        assert_eq!(spec.scenario.start, "login");
        assert_eq!(spec.invariants[0].name, "stock-never-negative");
        let bare = serde_yaml_ng::to_string(&spec).expect("serializes");
        assert_eq!(
            parse(&bare, Path::new("bare.yaml")).expect("a bare spec parses"),
            spec
        );
    }

    #[test]
    fn fitting_scales_users_shortens_ramp_and_invariant_period_and_drops_guards() {
        let fitted = fit(&example(), Some(300), Duration::from_secs(16));
        assert_eq!(fitted.workload.users, Some(300));
        assert_eq!(fitted.workload.duration.get(), Duration::from_secs(16));
        assert_eq!(fitted.workload.ramp_up.get(), Duration::from_secs(2));
        assert_eq!(fitted.invariants[0].every.get(), Duration::from_secs(2));
        assert_eq!(fitted.guards, None);
        assert_eq!(
            fitted.scenario,
            example().scenario,
            "the scenario runs as written"
        );
    }

    #[test]
    fn fitting_keeps_the_spec_users_when_none_are_given() {
        let fitted = fit(&example(), None, Duration::from_secs(60));
        assert_eq!(fitted.workload.users, Some(2000));
        assert_eq!(fitted.workload.ramp_up.get(), Duration::from_millis(7500));
    }

    #[test]
    fn a_flash_sale_sends_everyone_to_one_page_with_short_pauses() {
        let sale = flash_sale(
            &example(),
            FlashSale {
                page: 1,
                think_time: Duration::from_millis(20),
            },
        );
        let browse = sale
            .scenario
            .states
            .iter()
            .find(|s| s.name == "browse")
            .and_then(|s| s.request.as_ref())
            .expect("browse sends a request");
        assert_eq!(browse.path, "/api/products?page=1");
        let think = sale.scenario.think_time.expect("think time set");
        assert_eq!(think.mean.map(|d| d.get()), Some(Duration::from_millis(20)));
        let checkout = sale
            .scenario
            .states
            .iter()
            .find(|s| s.name == "checkout")
            .and_then(|s| s.request.as_ref())
            .expect("checkout sends a request");
        assert_eq!(checkout.path, "/api/checkout", "other requests unchanged");
        assert_eq!(sale.invariants, example().invariants);
        assert_eq!(
            sale.workload.ramp_up.get(),
            Duration::ZERO,
            "the doors open at once"
        );
    }

    #[test]
    fn names_the_file_of_a_spec_that_does_not_parse() {
        let error = parse("spec: {workload: 3}\n", Path::new("bad.yaml")).expect_err("invalid");
        assert!(
            error.to_string().starts_with("bad.yaml: not a LoadTest:"),
            "{error}"
        );
    }
}
