//! Durations as people write them in YAML: `500ms`, `10s`, `2m`, `1h30m`.
//!
//! The grammar is the subset of Go's `time.ParseDuration` that Kubernetes CEL's
//! `duration()` also accepts, so the API server can compare two durations in a
//! validation rule (`duration(self.timeout) <= duration(self.interval)`) and the
//! Rust side parses exactly what the API server admitted.

use std::{fmt, str::FromStr, time};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The regular expression the API server checks, kept beside the parser it mirrors.
/// (`[.]` rather than `\.`, so it can sit in a CEL string literal unescaped.)
pub const PATTERN: &str = r"^([0-9]+([.][0-9]+)?(ms|s|m|h))+$";

/// A duration that serializes as `1m30s` and validates at admission.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub time::Duration);

/// Why a duration string was refused; `at` is the byte offset of the problem.
#[allow(missing_docs)] // the fields are described by each variant's message
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseDurationError {
    /// The string was empty.
    #[error("empty duration: expected a number and a unit, such as 500ms, 10s, 2m or 1h30m")]
    Empty,
    /// A number was not followed by one of the units.
    #[error("duration {input:?}: missing or unknown unit at byte {at}; expected ms, s, m or h")]
    Unit { input: String, at: usize },
    /// A unit was not preceded by a number.
    #[error("duration {input:?}: expected a number at byte {at}")]
    Number { input: String, at: usize },
    /// The value does not fit a 64-bit nanosecond count.
    #[error("duration {input:?} is too large")]
    Overflow { input: String },
}

impl Duration {
    /// A duration of `secs` whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(time::Duration::from_secs(secs))
    }

    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(time::Duration::from_millis(ms))
    }

    /// The standard-library duration.
    pub const fn get(self) -> time::Duration {
        self.0
    }
}

impl From<time::Duration> for Duration {
    fn from(d: time::Duration) -> Self {
        Self(d)
    }
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(ParseDurationError::Empty);
        }
        let bytes = input.as_bytes();
        let mut total_nanos: u128 = 0;
        let mut i = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            let number = &input[start..i];
            let value: f64 = match number.parse() {
                Ok(v) if !number.starts_with('.') && !number.ends_with('.') => v,
                _ => {
                    return Err(ParseDurationError::Number {
                        input: input.to_owned(),
                        at: start,
                    });
                }
            };
            let unit_start = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let nanos_per_unit: f64 = match &input[unit_start..i] {
                "ms" => 1e6,
                "s" => 1e9,
                "m" => 60e9,
                "h" => 3600e9,
                _ => {
                    return Err(ParseDurationError::Unit {
                        input: input.to_owned(),
                        at: unit_start,
                    });
                }
            };
            // Rounding to whole nanoseconds is what Go does for fractional units.
            total_nanos += (value * nanos_per_unit).round() as u128;
        }
        let nanos = u64::try_from(total_nanos).map_err(|_| ParseDurationError::Overflow {
            input: input.to_owned(),
        })?;
        Ok(Self(time::Duration::from_nanos(nanos)))
    }
}

impl fmt::Display for Duration {
    /// Prints the shortest exact form: `1h30m`, `10s`, `250ms`, `1.5s` never appears
    /// because it prints as `1s500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms_total = self.0.as_millis();
        if ms_total == 0 {
            return f.write_str("0s");
        }
        let (h, rest) = (ms_total / 3_600_000, ms_total % 3_600_000);
        let (m, rest) = (rest / 60_000, rest % 60_000);
        let (s, ms) = (rest / 1000, rest % 1000);
        for (value, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
            if value > 0 {
                write!(f, "{value}{unit}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 32,
            "x-kubernetes-validations": [{
                "rule": format!("self.matches('{PATTERN}')"),
                "message": "must be a duration such as 500ms, 10s, 2m or 1h30m",
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_units_people_write() {
        let cases = [
            ("500ms", 500),
            ("10s", 10_000),
            ("2m", 120_000),
            ("1h30m", 5_400_000),
            ("1.5s", 1500),
            ("0s", 0),
        ];
        for (text, ms) in cases {
            assert_eq!(
                text.parse::<Duration>(),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_malformed_durations_naming_the_byte() {
        assert_eq!("".parse::<Duration>(), Err(ParseDurationError::Empty));
        assert!(matches!(
            "10".parse::<Duration>(),
            Err(ParseDurationError::Unit { at: 2, .. })
        ));
        assert!(matches!(
            "10 seconds".parse::<Duration>(),
            Err(ParseDurationError::Unit { at: 2, .. })
        ));
        assert!(matches!(
            "s".parse::<Duration>(),
            Err(ParseDurationError::Number { at: 0, .. })
        ));
        assert!(matches!(
            "1.s".parse::<Duration>(),
            Err(ParseDurationError::Number { at: 0, .. })
        ));
    }

    #[test]
    fn display_round_trips() {
        for text in ["1h30m", "10s", "250ms", "1s500ms", "0s", "2h"] {
            let d: Duration = text.parse().expect("valid");
            assert_eq!(d.to_string(), text);
        }
    }
}
