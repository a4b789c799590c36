//! When a failed request is tried again, and how long to wait first. Pure functions:
//! the forwarding loop asks them and does the I/O.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, header::RETRY_AFTER};
use rand::Rng;
use trimtab_api::{RetryOn, balancer_policy::Retries};

/// Envoy's `min_retry_concurrency`: a retry budget always allows this many concurrent
/// retries, so that a route with little traffic can still retry at all.
pub const MIN_RETRY_CONCURRENCY: u64 = 3;

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The endpoint answered with this status.
    Status(u16),
    /// No TCP connection could be made.
    ConnectFailure,
    /// Connecting took longer than `timeouts.connect`.
    ConnectTimeout,
    /// The connection broke before a response arrived.
    Reset,
}

impl Failure {
    /// Whether `on` lists this failure.
    pub fn matches(self, on: &[RetryOn]) -> bool {
        on.iter().any(|c| match self {
            Self::Status(status) => c.matches_status(status),
            Self::ConnectFailure => *c == RetryOn::ConnectFailure,
            Self::ConnectTimeout => matches!(c, RetryOn::ConnectFailure | RetryOn::Timeout),
            Self::Reset => *c == RetryOn::Reset,
        })
    }
}

/// Idempotent methods (RFC 9110 §9.2.2): repeating them has the effect of sending once.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a request with `method` may be retried under `cfg` at all.
pub fn may_retry_method(method: &Method, cfg: &Retries) -> bool {
    cfg.attempts > 0 && (cfg.non_idempotent || is_idempotent(method))
}

/// The retry budget (Envoy's `retry_budget`, Linkerd's retry budget): retries in flight
/// may be at most `budget_percent` of the requests in flight, but at least
/// [`MIN_RETRY_CONCURRENCY`]. During an outage every request fails, and without this
/// each would be sent `1 + attempts` times.
pub fn budget_allows(active_requests: u64, active_retries: u64, budget_percent: u32) -> bool {
    let budget = (active_requests * u64::from(budget_percent) / 100).max(MIN_RETRY_CONCURRENCY);
    active_retries < budget
}

/// Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff
/// and Jitter"): uniform in [0, min(max, base × 2^retry)). `retry` counts from 0.
pub fn backoff<R: Rng + ?Sized>(
    retry: u32,
    base: Duration,
    max: Duration,
    rng: &mut R,
) -> Duration {
    let ceiling = base
        .saturating_mul(1_u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
        .min(max);
    if ceiling.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_nanos(rng.random_range(0..u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX)))
}

/// A `Retry-After` response header (RFC 9110 §10.2.3: delay-seconds or an HTTP-date),
/// capped at `max`. `None` when absent or unreadable.
pub fn retry_after(headers: &HeaderMap, now: SystemTime, max: Duration) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(max))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::balancer::test_support::seeded;

    #[test]
    fn only_idempotent_methods_are_retried_unless_configured() {
        let mut cfg = Retries::default();
        assert!(may_retry_method(&Method::GET, &cfg));
        assert!(may_retry_method(&Method::PUT, &cfg));
        assert!(!may_retry_method(&Method::POST, &cfg));
        cfg.non_idempotent = true;
        assert!(may_retry_method(&Method::POST, &cfg));
        cfg.attempts = 0;
        assert!(!may_retry_method(&Method::GET, &cfg));
    }

    #[test]
    fn failures_match_their_retry_conditions() {
        let on = [RetryOn::ConnectFailure, RetryOn::Status(503)];
        assert!(Failure::ConnectFailure.matches(&on));
        assert!(Failure::ConnectTimeout.matches(&on));
        assert!(Failure::Status(503).matches(&on));
        assert!(!Failure::Status(500).matches(&on));
        assert!(!Failure::Reset.matches(&on));
        assert!(Failure::Status(502).matches(&[RetryOn::GatewayError]));
    }

    #[test]
    fn retry_budget_is_a_share_of_active_requests_with_a_floor() {
        assert!(budget_allows(100, 19, 20));
        assert!(!budget_allows(100, 20, 20));
        assert!(budget_allows(1, 2, 20));
        assert!(!budget_allows(1, 3, 20));
    }

    #[test]
    fn backoff_doubles_and_is_capped_with_full_jitter() {
        let mut rng = seeded();
        let base = Duration::from_millis(25);
        let max = Duration::from_millis(250);
        for retry in 0..10 {
            let ceiling = (base * 2_u32.pow(retry)).min(max);
            for _ in 0..50 {
                assert!(backoff(retry, base, max, &mut rng) < ceiling);
            }
        }
        assert_eq!(backoff(3, Duration::ZERO, max, &mut rng), Duration::ZERO);
    }

    #[test]
    fn honours_retry_after_seconds_and_dates_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let max = Duration::from_secs(2);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now, max), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        assert_eq!(retry_after(&h, now, max), Some(Duration::from_secs(1)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h, now, max), Some(max));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(1));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&date).expect("ascii"));
        assert_eq!(retry_after(&h, now, max), Some(Duration::from_secs(1)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now, max), None);
    }
}
