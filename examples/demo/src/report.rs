//! What the demo measured, and the side-by-side table it prints. Pure: the bots'
//! results and the sidecar's per-endpoint counts in, rows and text out.

use std::{fmt::Write as _, time::Duration};

use serde::Serialize;
use trimtab_sidecar::bots::results::{FailureCounts, FailureExample, Results};

use crate::{proxy::EndpointCount, replicas::Stopped};

/// The settings a run used, printed above the table and kept in the JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// Capacities of the replicas, in endpoint order.
    pub capacities: Vec<f64>,
    /// Worker slots of a capacity-1 replica.
    pub base_workers: u32,
    /// How long a request holds its slot, in milliseconds.
    pub service_time_ms: f64,
    /// Bot users per phase.
    pub users: u64,
    /// Length of each phase, in seconds.
    pub phase_seconds: f64,
    /// The bots' seed.
    pub seed: u64,
    /// The policy file.
    pub policy: String,
    /// The LoadTest file.
    pub loadtest: String,
}

/// How many failed requests a row keeps as examples.
pub const KEEP_FAILURES: usize = 3;

/// One replica's part of a phase, as the sidecar counted it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShopShare {
    /// The replica's capacity.
    pub capacity: f64,
    /// Its address in that phase.
    pub address: String,
    /// Responses the sidecar got from it.
    pub responses: u64,
    /// Its share of all the route's responses, 0–1.
    pub share: f64,
    /// Its weight at the end of the phase.
    pub weight: u32,
}

/// One algorithm's row of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AlgorithmRow {
    /// `roundRobin` or `cpuWeighted`, as written in the policy.
    pub algorithm: String,
    /// Requests the bots sent.
    pub requests: u64,
    /// Wall time of the run, in seconds.
    pub seconds: f64,
    /// Requests per second.
    pub throughput: f64,
    /// Median latency from the intended start (corrected for coordinated omission), ms.
    pub p50_ms: f64,
    /// 99th percentile of the same, ms.
    pub p99_ms: f64,
    /// Failed requests, all kinds.
    pub errors: u64,
    /// Failed requests by kind.
    pub failures: FailureCounts,
    /// Sessions that reached a terminal state.
    pub sessions_completed: u64,
    /// What each replica served.
    pub shops: Vec<ShopShare>,
    /// 401 responses the sidecar counted: cart and checkout requests balanced to a
    /// replica other than the one the user logged in to (each replica keeps its own
    /// sessions).
    pub unauthorized: u64,
    /// The first few failed requests, as the bots kept them.
    pub first_failures: Vec<FailureExample>,
}

impl AlgorithmRow {
    /// The row of one phase: the bots' `results` over `elapsed`, and what the sidecar
    /// counted per endpoint (`counts`, in the order of `capacities`).
    pub fn new(
        algorithm: &str,
        results: &Results,
        elapsed: Duration,
        capacities: &[f64],
        counts: &[EndpointCount],
    ) -> Self {
        let seconds = elapsed.as_secs_f64();
        let latency = &results.latency.corrected;
        Self {
            algorithm: algorithm.to_owned(),
            requests: results.requests,
            seconds,
            throughput: if seconds > 0.0 {
                results.requests as f64 / seconds
            } else {
                0.0
            },
            p50_ms: millis(latency.quantile(0.5)),
            p99_ms: millis(latency.quantile(0.99)),
            errors: results.failures.total(),
            failures: results.failures.clone(),
            sessions_completed: results.sessions_completed,
            shops: shares(capacities, counts),
            unauthorized: 0,
            first_failures: results
                .failure_examples
                .iter()
                .take(KEEP_FAILURES)
                .cloned()
                .collect(),
        }
    }

    /// The row with the sidecar's count of 401 responses.
    pub fn with_unauthorized(self, unauthorized: u64) -> Self {
        Self {
            unauthorized,
            ..self
        }
    }

    /// The share of the replica of `capacity`, if there is one.
    pub fn share_of(&self, capacity: f64) -> Option<f64> {
        self.shops
            .iter()
            .find(|s| s.capacity == capacity)
            .map(|s| s.share)
    }

