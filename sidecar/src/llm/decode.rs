//! JSON decoding that names the path of what was wrong (`messages[2].content[0].source`),
//! so a bad request or a bad provider response can be answered with a message that says
//! exactly where to look.
//!
//! Tagged unions of the two dialects (messages by `role`, content blocks by `type`) are
//! decoded by hand through `from_value_at`: serde's derived internally tagged enums
//! would lose the path inside the variant, and could not keep unknown variants whole.

use serde::de::{self, DeserializeOwned};
use serde_json::Value;

/// A body that is not the JSON the dialect defines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON at {path}: {message}")]
pub struct DecodeError {
    /// Where: `.` for the document, else a path such as `messages[2].content`.
    pub path: String,
    /// What serde found and expected there.
    pub message: String,
}

/// Marks a path inside an error message raised by [`from_value_at`], so that [`decode`]
/// can join it to the path the outer deserializer tracked.
const PATH_MARK: char = '\u{1}';

/// Decodes `body` as `T`, naming the JSON path of the first problem.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let outer = e.path().to_string();
        let (path, message) = join_marked_path(outer, &e.into_inner().to_string());
        DecodeError { path, message }
    })?;
    de.end().map_err(|e| DecodeError {
        path: ".".into(),
        message: e.to_string(),
    })?;
    Ok(value)
}

/// Moves the marked path segments at the start of `message` onto `path`.
fn join_marked_path(mut path: String, mut message: &str) -> (String, String) {
    while let Some(rest) = message.strip_prefix(PATH_MARK) {
        let Some((segment, after)) = rest.split_once(PATH_MARK) else {
            break;
        };
        if path == "." {
            path.clear();
        }
        if !path.is_empty() && !segment.starts_with('[') {
            path.push('.');
        }
        path.push_str(segment);
        message = after;
    }
    (path, message.to_owned())
}

/// Decodes an already parsed `value` as `T` inside a hand-written `Deserialize`; the
/// error carries the path within `value`, and [`decode`] joins it to the outer path.
pub(crate) fn from_value_at<T: DeserializeOwned, E: de::Error>(value: Value) -> Result<T, E> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            E::custom(inner)
        } else {
            E::custom(format_args!("{PATH_MARK}{path}{PATH_MARK}{inner}"))
        }
    })
}

/// An error about `field` of the object being decoded.
pub(crate) fn field_error<E: de::Error>(field: &str, message: impl std::fmt::Display) -> E {
    E::custom(format_args!("{PATH_MARK}{field}{PATH_MARK}{message}"))
}

/// The string tag `field` of a JSON object, or an error naming it.
pub(crate) fn tag<'v, E: de::Error>(value: &'v Value, field: &'static str) -> Result<&'v str, E> {
    match value.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(field_error(
            field,
            format_args!("expected a string, found {other}"),
        )),
        None if value.is_object() => Err(E::missing_field(field)),
        None => Err(E::custom(format_args!(
            "expected an object with a {field:?} field, found {value}"
        ))),
    }
}

/// Defines a string enum whose unknown values are kept (`Other`), for the enumerations
/// the APIs extend over time (stop reasons, finish reasons).
macro_rules! open_string_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )* }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A value this version does not know, kept as it was sent.
            Other(String),
        }

        impl $name {
            /// The value as it appears on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Self::$variant => $text, )*
                    Self::Other(s) => s,
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $( $text => Self::$variant, )*
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                Ok(Self::from(s.as_ref()))
            }
        }
    };
}
pub(crate) use open_string_enum;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    struct Outer {
        #[allow(dead_code)]
        items: Vec<Inner>,
    }
    #[derive(Debug, Deserialize)]
    struct Inner {
        #[allow(dead_code)]
        n: u32,
    }

    #[test]
    fn decode_errors_name_the_json_path() {
        let err = decode::<Outer>(br#"{"items":[{"n":1},{"n":"two"}]}"#).unwrap_err();
        assert_eq!(err.path, "items[1].n");
        assert!(err.message.contains("expected u32"), "{err}");
    }

    #[test]
    fn paths_inside_hand_decoded_values_are_joined_to_the_outer_path() {
        assert_eq!(
            join_marked_path(
                "messages[1]".into(),
                "\u{1}content\u{1}\u{1}[0]\u{1}\u{1}image_url.url\u{1}invalid type"
            ),
            (
                "messages[1].content[0].image_url.url".into(),
                "invalid type".into()
            )
        );
        assert_eq!(
            join_marked_path(".".into(), "\u{1}role\u{1}bad"),
            ("role".into(), "bad".into())
        );
    }

    #[test]
    fn trailing_garbage_is_an_error() {
        let err = decode::<Inner>(br#"{"n":1} x"#).unwrap_err();
        assert!(err.message.contains("trailing characters"), "{err}");
    }
}
