//! The `loadReports` metrics source: utilization the sidecars saw in their backends'
//! ORCA `endpoint-load-metrics` headers, posted to the config server and combined here
//! across every reporting sidecar.
//!
//! Each sidecar sees only its own share of an endpoint's traffic, so the endpoint's
//! utilization is the request-weighted mean of the reports, its rate the sum of theirs.
//! Only each sidecar's newest report counts, and a report older than [`STALE_AFTER`]
//! (a sidecar that went away) drops out.
//!
//! The controller reads the reports at each policy's `weighting.interval`; a report
//! that shows a *step* (an endpoint's utilization moved by [`UTILIZATION_STEP`] or
//! its error rate by [`ERROR_RATE_STEP`] since that sidecar's last report, or a first
//! report) also asks for the policy's reconcile at once, so that a pod running hot is
//! relieved within milliseconds rather than up to an interval later. Drift below the
//! step waits for the interval: a step-triggered reconcile costs a status write.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;
use trimtab_api::sidecar_config::LoadReport;

use crate::{index::PolicyKey, weights::Sample};

/// A report older than this no longer counts.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// A change of an endpoint's reported utilization (CPU ÷ requests) this large is a
/// step: 10 points of the CPU request.
pub const UTILIZATION_STEP: f64 = 0.1;

/// A change of an endpoint's reported error rate this large is a step: 5 points.
pub const ERROR_RATE_STEP: f64 = 0.05;

/// Policies whose load stepped, queued for the controller; when it is full the
/// policies' next interval picks the reports up.
const STEP_QUEUE: usize = 1024;

/// The longest window a report may claim: longer ones are clamped, so that one sidecar
/// cannot make its share of the rate look negligible.
const MAX_WINDOW: Duration = Duration::from_secs(300);

/// A report that cannot be taken, naming the field.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReportError {
    /// `windowSeconds` is not a positive number of seconds.
    #[error("windowSeconds: {0} is not a positive number of seconds")]
    Window(f64),
    /// An endpoint's utilization is negative or not a number.
    #[error("endpoints[{index}].utilization: {value} is not a non-negative number")]
    Utilization {
        /// Position in `endpoints`.
        index: usize,
        /// The value sent.
        value: f64,
    },
    /// More errors than requests.
    #[error("endpoints[{index}].errors: {errors} is more than requests ({requests})")]
    Errors {
        /// Position in `endpoints`.
        index: usize,
        /// Errors sent.
        errors: u64,
        /// Requests sent.
        requests: u64,
    },
}

/// One sidecar's newest view of one endpoint.
#[derive(Clone, Debug)]
struct Seen {
    utilization: f64,
    requests: u64,
    errors: u64,
    window: Duration,
    at: SystemTime,
}

impl Seen {
    fn error_rate(&self) -> f64 {
        // Reports with no requests are not kept, see `record`.
        self.errors as f64 / self.requests.max(1) as f64
    }

    /// Whether `self`, following `before` from the same sidecar, is a step.
    fn steps_from(&self, before: &Seen) -> bool {
        (self.utilization - before.utilization).abs() >= UTILIZATION_STEP
            || (self.error_rate() - before.error_rate()).abs() >= ERROR_RATE_STEP
    }
}

/// `(policy, address)` → reporting pod UID → its newest report.
type Table = HashMap<(PolicyKey, String), HashMap<String, Seen>>;

/// The combined reports, shared by the config server (writes) and the controller
/// (reads).
#[derive(Clone, Debug, Default)]
pub struct LoadReports {
    table: Arc<Mutex<Table>>,
    /// Where policies whose load stepped go; `None` when nobody reconciles on them.
    steps: Option<mpsc::Sender<PolicyKey>>,
}

/// Checks a report before any of it is taken: all or nothing.
pub fn validate(report: &LoadReport) -> Result<(), ReportError> {
    if !(report.window_seconds.is_finite() && report.window_seconds > 0.0) {
        return Err(ReportError::Window(report.window_seconds));
    }
    for (index, e) in report.endpoints.iter().enumerate() {
        if !(e.utilization.is_finite() && e.utilization >= 0.0) {
            return Err(ReportError::Utilization {
                index,
                value: e.utilization,
            });
        }
        if e.errors > e.requests {
            return Err(ReportError::Errors {
                index,
                errors: e.errors,
                requests: e.requests,
            });
        }
    }
    Ok(())
}

