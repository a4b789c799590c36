//! The failure conditions that retries (`spec.retries.on`) and LLM failover
//! (`spec.failover.on`) react to, named as Envoy's `retry_on` names them.

use std::{fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One condition under which a request is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// The TCP connection to the endpoint could not be established.
    ConnectFailure,
    /// The connection was reset or closed before a response arrived.
    Reset,
    /// No response (or, for LLM streams, no first byte) within the timeout.
    Timeout,
    /// Any 5xx response.
    ServerError,
    /// 502, 503 or 504: the endpoint's own gateway failed.
    GatewayError,
    /// Exactly this status code (4xx or 5xx), e.g. `503` or `429`.
    Status(u16),
}

/// The pattern the API server checks; the parser below accepts the same language.
pub const PATTERN: &str = "^(connect-failure|reset|timeout|5xx|gateway-error|[45][0-9][0-9])$";

/// A string that is not a retry condition.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown retry condition {0:?}: expected connect-failure, reset, timeout, 5xx, gateway-error or a 4xx/5xx status code"
)]
pub struct ParseRetryOnError(pub String);

impl RetryOn {
    /// Whether a response with `status` matches this condition.
    pub fn matches_status(self, status: u16) -> bool {
        match self {
            Self::ServerError => (500..600).contains(&status),
            Self::GatewayError => matches!(status, 502..=504),
            Self::Status(code) => code == status,
            Self::ConnectFailure | Self::Reset | Self::Timeout => false,
        }
    }
}

impl FromStr for RetryOn {
    type Err = ParseRetryOnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "connect-failure" => Self::ConnectFailure,
            "reset" => Self::Reset,
            "timeout" => Self::Timeout,
            "5xx" => Self::ServerError,
            "gateway-error" => Self::GatewayError,
            code => match code.parse::<u16>() {
                Ok(c) if code.len() == 3 && (400..600).contains(&c) => Self::Status(c),
                _ => return Err(ParseRetryOnError(s.to_owned())),
            },
        })
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConnectFailure => f.write_str("connect-failure"),
            Self::Reset => f.write_str("reset"),
            Self::Timeout => f.write_str("timeout"),
            Self::ServerError => f.write_str("5xx"),
            Self::GatewayError => f.write_str("gateway-error"),
            Self::Status(code) => write!(f, "{code}"),
        }
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // YAML users write `503` unquoted; accept the number as well as the string.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Code(u16),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Text(t) => t,
            Raw::Code(c) => c.to_string(),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for RetryOn {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RetryOn".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // int-or-string, so that `[503]` written unquoted in YAML is admitted too.
        // maxLength bounds the CEL cost estimate of the regex (it applies to strings only).
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "maxLength": 16,
            "x-kubernetes-validations": [{
                "rule": format!("type(self) == int ? (self >= 400 && self <= 599) : string(self).matches('{PATTERN}')"),
                "message": "must be connect-failure, reset, timeout, 5xx, gateway-error or a 4xx/5xx status code such as 503",
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_named_conditions_and_status_codes() {
        assert_eq!("reset".parse(), Ok(RetryOn::Reset));
        assert_eq!("503".parse(), Ok(RetryOn::Status(503)));
        assert!("200".parse::<RetryOn>().is_err());
        assert!("5000".parse::<RetryOn>().is_err());
        assert!("sometimes".parse::<RetryOn>().is_err());
    }

    #[test]
    fn accepts_unquoted_yaml_status_codes() {
        let on: Vec<RetryOn> =
            serde_yaml_ng::from_str("[connect-failure, 503, '429']").expect("valid");
        assert_eq!(
            on,
            [
                RetryOn::ConnectFailure,
                RetryOn::Status(503),
                RetryOn::Status(429)
            ]
        );
    }

    #[test]
    fn gateway_error_is_502_to_504() {
        assert!(RetryOn::GatewayError.matches_status(503));
        assert!(!RetryOn::GatewayError.matches_status(500));
        assert!(RetryOn::ServerError.matches_status(500));
    }
}
