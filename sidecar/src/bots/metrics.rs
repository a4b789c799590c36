//! `/metrics` of a bots run, for Prometheus: what the progress bar shows, per state.
//!
//! Rendered at scrape time from a snapshot of the recorder, so the hot path records
//! into one place only. Latency is exported as a Prometheus histogram whose buckets
//! are read from the run's HDR histogram (corrected for coordinated omission), so
//! `histogram_quantile` over many runner pods stays meaningful; `_sum` is the HDR
//! mean times the count, exact to the histogram's 0.1% resolution.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use http::{Request, StatusCode};
use hyper::body::Incoming;
use prometheus::{
    Encoder as _, TextEncoder,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};
use tokio::net::TcpListener;

use super::{
    gate::UNLIMITED,
    results::{LatencyHistogram, Results},
    user::Shared,
};
use crate::admin::{serve_fn, text, with_type};

/// Latency bucket bounds, seconds: 1 ms to a minute (the histogram's ceiling).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Serves `/metrics` and `/live` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    serve_fn(listener, move |req: &Request<Incoming>| {
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n".into()),
            "/metrics" => match render(&shared) {
                Ok(body) => with_type(
                    http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body))),
                    "text/plain; version=0.0.4",
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics or /live\n".into(),
            ),
        }
    })
    .await;
}

/// The Prometheus text exposition of the run so far.
pub fn render(shared: &Shared) -> Result<String, prometheus::Error> {
    let results = shared.recorder.snapshot();
    let live = &shared.recorder.live;
    let mut families = vec![
        gauge(
            "trimtab_bots_active_users",
            "Users (closed model) or sessions (open model) sending now; parked users are not counted.",
            live.active_users.load(Relaxed) as f64,
        ),
        gauge(
            "trimtab_bots_guard_ceiling_users",
            "The guard's ceiling on active users while it holds the load (maxLoad); -1 when it does not.",
            match shared.gate.ceiling() {
                UNLIMITED => -1.0,
                users => users as f64,
            },
        ),
        gauge(
            "trimtab_bots_guard_aborted",
            "1 once the guard aborted the run (criticalLoad).",
            f64::from(u8::from(shared.gate.is_aborted())),
        ),
    ];
    families.extend(from_results(&results));
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The counters and histograms of `results` as metric families; families without a
/// sample (no invariants, no latency yet) are left out, as the text format requires.
pub fn from_results(results: &Results) -> Vec<MetricFamily> {
    let mut requests = Vec::new();
    let mut failures = Vec::new();
    let mut checks = Vec::new();
    let mut latency = Vec::new();
    for (state, r) in &results.states {
        let state_label = ("state", state.as_str());
        requests.push(counter(&[state_label], r.requests));
        let f = &r.failures;
        for (kind, n) in [
            ("connect", f.connect),
            ("timeout", f.timeout),
            ("status", f.status),
            ("check", f.check),
            ("render", f.render),
            ("transport", f.transport),
        ] {
            failures.push(counter(&[state_label, ("kind", kind)], n));
        }
        checks.push(counter(
            &[state_label, ("result", "passed")],
            r.checks_passed,
        ));
        checks.push(counter(
            &[state_label, ("result", "failed")],
            r.checks_failed,
        ));
        if r.latency.corrected.count() > 0 {
            latency.push(histogram(&[state_label], &r.latency.corrected));
        }
    }
    let mut invariant_checks = Vec::new();
    let mut violations = Vec::new();
    for (name, inv) in &results.invariants {
        invariant_checks.push(counter(&[("invariant", name.as_str())], inv.checks));
        violations.push(counter(&[("invariant", name.as_str())], inv.violations));
    }
    let mut families = vec![
        family(
            "trimtab_bots_requests_total",
            "Requests sent (or that failed to render), by scenario state.",
            MetricType::COUNTER,
            requests,
        ),
        family(
            "trimtab_bots_failures_total",
            "Failed requests by state and kind (connect, timeout, status, check, render, transport).",
            MetricType::COUNTER,
            failures,
        ),
        family(
            "trimtab_bots_checks_total",
            "Scenario checks evaluated, by state and result.",
            MetricType::COUNTER,
            checks,
        ),
        family(
            "trimtab_bots_request_duration_seconds",
            "Request latency from the intended start (corrected for coordinated omission), by state.",
            MetricType::HISTOGRAM,
            latency,
        ),
        family(
            "trimtab_bots_sessions_started_total",
            "Sessions started.",
            MetricType::COUNTER,
            vec![counter(&[], results.sessions_started)],
        ),
        family(
            "trimtab_bots_sessions_completed_total",
            "Sessions that reached a terminal state.",
            MetricType::COUNTER,
            vec![counter(&[], results.sessions_completed)],
        ),
        family(
            "trimtab_bots_dropped_arrivals_total",
            "Open-model arrivals refused at maxUsers or the guard's ceiling.",
            MetricType::COUNTER,
            vec![counter(&[], results.dropped_arrivals)],
        ),
        family(
            "trimtab_bots_invariant_checks_total",
            "Invariant checks run, by invariant.",
            MetricType::COUNTER,
            invariant_checks,
        ),
        family(
            "trimtab_bots_invariant_violations_total",
            "Invariant checks that found the rule broken, by invariant.",
            MetricType::COUNTER,
            violations,
        ),
    ];
    families.retain(|f| !f.get_metric().is_empty());
    families
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value((*value).to_owned());
            pair
        })
        .collect()
}

fn counter(pairs: &[(&str, &str)], value: u64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value as f64);
    let mut m = Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

fn histogram(pairs: &[(&str, &str)], latency: &LatencyHistogram) -> Metric {
    let hdr = &latency.0;
    let mut h = Histogram::default();
    h.set_sample_count(hdr.len());
    h.set_sample_sum(hdr.mean() * hdr.len() as f64 / 1e6);
    h.set_bucket(
        LATENCY_BUCKETS
            .iter()
            .map(|&bound| {
                let mut b = Bucket::default();
                b.set_upper_bound(bound);
                // Microseconds; every recorded value is at least 1 µs.
                b.set_cumulative_count(hdr.count_between(0, (bound * 1e6) as u64));
                b
            })
            .collect(),
    );
    let mut m = Metric::from_label(labels(pairs));
    m.set_histogram(h);
    m
}

fn gauge(name: &str, help: &str, value: f64) -> MetricFamily {
    let mut g = Gauge::default();
    g.set_value(value);
    family(name, help, MetricType::GAUGE, vec![Metric::from_gauge(g)])
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bots::results::StateResults;

    #[test]
    fn exports_counters_and_buckets_from_the_results() {
        let mut results = Results::default();
        let mut state = StateResults {
            requests: 3,
            ..StateResults::default()
        };
        state.failures.timeout = 1;
        for ms in [2, 40, 900] {
            state
                .latency
                .record(Duration::from_millis(ms), Duration::from_millis(ms));
        }
        results.states.insert("browse".into(), state);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&from_results(&results), &mut out)
            .expect("encode");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.contains("trimtab_bots_requests_total{state=\"browse\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("trimtab_bots_failures_total{state=\"browse\",kind=\"timeout\"} 1"),
            "{text}"
        );
        // 2 ms is under 2.5 ms; 40 ms under 50 ms; 900 ms under 1 s.
        for (le, n) in [
            ("0.001", 0),
            ("0.0025", 1),
            ("0.05", 2),
            ("1", 3),
            ("+Inf", 3),
        ] {
            let line = format!(
                "trimtab_bots_request_duration_seconds_bucket{{state=\"browse\",le=\"{le}\"}} {n}"
            );
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }
}
