//! A LoadTest's numbers, as pure functions of the runners' merged results: the live
//! figures in `status` and, when the test ends, the report ConfigMap (`report.json`,
//! everything including the merged histograms; `summary.txt`, for people).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::Time};
use kube::ResourceExt;
use serde::Serialize;
use trimtab_api::{
    guard::{self, GuardEvent},
    load_test::{
        CheckCounts, GuardState, GuardStatus, InvariantStatus, LatencySummary, LoadTest,
        LoadTestStatus, Phase, RequestCounts, UserCounts,
    },
    results::{LatencyHistogram, Results, human},
    runner_protocol::unix_micros,
};

use super::{
    objects::{self, Progress},
    runs::RunSnapshot,
};

/// `report.json` in the report ConfigMap.
pub const REPORT_KEY: &str = "report.json";
/// `summary.txt` in the report ConfigMap.
pub const SUMMARY_KEY: &str = "summary.txt";
/// The most the report ConfigMap's data holds: the API server refuses a ConfigMap over
/// 1 MiB, and this leaves room for its metadata.
pub const MAX_REPORT_DATA: usize = 1_000_000;

/// Fills `status` with the live numbers of `run`.
pub fn fill_status(status: &mut LoadTestStatus, run: &RunSnapshot) {
    let results = &run.results;
    status.users = Some(UserCounts {
        active: run.active_users,
        target: run.target_users,
    });
    status.requests = Some(RequestCounts {
        total: results.requests,
        failed: results.failures.total(),
        // Two decimals: enough to read, and a status that does not churn on noise.
        rps: (run.rps * 100.0).round() / 100.0,
    });
    if results.latency.corrected.count() > 0 {
        status.latency = Some(latency_summary(&results.latency.corrected));
    }
    status.checks = Some(CheckCounts {
        passed: results.checks_passed,
        failed: results.checks_failed,
    });
    status.invariants = results
        .invariants
        .iter()
        .map(|(name, inv)| InvariantStatus {
            name: name.clone(),
            violations: inv.violations,
        })
        .collect();
    status.guard = Some(GuardStatus {
        state: match run.guard {
            guard::GuardState::Running => GuardState::Ok,
            guard::GuardState::Holding => GuardState::Holding,
            guard::GuardState::Aborted => GuardState::Aborted,
        },
        reason: run.guard_reason.clone(),
    });
}

/// Percentiles of a merged histogram, never of averaged percentiles.
pub fn latency_summary(h: &LatencyHistogram) -> LatencySummary {
    LatencySummary {
        p50: human(h.quantile(0.5)),
        p90: human(h.quantile(0.9)),
        p99: human(h.quantile(0.99)),
        p999: human(h.quantile(0.999)),
        max: human(h.max()),
    }
}

/// Everything `report.json` holds.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
struct Report<'a> {
    test: &'a str,
    phase: Phase,
    reason: &'a str,
    message: &'a str,
    start_time: Option<&'a Time>,
    /// The start every runner was given, to the microsecond.
    start_at_unix_micros: Option<u64>,
    completion_time: Option<&'a Time>,
    runners: u32,
    runners_reported: u32,
    start_skew_micros: Option<u64>,
    guard_events: &'a [GuardEvent],
    /// What was left out to fit the ConfigMap, when something was.
    #[serde(skip_serializing_if = "Option::is_none")]
    left_out: Option<&'static str>,
    results: &'a Results,
}

