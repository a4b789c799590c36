//! Live LoadTest numbers on the operator's `/metrics`, from the same merged results as
//! `status`, labelled by test. A test's series go when it ends (its final numbers stay
//! in its status and report), so finished tests do not pile up label sets; so do a
//! deleted test's, and every series of a replica that stops leading (the new leader
//! publishes them).

use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};
use trimtab_api::guard::GuardState;

use super::runs::{RunSnapshot, TestKey};

/// The families, registered once.
#[derive(Clone, Debug)]
pub struct LoadTestMetrics {
    requests: IntGaugeVec,
    failures: IntGaugeVec,
    active_users: IntGaugeVec,
    rps: GaugeVec,
    p99: GaugeVec,
    violations: IntGaugeVec,
    guard: IntGaugeVec,
}

const LABELS: [&str; 2] = ["namespace", "loadtest"];

impl LoadTestMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let int = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &LABELS);
        let float = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &LABELS);
        let metrics = Self {
            requests: int(
                "trimtab_loadtest_requests",
                "Requests the runners sent so far",
            )?,
            failures: int(
                "trimtab_loadtest_failed_requests",
                "Requests that failed so far (transport errors and failed checks)",
            )?,
            active_users: int(
                "trimtab_loadtest_active_users",
                "Bot users active across runners",
            )?,
            rps: float(
                "trimtab_loadtest_requests_per_second",
                "Requests per second over the last sampling interval",
            )?,
            p99: float(
                "trimtab_loadtest_latency_p99_seconds",
                "p99 of corrected latency, from the runners' merged histograms",
            )?,
            violations: int(
                "trimtab_loadtest_invariant_violations",
                "Invariant violations so far, all invariants",
            )?,
            guard: int(
                "trimtab_loadtest_guard_state",
                "The guard: 0 running, 1 holding at maxLoad, 2 aborted at criticalLoad",
            )?,
        };
        let (ints, floats) = metrics.families();
        for c in ints {
            registry.register(Box::new(c.clone()))?;
        }
        for g in floats {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(metrics)
    }

    /// Every family, integer and float: the one list register, remove and clear use.
    fn families(&self) -> ([&IntGaugeVec; 5], [&GaugeVec; 2]) {
        (
            [
                &self.requests,
                &self.failures,
                &self.active_users,
                &self.violations,
                &self.guard,
            ],
            [&self.rps, &self.p99],
        )
    }

    /// Sets the test's series from `run`.
    pub fn set(&self, (namespace, name): &TestKey, run: &RunSnapshot) {
        let labels = [namespace.as_str(), name.as_str()];
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let r = &run.results;
        self.requests
            .with_label_values(&labels)
            .set(int(r.requests));
        self.failures
            .with_label_values(&labels)
            .set(int(r.failures.total()));
        self.active_users
            .with_label_values(&labels)
            .set(int(run.active_users));
        self.rps.with_label_values(&labels).set(run.rps);
        self.p99
            .with_label_values(&labels)
            .set(r.latency.corrected.quantile(0.99).as_secs_f64());
        self.violations
            .with_label_values(&labels)
            .set(int(r.violations()));
        self.guard.with_label_values(&labels).set(match run.guard {
            GuardState::Running => 0,
            GuardState::Holding => 1,
            GuardState::Aborted => 2,
        });
    }

    /// Drops the test's series.
    pub fn remove(&self, (namespace, name): &TestKey) {
        let labels = [namespace.as_str(), name.as_str()];
        let (ints, floats) = self.families();
        for c in ints {
            let _ = c.remove_label_values(&labels);
        }
        for g in floats {
            let _ = g.remove_label_values(&labels);
        }
    }

    /// Drops every test's series.
    pub fn clear(&self) {
        let (ints, floats) = self.families();
        for c in ints {
            c.reset();
        }
        for g in floats {
            g.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tests_series_appear_and_go() {
        let registry = Registry::new();
        let metrics = LoadTestMetrics::register(&registry).expect("registers");
        let key = ("shop".to_owned(), "black-friday".to_owned());
        let mut run = RunSnapshot {
            active_users: 7,
            guard: GuardState::Holding,
            ..RunSnapshot::default()
        };
        run.results.requests = 42;
        metrics.set(&key, &run);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("text");
        assert!(
            text.contains(
                r#"trimtab_loadtest_requests{loadtest="black-friday",namespace="shop"} 42"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"trimtab_loadtest_guard_state{loadtest="black-friday",namespace="shop"} 1"#
        ));
        metrics.remove(&key);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("text");
        assert!(!text.contains("black-friday"), "{text}");
    }
}