    /// Failures on the wire (connect, timeout, transport), as opposed to answers the
    /// scenario's checks judged.
    pub fn transport_errors(&self) -> u64 {
        self.failures.connect + self.failures.timeout + self.failures.transport
    }
}

/// Each replica's share of the responses in `counts`.
pub fn shares(capacities: &[f64], counts: &[EndpointCount]) -> Vec<ShopShare> {
    let total: u64 = counts.iter().map(|c| c.responses).sum();
    capacities
        .iter()
        .zip(counts)
        .map(|(&capacity, count)| ShopShare {
            capacity,
            address: count.address.clone(),
            responses: count.responses,
            share: if total > 0 {
                count.responses as f64 / total as f64
            } else {
                0.0
            },
            weight: count.weight,
        })
        .collect()
}

/// The shop's own count of what the oversell bug did to the shared stock.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Oversold {
    /// Products below zero stock.
    pub products: u32,
    /// Units sold that did not exist.
    pub units: i64,
}

/// The oversell phase's findings.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OversellRow {
    /// Requests the bots sent.
    pub requests: u64,
    /// Wall time of the run, in seconds.
    pub seconds: f64,
    /// Checkout requests sent (placed or refused for want of stock).
    pub checkouts: u64,
    /// The invariant's name.
    pub invariant: String,
    /// Times it was checked.
    pub checks: u64,
    /// Times it did not hold.
    pub violations: u64,
    /// The first offending response.
    pub first_violation: Option<FailureExample>,
    /// What the shop itself counted (the replicas share one stock).
    pub oversold: Oversold,
}

impl OversellRow {
    /// The oversell phase from the bots' `results`, watching `invariant`, and what
    /// the replicas reported when they stopped.
    pub fn new(results: &Results, elapsed: Duration, invariant: &str, stopped: &[Stopped]) -> Self {
        let record = results
            .invariants
            .get(invariant)
            .cloned()
            .unwrap_or_default();
        let checkouts = results.states.get("checkout").map_or(0, |s| s.requests);
        Self {
            requests: results.requests,
            seconds: elapsed.as_secs_f64(),
            checkouts,
            invariant: invariant.to_owned(),
            checks: record.checks,
            violations: record.violations,
            first_violation: record.examples.first().cloned(),
            // Every replica reads the same store, so any one's count is the shop's.
            oversold: stopped
                .first()
                .map(|s| Oversold {
                    products: s.oversold.products,
                    units: s.oversold.units,
                })
                .unwrap_or_default(),
        }
    }
}

/// Everything the demo found; `--json` writes this.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// How the run was set up.
    pub settings: Settings,
    /// The baseline.
    pub round_robin: AlgorithmRow,
    /// The policy as written.
    pub cpu_weighted: AlgorithmRow,
    /// The bug hunt.
    pub oversell: OversellRow,
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `830µs`, `24.1ms`, `2.41s`.
pub fn human_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0}µs", ms * 1e3)
    } else if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1e3)
    }
}

/// `1`, `2`, `0.5`: capacities as the shop's `--capacity` takes them.
fn capacity(c: f64) -> String {
    format!("{c}")
}

