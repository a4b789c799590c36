//! Per-pod overrides of the injected sidecar, read from the pod's annotations.
//!
//! A value that does not parse refuses the pod (the admission is denied naming the
//! annotation and the value): a pod that asked for a 64Mi sidecar and silently got the
//! default, or an empty image, is worse than a clear error at `kubectl apply`.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::ResourceRequirements, apimachinery::pkg::api::resource::Quantity,
};

/// Overrides the sidecar's image (`registry/repo:tag` or `…@sha256:…`).
pub const IMAGE: &str = "trimtab.dev/sidecar-image";
/// Overrides the sidecar's CPU request (a Kubernetes quantity: `100m`, `0.5`).
pub const CPU_REQUEST: &str = "trimtab.dev/sidecar-cpu-request";
/// Sets the sidecar's CPU limit (none by default: throttling a proxy adds latency to
/// every call of the application).
pub const CPU_LIMIT: &str = "trimtab.dev/sidecar-cpu-limit";
/// Overrides the sidecar's memory request (`64Mi`).
pub const MEMORY_REQUEST: &str = "trimtab.dev/sidecar-memory-request";
/// Overrides the sidecar's memory limit (`256Mi`).
pub const MEMORY_LIMIT: &str = "trimtab.dev/sidecar-memory-limit";
/// Overrides the sidecar's log filter (`TRIMTAB_LOG_LEVEL`: `debug`,
/// `info,trimtab_sidecar=debug`).
pub const LOG_LEVEL: &str = "trimtab.dev/sidecar-log-level";

/// Every override annotation, for documentation and tests.
pub const ALL: [&str; 6] = [
    IMAGE,
    CPU_REQUEST,
    CPU_LIMIT,
    MEMORY_REQUEST,
    MEMORY_LIMIT,
    LOG_LEVEL,
];

/// An override that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverrideError {
    /// The value does not parse.
    #[error("annotation {annotation}: {value:?} is not {expected}")]
    Invalid {
        /// The annotation.
        annotation: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// A request above its limit: the API server would refuse the pod anyway, with a
    /// message that does not say the sidecar's numbers came from an annotation.
    #[error("sidecar {resource} request {request} is above its limit {limit} ({source_of})")]
    RequestAboveLimit {
        /// `cpu` or `memory`.
        resource: &'static str,
        /// The request.
        request: String,
        /// The limit.
        limit: String,
        /// Which annotations (or defaults) they came from.
        source_of: String,
    },
}

/// The sidecar's settings after a pod's overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// The image.
    pub image: String,
    /// Requests and limits.
    pub resources: ResourceRequirements,
    /// The log filter.
    pub log_level: String,
}

/// Applies the overrides in `annotations` to the defaults.
pub fn apply(
    annotations: &BTreeMap<String, String>,
    image: &str,
    resources: &ResourceRequirements,
    log_level: &str,
) -> Result<Effective, OverrideError> {
    let mut effective = Effective {
        image: image.to_owned(),
        resources: resources.clone(),
        log_level: log_level.to_owned(),
    };
    if let Some(value) = annotations.get(IMAGE) {
        if !is_image_reference(value) {
            return Err(OverrideError::Invalid {
                annotation: IMAGE,
                value: value.clone(),
                expected: "an image reference (non-empty, no whitespace)",
            });
        }
        effective.image = value.clone();
    }
    if let Some(value) = annotations.get(LOG_LEVEL) {
        if !is_log_filter(value) {
            return Err(OverrideError::Invalid {
                annotation: LOG_LEVEL,
                value: value.clone(),
                expected: "a log filter such as info or info,trimtab_sidecar=debug",
            });
        }
        effective.log_level = value.clone();
    }
    for (annotation, field, resource) in [
        (CPU_REQUEST, Field::Requests, "cpu"),
        (CPU_LIMIT, Field::Limits, "cpu"),
        (MEMORY_REQUEST, Field::Requests, "memory"),
        (MEMORY_LIMIT, Field::Limits, "memory"),
    ] {
        let Some(value) = annotations.get(annotation) else {
            continue;
        };
        if parse_quantity(value).is_none() {
            return Err(OverrideError::Invalid {
                annotation,
                value: value.clone(),
                expected: "a Kubernetes quantity such as 100m, 0.5, 64Mi or 1G",
            });
        }
        let map = match field {
            Field::Requests => effective.resources.requests.get_or_insert_default(),
            Field::Limits => effective.resources.limits.get_or_insert_default(),
        };
        map.insert(resource.to_owned(), Quantity(value.trim().to_owned()));
    }
    for (resource, request_annotation, limit_annotation) in [
        ("cpu", CPU_REQUEST, CPU_LIMIT),
        ("memory", MEMORY_REQUEST, MEMORY_LIMIT),
    ] {
        let get = |map: &Option<BTreeMap<String, Quantity>>| {
            map.as_ref()
                .and_then(|m| m.get(resource))
                .map(|q| q.0.clone())
        };
        let (Some(request), Some(limit)) = (
            get(&effective.resources.requests),
            get(&effective.resources.limits),
        ) else {
            continue;
        };
        if let (Some(r), Some(l)) = (parse_quantity(&request), parse_quantity(&limit))
            && r > l
        {
            let origin = |annotation: &str| {
                if annotations.contains_key(annotation) {
                    format!("annotation {annotation}")
                } else {
                    "the operator's default".to_owned()
                }
            };
            return Err(OverrideError::RequestAboveLimit {
                resource,
                request,
                limit,
                source_of: format!(
                    "request from {}, limit from {}",
                    origin(request_annotation),
                    origin(limit_annotation)
                ),
            });
        }
    }
    Ok(effective)
}