impl LoadReports {
    /// Reports whose load steps send their policies to the returned receiver, for
    /// the controller to reconcile at once.
    pub fn with_steps() -> (Self, mpsc::Receiver<PolicyKey>) {
        let (sender, receiver) = mpsc::channel(STEP_QUEUE);
        let reports = Self {
            table: Arc::default(),
            steps: Some(sender),
        };
        (reports, receiver)
    }

    /// Takes a validated report from the pod `reporter` (its UID) in `namespace`, for
    /// the policies that pass `allowed`; returns how many entries were taken. The
    /// policies where the report is a step are sent on (see the module documentation).
    pub fn record(
        &self,
        namespace: &str,
        reporter: &str,
        report: &LoadReport,
        at: SystemTime,
        allowed: impl Fn(&str) -> bool,
    ) -> usize {
        let window = Duration::from_secs_f64(report.window_seconds).min(MAX_WINDOW);
        let mut stepped: Vec<PolicyKey> = Vec::new();
        let mut taken = 0;
        {
            let mut table = self.lock();
            for e in report
                .endpoints
                .iter()
                .filter(|e| e.requests > 0 && allowed(&e.policy))
            {
                let policy = (namespace.to_owned(), e.policy.clone());
                let seen = Seen {
                    utilization: e.utilization,
                    requests: e.requests,
                    errors: e.errors,
                    window,
                    at,
                };
                let before = table
                    .entry((policy.clone(), e.address.clone()))
                    .or_default()
                    .insert(reporter.to_owned(), seen.clone());
                if before.is_none_or(|b| seen.steps_from(&b)) && !stepped.contains(&policy) {
                    stepped.push(policy);
                }
                taken += 1;
            }
        }
        if let Some(steps) = &self.steps {
            for policy in stepped {
                if let Err(e) = steps.try_send(policy) {
                    tracing::debug!(error = %e, "load step not queued; the interval will pick it up");
                }
            }
        }
        taken
    }

    /// The combined sample per endpoint address of `policy`, from reports no older
    /// than [`STALE_AFTER`] at `now`. Stale reports are dropped for good.
    pub fn samples(&self, policy: &PolicyKey, now: SystemTime) -> HashMap<String, Sample> {
        let mut table = self.lock();
        let mut samples = HashMap::new();
        table.retain(|(key, address), reporters| {
            reporters.retain(|_, s| {
                now.duration_since(s.at)
                    .map_or(true, |age| age <= STALE_AFTER)
            });
            if reporters.is_empty() {
                return false;
            }
            if key == policy
                && let Some(sample) = combine(reporters.values())
            {
                samples.insert(address.clone(), sample);
            }
            true
        });
        samples
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Each write is one insert or retain: a panicked holder left it consistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Request-weighted utilization, summed rate, pooled error rate; stamped with the
/// newest report's time.
fn combine<'a>(reports: impl Iterator<Item = &'a Seen>) -> Option<Sample> {
    let (mut weighted, mut requests, mut errors, mut qps) = (0.0, 0u64, 0u64, 0.0);
    let mut newest: Option<&Seen> = None;
    for s in reports {
        weighted += s.utilization * s.requests as f64;
        requests += s.requests;
        errors += s.errors;
        qps += s.requests as f64 / s.window.as_secs_f64();
        if newest.is_none_or(|n| s.at > n.at) {
            newest = Some(s);
        }
    }
    let newest = newest?;
    (requests > 0).then(|| Sample {
        utilization: weighted / requests as f64,
        qps: Some(qps),
        error_rate: Some(errors as f64 / requests as f64),
        at: newest.at,
        window: Some(newest.window),
    })
}

#[cfg(test)]
mod tests {
    use trimtab_api::sidecar_config::EndpointLoad;

    use super::*;

    fn report(window: f64, entries: &[(&str, &str, f64, u64, u64)]) -> LoadReport {
        LoadReport {
            window_seconds: window,
            endpoints: entries
                .iter()
                .map(
                    |&(policy, address, utilization, requests, errors)| EndpointLoad {
                        policy: policy.into(),
                        address: address.into(),
                        utilization,
                        requests,
                        errors,
                    },
                )
                .collect(),
        }
    }

    fn key(name: &str) -> PolicyKey {
        ("shop".into(), name.into())
    }