/// At most `max` characters of `text`, on one line.
fn excerpt(text: &str, max: usize) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        line
    } else {
        let cut: String = line.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// The comparison table and the oversell findings, as printed to stdout.
pub fn render(report: &Report) -> String {
    let s = &report.settings;
    let (rr, cw) = (&report.round_robin, &report.cpu_weighted);
    let mut out = String::new();
    let capacities: Vec<String> = s.capacities.iter().map(|c| capacity(*c)).collect();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let per_unit = f64::from(s.base_workers) / (s.service_time_ms / 1e3);
    let rates: Vec<String> = s
        .capacities
        .iter()
        .map(|c| format!("{:.0}", c * per_unit))
        .collect();
    let _ = writeln!(
        out,
        "Trimtab local demo: {} bot users ({}) → the sidecar ({}) →\n\
         shop replicas of capacity {} ({} worker slots × {} per unit: {} requests/s);\n\
         {:.0}s per phase, seed {}\n",
        s.users,
        s.loadtest,
        s.policy,
        capacities.join(":"),
        s.base_workers,
        human_ms(s.service_time_ms),
        rates.join("/"),
        s.phase_seconds,
        s.seed,
    );
    let _ = writeln!(
        out,
        "{:<28} {:>14} {:>14}",
        "", "round robin", "cpuWeighted"
    );
    let mut row = |name: &str, a: String, b: String| {
        let _ = writeln!(out, "{name:<28} {a:>14} {b:>14}");
    };
    row(
        "throughput (requests/s)",
        format!("{:.1}", rr.throughput),
        format!("{:.1}", cw.throughput),
    );
    row("requests", rr.requests.to_string(), cw.requests.to_string());
    row("p50 (corrected)", human_ms(rr.p50_ms), human_ms(cw.p50_ms));
    row("p99 (corrected)", human_ms(rr.p99_ms), human_ms(cw.p99_ms));
    row("errors", rr.errors.to_string(), cw.errors.to_string());
    let unauthorized = rr.unauthorized + cw.unauthorized > 0;
    if unauthorized {
        row(
            "  of which 401 (see below)",
            rr.unauthorized.to_string(),
            cw.unauthorized.to_string(),
        );
    }
    for (a, b) in rr.shops.iter().zip(&cw.shops) {
        row(
            &format!("share, capacity-{} shop", capacity(a.capacity)),
            format!("{:.1}%", a.share * 100.0),
            format!("{:.1}%", b.share * 100.0),
        );
    }
    let weights = |row: &AlgorithmRow| {
        if row.algorithm == "roundRobin" {
            // Round robin has no weights; the config's 1:1:1 would read as learnt.
            return "—".to_owned();
        }
        row.shops
            .iter()
            .map(|s| s.weight.to_string())
            .collect::<Vec<_>>()
            .join(":")
    };
    row("weights at the end", weights(rr), weights(cw));
    if unauthorized {
        let _ = writeln!(
            out,
            "\n401: the answering replica did not know the user's session (the replicas share\n\
             one store, so this means a session was lost; see examples/demo/README.md)."
        );
    }

    let o = &report.oversell;
    let _ = writeln!(
        out,
        "\noversell phase (shops restarted with --bug oversell, cpuWeighted, a flash sale):"
    );
    let _ = writeln!(
        out,
        "  {} requests, {} checkouts; invariant {}: {} checks, {} violations",
        o.requests, o.checkouts, o.invariant, o.checks, o.violations
    );
    match &o.first_violation {
        Some(e) => {
            let status = e
                .status
                .map_or_else(|| "no response".to_owned(), |s| s.to_string());
            let _ = writeln!(
                out,
                "  first violation: {} → {status}: {}\n    {}",
                e.request,
                e.detail,
                excerpt(&e.response, 160)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  no violation seen in this run: the race needs two checkouts of the last\n  \
                 units within the same millisecond (run again, or with more --users)"
            );
        }
    }
    let _ = writeln!(
        out,
        "  oversold, by the shop's own count: {} products, {} units",
        o.oversold.products, o.oversold.units
    );
    out
}

#[cfg(test)]
mod tests {
    use trimtab_sidecar::bots::results::{FailureKind, InvariantResults, StateResults};

    use super::*;

    fn count(address: &str, responses: u64, weight: u32) -> EndpointCount {
        EndpointCount {
            address: address.into(),
            responses,
            failures: 0,
            weight,
        }
    }

    fn results(requests: u64, latencies_ms: &[u64]) -> Results {
        let mut r = Results {
            requests,
            ..Results::default()
        };
        for ms in latencies_ms {
            let d = Duration::from_millis(*ms);
            r.latency.record(d, d);
        }
        r
    }

    #[test]
    fn shares_add_up_to_one_in_endpoint_order() {
        let s = shares(
            &[1.0, 2.0, 4.0],
            &[
                count("a:1", 100, 14),
                count("b:1", 200, 28),
                count("c:1", 400, 57),
            ],
        );
        let fractions: Vec<f64> = s.iter().map(|s| s.share).collect();
        assert!((fractions.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!((fractions[2] - 4.0 / 7.0).abs() < 1e-9);
        assert_eq!(s[1].address, "b:1");
        assert_eq!(s[2].weight, 57);
    }

    #[test]
    fn no_responses_means_no_share_rather_than_nan() {
        let s = shares(&[1.0], &[count("a:1", 0, 1)]);
        assert_eq!(s[0].share, 0.0);
    }

    #[test]
    fn a_row_takes_throughput_and_corrected_percentiles_from_the_results() {
        let mut r = results(1000, &[10; 99]);
        r.latency
            .record(Duration::from_secs(2), Duration::from_millis(5));
        r.failures.add(FailureKind::Transport);
        r.failures.add(FailureKind::Check);
        let row = AlgorithmRow::new(
            "roundRobin",
            &r,
            Duration::from_secs(10),
            &[1.0],
            &[count("a:1", 1000, 1)],
        );
        assert_eq!(row.throughput, 100.0);
        assert!((row.p50_ms - 10.0).abs() < 0.1, "{}", row.p50_ms);
        assert!(row.p99_ms < 11.0, "{}", row.p99_ms);
        assert_eq!(row.errors, 2);
        assert_eq!(row.transport_errors(), 1);
        assert_eq!(row.share_of(1.0), Some(1.0));
    }

    #[test]
    fn the_oversell_row_keeps_the_first_violation_and_counts_checkouts() {
        let example = FailureExample {
            user: u64::MAX,
            state: "invariant stock-never-negative".into(),
            kind: FailureKind::Check,
            request: "GET /api/admin/stock".into(),
            status: Some(200),
            detail: "expect `...` is false".into(),
            response: r#"{"items":[{"id":1,"stock":-2}]}"#.into(),
        };
        let mut r = results(50, &[]);
        r.invariants.insert(
            "stock-never-negative".into(),
            InvariantResults {
                checks: 9,
                violations: 4,
                examples: vec![example.clone()],
            },
        );
        let checkout = StateResults {
            requests: 10,
            ..StateResults::default()
        };
        r.states.insert("checkout".into(), checkout);
        let row = OversellRow::new(&r, Duration::from_secs(5), "stock-never-negative", &[]);
        assert_eq!((row.checks, row.violations, row.checkouts), (9, 4, 10));
        assert_eq!(row.first_violation, Some(example));
    }

    #[test]
    fn the_table_puts_the_two_algorithms_side_by_side() {
        let rr = AlgorithmRow::new(
            "roundRobin",
            &results(3000, &[2500; 10]),
            Duration::from_secs(10),
            &[1.0, 2.0, 4.0],
            &[
                count("a:1", 1000, 1),
                count("b:1", 1000, 1),
                count("c:1", 1000, 1),
            ],
        );
        let cw = AlgorithmRow::new(
            "cpuWeighted",
            &results(5000, &[20; 10]),
            Duration::from_secs(10),
            &[1.0, 2.0, 4.0],
            &[
                count("a:1", 700, 25),
                count("b:1", 1400, 50),
                count("c:1", 2900, 100),
            ],
        );
        let report = Report {
            settings: Settings {
                capacities: vec![1.0, 2.0, 4.0],
                base_workers: 2,
                service_time_ms: 20.0,
                users: 400,
                phase_seconds: 10.0,
                seed: 0,
                policy: "examples/local-demo.yaml".into(),
                loadtest: "examples/shop-loadtest.yaml".into(),
            },
            round_robin: rr,
            cpu_weighted: cw,
            oversell: OversellRow::new(
                &Results::default(),
                Duration::ZERO,
                "stock-never-negative",
                &[],
            ),
        };
        let table = render(&report);
        assert!(
            table.contains(
                "capacity 1:2:4 (2 worker slots × 20.0ms per unit: 100/200/400 requests/s)"
            ),
            "{table}"
        );
        let line = |prefix: &str| {
            table
                .lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(line("throughput"), "throughput (requests/s) 300.0 500.0");
        assert_eq!(line("p99"), "p99 (corrected) 2.50s 20.0ms");
        assert_eq!(
            line("share, capacity-4"),
            "share, capacity-4 shop 33.3% 58.0%"
        );
        assert_eq!(line("weights"), "weights at the end — 25:50:100");
        assert!(!table.contains("401"), "no 401 row without 401s:\n{table}");
        assert!(table.contains("no violation seen"), "{table}");
    }
}