enum Field {
    Requests,
    Limits,
}

fn is_image_reference(value: &str) -> bool {
    !value.is_empty() && !value.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn is_log_filter(value: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_,=:.-[]{}\"*".contains(c))
}

/// The value of a Kubernetes quantity (`resource.Quantity` syntax: a decimal number
/// with an optional binary suffix `Ki`…`Ei`, decimal suffix `n u m k M G T P E`, or
/// exponent `e3`), for validation and comparison; `None` when it does not parse.
pub fn parse_quantity(value: &str) -> Option<f64> {
    let value = value.trim();
    let split = value
        .char_indices()
        .find(|&(i, c)| c.is_ascii_alphabetic() && !(i == 0 && (c == '+' || c == '-')))
        .map_or(value.len(), |(i, _)| i);
    let (number, suffix) = value.split_at(split);
    if number.is_empty()
        || !number
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '+' || c == '-')
        || number.chars().skip(1).any(|c| c == '+' || c == '-')
        || number.matches('.').count() > 1
        || !number.chars().any(|c| c.is_ascii_digit())
    {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let digits = exponent.strip_prefix(['e', 'E'])?;
            let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if unsigned.is_empty() || !unsigned.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            10f64.powi(digits.parse().ok()?)
        }
    };
    let value = number * factor;
    (value.is_finite() && value >= 0.0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ResourceRequirements {
        serde_json::from_value(serde_json::json!({
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"}
        }))
        .expect("resources")
    }

    fn annotated(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn quantities_parse_like_the_api_server_reads_them() {
        for (text, value) in [
            ("100m", 0.1),
            ("0.5", 0.5),
            ("2", 2.0),
            ("64Mi", 64.0 * 1024.0 * 1024.0),
            ("1G", 1e9),
            ("1e3", 1000.0),
            ("1.5Gi", 1.5 * 1024f64.powi(3)),
            (".5", 0.5),
        ] {
            assert_eq!(parse_quantity(text), Some(value), "{text}");
        }
        for bad in ["", "lots", "64MB", "1..2", "-1", "m", "1e", "1 Gi", "Mi64"] {
            assert_eq!(parse_quantity(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn no_annotations_keep_the_defaults() {
        let effective = apply(&BTreeMap::new(), "sidecar:1", &defaults(), "info").expect("ok");
        assert_eq!(effective.image, "sidecar:1");
        assert_eq!(effective.resources, defaults());
        assert_eq!(effective.log_level, "info");
    }

    #[test]
    fn annotations_override_image_resources_and_log_level() {
        let effective = apply(
            &annotated(&[
                (IMAGE, "registry.example/trimtab-sidecar:dev"),
                (CPU_REQUEST, "200m"),
                (CPU_LIMIT, "1"),
                (MEMORY_REQUEST, "128Mi"),
                (MEMORY_LIMIT, "512Mi"),
                (LOG_LEVEL, "info,trimtab_sidecar=debug"),
            ]),
            "sidecar:1",
            &defaults(),
            "info",
        )
        .expect("ok");
        assert_eq!(effective.image, "registry.example/trimtab-sidecar:dev");
        assert_eq!(effective.log_level, "info,trimtab_sidecar=debug");
        let resources = serde_json::to_value(&effective.resources).expect("json");
        assert_eq!(
            resources,
            serde_json::json!({
                "requests": {"cpu": "200m", "memory": "128Mi"},
                "limits": {"cpu": "1", "memory": "512Mi"}
            })
        );
    }

    #[test]
    fn each_bad_annotation_is_refused_by_name_and_value() {
        for (annotation, value) in [
            (IMAGE, ""),
            (IMAGE, "has space:1"),
            (CPU_REQUEST, "fast"),
            (CPU_LIMIT, "1 core"),
            (MEMORY_REQUEST, "64MB"),
            (MEMORY_LIMIT, "-1Gi"),
            (LOG_LEVEL, ""),
            (LOG_LEVEL, "info; rm -rf /"),
        ] {
            let error = apply(
                &annotated(&[(annotation, value)]),
                "sidecar:1",
                &defaults(),
                "info",
            )
            .expect_err(annotation)
            .to_string();
            assert!(
                error.starts_with(&format!("annotation {annotation}: {value:?} is not")),
                "{error}"
            );
        }
    }

    #[test]
    fn a_request_above_its_limit_is_refused_naming_where_each_came_from() {
        let error = apply(
            &annotated(&[(MEMORY_REQUEST, "1Gi")]),
            "sidecar:1",
            &defaults(),
            "info",
        )
        .expect_err("1Gi > 256Mi")
        .to_string();
        assert_eq!(
            error,
            "sidecar memory request 1Gi is above its limit 256Mi (request from annotation \
             trimtab.dev/sidecar-memory-request, limit from the operator's default)"
        );
    }
}