/// A way to shrink a report: what it leaves out, and how.
type Shrink = (&'static str, fn(&mut Results));

/// Ways to shrink a report that does not fit, mildest first: per-state histograms
/// (the overall ones keep every percentile), then per-state numbers and examples.
const SHRINK: [Shrink; 2] = [
    (
        "per-state latency histograms (the report would exceed the ConfigMap limit)",
        |r| {
            for state in r.states.values_mut() {
                state.latency = Default::default();
            }
        },
    ),
    (
        "per-state results and failure examples (the report would exceed the ConfigMap limit)",
        |r| {
            r.states.clear();
            r.failure_examples.clear();
            for invariant in r.invariants.values_mut() {
                invariant.examples.clear();
            }
        },
    ),
];

/// The report ConfigMap of a test that ended as `progress` says, owned by the test (it
/// survives the cleanup of the runners, not the deletion of the test).
pub fn config_map(
    test: &LoadTest,
    progress: &Progress,
    run: &RunSnapshot,
    status: &LoadTestStatus,
) -> Result<ConfigMap, serde_json::Error> {
    let name = test.name_any();
    let id = format!("{}/{name}", test.namespace().unwrap_or_default());
    let report = Report {
        test: &id,
        phase: progress.phase,
        reason: progress.reason,
        message: &progress.message,
        start_time: status.start_time.as_ref(),
        start_at_unix_micros: run.start_at.map(unix_micros),
        completion_time: status.completion_time.as_ref(),
        runners: test.spec.runners.parallelism,
        runners_reported: run.waiting + run.running + run.finished,
        start_skew_micros: run
            .start_skew
            .map(|s| u64::try_from(s.as_micros()).unwrap_or(u64::MAX)),
        guard_events: &run.guard_events,
        left_out: None,
        results: &run.results,
    };
    // The summary is a page of text whatever the test; the JSON is what can grow.
    let summary = summary(&report);
    let mut json = serde_json::to_string(&report)?;
    let mut shrunk = run.results.clone();
    for (what, shrink) in SHRINK {
        if json.len() + summary.len() <= MAX_REPORT_DATA {
            break;
        }
        shrink(&mut shrunk);
        json = serde_json::to_string(&Report {
            left_out: Some(what),
            results: &shrunk,
            ..report
        })?;
    }
    let mut map = objects::owned_config_map(test, objects::report_name(&name));
    map.data = Some(BTreeMap::from([
        (REPORT_KEY.to_owned(), json),
        (SUMMARY_KEY.to_owned(), summary),
    ]));
    Ok(map)
}

fn summary(report: &Report<'_>) -> String {
    let r = report.results;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "LoadTest {}: {:?} ({}) {}",
        report.test, report.phase, report.reason, report.message
    );
    let _ = writeln!(
        out,
        "runners {} (reported {}), start skew {}",
        report.runners,
        report.runners_reported,
        report
            .start_skew_micros
            .map_or("n/a".into(), |us| human(Duration::from_micros(us)))
    );
    let _ = writeln!(
        out,
        "requests {} · failed {} · checks {} passed, {} failed · sessions {} started, {} completed\n",
        r.requests,
        r.failures.total(),
        r.checks_passed,
        r.checks_failed,
        r.sessions_started,
        r.sessions_completed
    );
    out.push_str(&r.latency_table());
    if !r.invariants.is_empty() {
        let _ = writeln!(out, "\ninvariants:");
        for (name, inv) in &r.invariants {
            let _ = writeln!(
                out,
                "  {name}: {} violations in {} checks",
                inv.violations, inv.checks
            );
            for example in inv.examples.iter().take(3) {
                let _ = writeln!(
                    out,
                    "    e.g. {} → {}",
                    example.request,
                    example.response.chars().take(200).collect::<String>()
                );
            }
        }
    }
    for event in report.guard_events {
        let _ = writeln!(
            out,
            "guard {:>7.1} s: {:?} {}",
            event.at_seconds, event.state, event.reason
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use trimtab_api::results::InvariantResults;

    use super::*;

    #[test]
    fn status_numbers_come_from_the_merged_results() {
        let mut results = Results {
            requests: 10,
            checks_passed: 9,
            checks_failed: 1,
            ..Results::default()
        };
        for ms in 1..=10 {
            results
                .latency
                .record(Duration::from_millis(ms), Duration::from_millis(ms));
        }
        results.invariants.insert(
            "stock".into(),
            InvariantResults {
                checks: 4,
                violations: 2,
                examples: vec![],
            },
        );
        let run = RunSnapshot {
            results,
            rps: 12.345,
            active_users: 3,
            target_users: 4,
            ..RunSnapshot::default()
        };
        let mut status = LoadTestStatus::default();
        fill_status(&mut status, &run);
        assert_eq!(status.requests.as_ref().map(|r| r.rps), Some(12.35));
        // HDR buckets: the max reads as the bucket's highest equivalent value.
        let max = status
            .latency
            .as_ref()
            .map(|l| l.max.clone())
            .unwrap_or_default();
        assert!(max.starts_with("10.0") && max.ends_with("ms"), "{max}");
        assert_eq!(status.invariants[0].violations, 2);
        assert_eq!(status.users.as_ref().map(|u| u.active), Some(3));
        assert_eq!(status.guard.as_ref().map(|g| g.state), Some(GuardState::Ok));
    }

    #[test]
    fn a_report_too_large_for_a_config_map_leaves_out_per_state_detail() {
        let test = objects::tests::test_object();
        // Wide histograms in many states: several MB as JSON.
        let mut results = Results::default();
        for s in 0..trimtab_api::load_test::MAX_STATES {
            let state = results.states.entry(format!("state-{s}")).or_default();
            for us in (0..6000u64).map(|i| 1 + i * i) {
                state
                    .latency
                    .record(Duration::from_micros(us), Duration::from_micros(us + 1));
            }
            state.requests = 3000;
        }
        results
            .latency
            .record(Duration::from_millis(5), Duration::from_millis(5));
        results.requests = 384_000;
        let run = RunSnapshot {
            results,
            ..RunSnapshot::default()
        };
        let progress = Progress {
            phase: Phase::Succeeded,
            runners: Default::default(),
            reason: "RunnersSucceeded",
            message: "done".into(),
        };
        let map = config_map(&test, &progress, &run, &LoadTestStatus::default()).expect("a report");
        let data = map.data.expect("data");
        let size: usize = data.values().map(String::len).sum();
        assert!(size <= MAX_REPORT_DATA, "{size} bytes");
        let report: serde_json::Value = serde_json::from_str(&data[REPORT_KEY]).expect("JSON");
        assert!(
            report["leftOut"]
                .as_str()
                .is_some_and(|w| w.starts_with("per-state latency histograms")),
            "{}",
            report["leftOut"]
        );
        // The counts survive; so does the overall histogram.
        assert_eq!(report["results"]["requests"], 384_000);
        assert_eq!(report["results"]["states"]["state-7"]["requests"], 3000);
        let back: Results = serde_json::from_value(report["results"].clone()).expect("results");
        assert_eq!(back.latency.corrected.count(), 1);
    }
}
