//! Hand-written OpenAPI schemas for the Kubernetes types our resources embed.
//!
//! k8s-openapi's types carry no schemas of their own, and these need Kubernetes
//! extensions (list-map keys for server-side apply of conditions) that a derived schema
//! would not have.

use schemars::{Schema, SchemaGenerator, json_schema};

/// `metav1.LabelSelector`.
pub fn selector_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "description": "A label selector: matchLabels and matchExpressions are ANDed; an empty selector matches everything.",
        "properties": {
            "matchLabels": {
                "type": "object",
                "description": "Labels that must all be present with these values.",
                "additionalProperties": {"type": "string"},
            },
            "matchExpressions": {
                "type": "array",
                "description": "Label requirements that must all hold.",
                "x-kubernetes-list-type": "atomic",
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {"type": "string", "description": "The label key."},
                        "operator": {
                            "type": "string",
                            "enum": ["In", "NotIn", "Exists", "DoesNotExist"],
                            "description": "In, NotIn, Exists or DoesNotExist.",
                        },
                        "values": {
                            "type": "array",
                            "description": "Values for In and NotIn; empty for Exists and DoesNotExist.",
                            "x-kubernetes-list-type": "atomic",
                            "items": {"type": "string"},
                        },
                    },
                },
            },
        },
        "x-kubernetes-map-type": "atomic",
    })
}

/// A list of `metav1.Condition`, keyed by `type` so server-side apply merges per condition.
pub fn conditions_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "description": "The latest observations of the resource's state.",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "lastTransitionTime", "reason", "message"],
            "properties": {
                "type": {"type": "string", "maxLength": 316, "description": "The condition type, e.g. Ready."},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"], "description": "True, False or Unknown."},
                "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0, "description": "The generation the condition was set for."},
                "lastTransitionTime": {"type": "string", "format": "date-time", "description": "When the status last changed."},
                "reason": {"type": "string", "maxLength": 1024, "description": "A CamelCase reason for the last transition."},
                "message": {"type": "string", "maxLength": 32768, "description": "A human-readable message about the transition."},
            },
        },
    })
}

/// `corev1.ResourceRequirements` (requests and limits; quantities as int-or-string).
pub fn resources_schema(_: &mut SchemaGenerator) -> Schema {
    let quantities = json_schema!({
        "type": "object",
        "additionalProperties": {
            "x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        },
    });
    json_schema!({
        "type": "object",
        "description": "CPU and memory requests and limits of each runner pod's container.",
        "properties": {
            "requests": quantities.clone(),
            "limits": quantities,
        },
    })
}

/// Any JSON object, kept as written (request bodies in scenarios). Typed as an object
/// so that CEL rules can test its presence.
pub fn any_json_object_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "Any JSON value; strings inside are rendered as templates.",
    })
}

/// `metav1.Time`: an RFC 3339 timestamp.
pub fn time_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "format": "date-time"})
}
