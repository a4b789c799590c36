//! Status conditions: the named types and reasons the controllers write, and the rule
//! that `lastTransitionTime` only moves when a condition's status does.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// The policy's weights are computed and published.
pub const READY: &str = "Ready";
/// The policy works, but with stale or partial information.
pub const DEGRADED: &str = "Degraded";

/// Reasons, CamelCase as the API conventions ask.
pub mod reason {
    /// Weights computed from fresh samples and published.
    pub const WEIGHTS_APPLIED: &str = "WeightsApplied";
    /// The route is published; its algorithm needs no weights.
    pub const CONFIG_PUBLISHED: &str = "ConfigPublished";
    /// The Service has no ready endpoints.
    pub const NO_ENDPOINTS: &str = "NoEndpoints";
    /// The Service or its port does not exist.
    pub const SERVICE_NOT_FOUND: &str = "ServiceNotFound";
    /// The metrics source failed; the last weights are kept until they expire.
    pub const METRICS_UNAVAILABLE: &str = "MetricsUnavailable";
    /// Backend pods without CPU requests, so utilization cannot be computed.
    pub const CPU_REQUESTS_MISSING: &str = "CpuRequestsMissing";
    /// Every endpoint is above criticalLoad; sidecars balance across all (panic mode).
    pub const ALL_EJECTED: &str = "AllEndpointsEjected";
    /// Endpoints above criticalLoad stay Throttled: the rest could not take their
    /// traffic under maxLoad.
    pub const OUT_OF_CAPACITY: &str = "OutOfCapacity";
    /// A metrics source returned a value that is not a utilization.
    pub const INVALID_SAMPLE: &str = "InvalidSample";
    /// The client pod selector cannot be evaluated.
    pub const INVALID_SELECTOR: &str = "InvalidSelector";
    /// The LLM providers are published (with the keys that could be read).
    pub const PROVIDERS_PUBLISHED: &str = "ProvidersPublished";
    /// A provider's `apiKey.secretKeyRef` could not be read; it has no key.
    pub const SECRET_UNAVAILABLE: &str = "SecretUnavailable";
    /// Nothing is wrong.
    pub const AS_EXPECTED: &str = "AsExpected";
}

/// A condition of `type_` with `status`, observed at `generation`.
pub fn new(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// `desired`, with each condition's `lastTransitionTime` taken from `current` when its
/// status has not changed, so that the time says when the state began.
pub fn merge(current: &[Condition], desired: Vec<Condition>) -> Vec<Condition> {
    desired
        .into_iter()
        .map(|mut c| {
            if let Some(old) = current
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == c.status)
            {
                c.last_transition_time = old.last_transition_time.clone();
            }
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut old = new(READY, true, reason::WEIGHTS_APPLIED, "ok", Some(1));
        old.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        let same = merge(
            &[old.clone()],
            vec![new(
                READY,
                true,
                reason::WEIGHTS_APPLIED,
                "still ok",
                Some(2),
            )],
        );
        assert_eq!(same[0].last_transition_time, old.last_transition_time);
        assert_eq!(same[0].message, "still ok");
        let flipped = merge(
            &[old.clone()],
            vec![new(READY, false, reason::NO_ENDPOINTS, "none", Some(2))],
        );
        assert_ne!(flipped[0].last_transition_time, old.last_transition_time);
    }
}
