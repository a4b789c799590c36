//! The ORCA load report the shop attaches to every response, so a client-side balancer
//! (Trimtab's `cpuWeighted` with `source: loadReports`, Envoy, gRPC) can weight it by
//! what it feels rather than guess from latency.
//!
//! Format: the `endpoint-load-metrics` header in ORCA's TEXT form, comma-separated
//! `key=value` pairs after the word `TEXT`, with the field names of
//! `xds.data.orca.v3.OrcaLoadReport` and application metrics as `named_metrics.<name>`:
//!
//! ```text
//! endpoint-load-metrics: TEXT cpu_utilization=0.4213, rps_fractional=123.40, eps=0.00, named_metrics.demand=0.4630, named_metrics.workers=4, named_metrics.queued=0
//! ```
//!
//! `cpu_utilization` is the busy share of the worker slots: what a CPU gauge would show
//! if each slot were a core. `application_utilization` is deliberately not sent, so
//! balancers that prefer it (gRFC A58 does) fall back to `cpu_utilization`, the same
//! signal a `metricsServer` source would give. The demand on the slots, which exceeds 1
//! when requests queue, is there as `named_metrics.demand` for whoever wants it.

use crate::load::LoadReport;

/// The response header name ORCA uses over HTTP.
pub const HEADER: &str = "endpoint-load-metrics";

/// The header value for `report`.
pub fn text(report: &LoadReport) -> String {
    format!(
        "TEXT cpu_utilization={:.4}, rps_fractional={:.2}, eps={:.2}, named_metrics.demand={:.4}, named_metrics.workers={}, named_metrics.queued={}",
        finite(report.utilization),
        finite(report.rps),
        finite(report.eps),
        finite(report.demand),
        report.workers,
        report.queued.max(0),
    )
}

/// ORCA values are non-negative numbers; never let a NaN reach a parser.
fn finite(value: f64) -> f64 {
    if value.is_finite() {
        value.max(0.0)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_the_fields_orca_parsers_read() {
        let report = LoadReport {
            utilization: 0.42,
            demand: 0.5,
            rps: 123.4,
            eps: 0.0,
            workers: 4,
            queued: 0,
        };
        assert_eq!(
            text(&report),
            "TEXT cpu_utilization=0.4200, rps_fractional=123.40, eps=0.00, named_metrics.demand=0.5000, named_metrics.workers=4, named_metrics.queued=0"
        );
    }

    #[test]
    fn every_pair_is_key_equals_non_negative_number() {
        let report = LoadReport {
            utilization: f64::NAN,
            demand: -1.0,
            rps: f64::INFINITY,
            eps: 1.0,
            workers: 1,
            queued: -3,
        };
        let value = text(&report);
        let body = value.strip_prefix("TEXT ").expect("TEXT format");
        for pair in body.split(", ") {
            let (key, number) = pair.split_once('=').expect("key=value");
            let number: f64 = number.parse().expect("a number");
            assert!(number >= 0.0 && number.is_finite(), "{key}={number}");
        }
    }
}