    #[test]
    fn reports_of_many_sidecars_combine_by_request_weight() {
        let reports = LoadReports::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let all = |_: &str| true;
        reports.record(
            "shop",
            "pod-a",
            &report(10.0, &[("web", "10.0.0.1:80", 0.8, 300, 3)]),
            t0,
            all,
        );
        reports.record(
            "shop",
            "pod-b",
            &report(10.0, &[("web", "10.0.0.1:80", 0.4, 100, 0)]),
            t0,
            all,
        );
        // A newer report from pod-a replaces its older one instead of adding to it.
        reports.record(
            "shop",
            "pod-a",
            &report(10.0, &[("web", "10.0.0.1:80", 0.6, 100, 1)]),
            t0,
            all,
        );
        let samples = reports.samples(&key("web"), t0);
        let s = &samples["10.0.0.1:80"];
        assert!((s.utilization - 0.5).abs() < 1e-9, "{s:?}");
        assert_eq!(s.qps, Some(20.0));
        assert_eq!(s.error_rate, Some(0.005));
        assert!(reports.samples(&key("other"), t0).is_empty());
        assert!(
            reports
                .samples(&("elsewhere".into(), "web".into()), t0)
                .is_empty()
        );
    }

    #[test]
    fn first_reports_and_load_steps_ask_for_a_reconcile_and_drift_does_not() {
        let (reports, mut steps) = LoadReports::with_steps();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut send = |pod: &str, entries: &[(&str, &str, f64, u64, u64)]| {
            reports.record("shop", pod, &report(1.0, entries), t0, |_| true);
            std::iter::from_fn(|| steps.try_recv().ok()).collect::<Vec<_>>()
        };
        // First reports step, once per policy however many of its endpoints they name.
        assert_eq!(
            send(
                "pod-a",
                &[
                    ("web", "10.0.0.1:80", 0.5, 10, 0),
                    ("web", "10.0.0.2:80", 0.5, 10, 0),
                    ("api", "10.0.0.3:80", 0.5, 10, 0)
                ]
            ),
            [key("web"), key("api")]
        );
        // Drift below the steps waits for the interval…
        assert!(send("pod-a", &[("web", "10.0.0.1:80", 0.58, 10, 0)]).is_empty());
        // …a utilization step or an error-rate step does not, nor does another sidecar's
        // first report.
        assert_eq!(
            send("pod-a", &[("web", "10.0.0.1:80", 0.9, 10, 0)]),
            [key("web")]
        );
        assert_eq!(
            send("pod-a", &[("web", "10.0.0.1:80", 0.9, 10, 1)]),
            [key("web")]
        );
        assert_eq!(
            send("pod-b", &[("api", "10.0.0.3:80", 0.5, 10, 0)]),
            [key("api")]
        );
        // Without a receiver, reports are only recorded.
        let quiet = LoadReports::default();
        let taken = quiet.record(
            "shop",
            "pod-a",
            &report(1.0, &[("web", "10.0.0.1:80", 0.5, 10, 0)]),
            t0,
            |_| true,
        );
        assert_eq!(taken, 1);
    }

    #[test]
    fn stale_reports_drop_out_and_disallowed_policies_are_not_taken() {
        let reports = LoadReports::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let taken = reports.record(
            "shop",
            "pod-a",
            &report(
                5.0,
                &[
                    ("web", "10.0.0.1:80", 0.5, 10, 0),
                    ("secret", "10.0.0.2:80", 0.9, 10, 0),
                ],
            ),
            t0,
            |p| p == "web",
        );
        assert_eq!(taken, 1);
        assert!(reports.samples(&key("secret"), t0).is_empty());
        assert_eq!(reports.samples(&key("web"), t0 + STALE_AFTER).len(), 1);
        assert!(
            reports
                .samples(&key("web"), t0 + STALE_AFTER + Duration::from_secs(1))
                .is_empty()
        );
    }

    #[test]
    fn bad_reports_are_refused_naming_the_field() {
        assert_eq!(validate(&report(0.0, &[])), Err(ReportError::Window(0.0)));
        let e = validate(&report(
            1.0,
            &[("web", "a:1", 0.1, 1, 0), ("web", "b:1", f64::NAN, 1, 0)],
        ))
        .expect_err("nan");
        assert!(e.to_string().starts_with("endpoints[1].utilization"), "{e}");
        let e = validate(&report(1.0, &[("web", "a:1", 0.1, 1, 2)])).expect_err("errors");
        assert_eq!(
            e.to_string(),
            "endpoints[0].errors: 2 is more than requests (1)"
        );
    }
}
