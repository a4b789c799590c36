//! What LoadTest runners and the operator say to each other (`docs/load-tests.md`).
//!
//! One call does everything: a runner `POST`s a [`RunnerReport`] to
//! [`report_path`] on the operator's HTTPS port, with the test's token as a bearer
//! token, and gets a [`Directive`] back. While it waits for the start the call is a
//! long poll that returns as soon as the operator has fixed the start time; while it
//! runs, it reports every few seconds and obeys the answer (hold at a ceiling, abort).
//!
//! Reports carry each runner's **cumulative** results, not deltas: the operator keeps
//! the newest report of each runner (by `seq`) and merges across runners, so a lost,
//! repeated or reordered report changes nothing, and a new leader rebuilds the totals
//! from the next round of reports.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::results::Results;

/// The key of the token in the per-test Secret `<test>-runner-token`.
pub const TOKEN_KEY: &str = "token";
/// The environment variable the runner reads the token from.
pub const TOKEN_ENV: &str = "TRIMTAB_LOADTEST_TOKEN";
/// The environment variable naming the test, `namespace/name`.
pub const TEST_ENV: &str = "TRIMTAB_LOADTEST";
/// The longest a waiting runner's report is held before the answer says "still waiting".
pub const MAX_WAIT_SECONDS: u64 = 10;
/// The largest report accepted: a few dozen states' histograms.
pub const MAX_REPORT_BYTES: usize = 8 << 20;

/// Where runner `index` of test `namespace/name` reports.
pub fn report_path(namespace: &str, name: &str, index: u32) -> String {
    format!("/v1/loadtests/{namespace}/{name}/runners/{index}")
}

/// The parts of a [`report_path`], or `None` when `path` is not one.
pub fn parse_report_path(path: &str) -> Option<(&str, &str, u32)> {
    let rest = path.strip_prefix("/v1/loadtests/")?;
    let mut parts = rest.split('/');
    let (namespace, name, runners, index) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || runners != "runners" || namespace.is_empty() || name.is_empty() {
        return None;
    }
    Some((namespace, name, index.parse().ok()?))
}

/// `at` as the protocol's times are written: microseconds since the Unix epoch.
pub fn unix_micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A protocol time back as a [`SystemTime`].
pub fn from_unix_micros(micros: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(micros)
}

/// Where a runner is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum RunnerStage {
    /// Compiled its scenario, reached the target, and waits for the start.
    Waiting,
    /// Sending load.
    Running,
    /// Done; `results` are final.
    Finished,
}

/// One runner's report.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunnerReport {
    /// Grows with every report of this runner; an older report than the newest seen is
    /// ignored.
    pub seq: u64,
    /// Where the runner is.
    pub stage: RunnerStage,
    /// When it began sending, in microseconds since the Unix epoch (from `Running` on):
    /// the start skew is the spread of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_unix_micros: Option<u64>,
    /// Users active now (parked users are not).
    #[serde(default)]
    pub active_users: u64,
    /// The users this runner runs (closed model) or may run at once (open model).
    #[serde(default)]
    pub target_users: u64,
    /// Everything measured so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<Results>,
}

/// What the operator tells a runner.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Directive {
    /// When every runner starts, in microseconds since the Unix epoch; absent until
    /// every runner has registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_unix_micros: Option<u64>,
    /// `maxLoad` tripped: hold this runner at this many active users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<u64>,
    /// `criticalLoad` tripped (or the test was stopped): stop sending now, for this
    /// reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_paths_round_trip_and_reject_anything_else() {
        let path = report_path("shop", "black-friday", 7);
        assert_eq!(path, "/v1/loadtests/shop/black-friday/runners/7");
        assert_eq!(parse_report_path(&path), Some(("shop", "black-friday", 7)));
        for bad in [
            "/v1/loadtests/shop/black-friday/runners/x",
            "/v1/loadtests/shop/black-friday/runners/7/more",
            "/v1/loadtests/shop/black-friday/pods/7",
            "/v1/loadtests//x/runners/1",
            "/v1/config",
        ] {
            assert_eq!(parse_report_path(bad), None, "{bad}");
        }
    }
}
