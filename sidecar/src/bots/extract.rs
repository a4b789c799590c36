//! `extract`: values a user keeps from a response for its later requests — a JSONPath
//! (RFC 9535, via `serde_json_path`) into the body, `header:<name>` or
//! `cookie:<name>`.

use http::{HeaderMap, HeaderName, header::SET_COOKIE};
use serde_json_path::JsonPath;

/// Why an extraction spec was refused at compile time.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The JSONPath does not parse.
    #[error("JSONPath {path:?}: {message}")]
    JsonPath {
        /// The path given.
        path: String,
        /// The parser's description.
        message: String,
    },
    /// `header:` with an invalid name.
    #[error("{spec:?}: not a valid HTTP header name")]
    HeaderName {
        /// The spec given.
        spec: String,
    },
    /// Neither `$…`, `header:` nor `cookie:`.
    #[error("{spec:?}: expected a JSONPath starting with $, header:<name> or cookie:<name>")]
    Kind {
        /// The spec given.
        spec: String,
    },
}

/// Where a variable comes from.
#[derive(Debug, Clone)]
pub enum Extractor {
    /// The first node a JSONPath selects in the JSON body.
    Json(Box<JsonPath>),
    /// A response header.
    Header(HeaderName),
    /// A cookie the response sets.
    Cookie(String),
}

impl Extractor {
    /// Parses one `extract` value.
    pub fn compile(spec: &str) -> Result<Self, ExtractError> {
        if spec.starts_with('$') {
            JsonPath::parse(spec)
                .map(|p| Self::Json(Box::new(p)))
                .map_err(|e| ExtractError::JsonPath {
                    path: spec.to_owned(),
                    message: e.to_string(),
                })
        } else if let Some(name) = spec.strip_prefix("header:") {
            HeaderName::from_bytes(name.trim().as_bytes())
                .map(Self::Header)
                .map_err(|_| ExtractError::HeaderName {
                    spec: spec.to_owned(),
                })
        } else if let Some(name) = spec.strip_prefix("cookie:") {
            Ok(Self::Cookie(name.trim().to_owned()))
        } else {
            Err(ExtractError::Kind {
                spec: spec.to_owned(),
            })
        }
    }

    /// Whether this extractor reads the JSON body (so the body must be parsed).
    pub fn needs_json(&self) -> bool {
        matches!(self, Self::Json(_))
    }

    /// The value, or `None` when the response does not have it.
    pub fn apply(
        &self,
        headers: &HeaderMap,
        json: Option<&serde_json::Value>,
    ) -> Option<serde_json::Value> {
        match self {
            Self::Json(path) => json.and_then(|j| path.query(j).first().cloned()),
            Self::Header(name) => headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| serde_json::Value::String(v.to_owned())),
            Self::Cookie(name) => set_cookies(headers)
                .find(|(k, _)| k == name)
                .map(|(_, v)| serde_json::Value::String(v.to_owned())),
        }
    }
}

/// `(name, value)` of every `set-cookie` header (attributes after `;` ignored).
pub fn set_cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let pair = v.split(';').next()?;
            let (k, v) = pair.split_once('=')?;
            Some((k.trim(), v.trim()))
        })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use serde_json::json;

    use super::*;

    #[test]
    fn extracts_json_paths_headers_and_cookies() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("r1"));
        headers.append(SET_COOKIE, HeaderValue::from_static("sid=abc; Path=/"));
        let body = json!({"token": "t", "items": [{"id": 3}, {"id": 4}]});
        let get = |spec: &str| {
            Extractor::compile(spec)
                .expect("valid")
                .apply(&headers, Some(&body))
        };
        assert_eq!(get("$.token"), Some(json!("t")));
        assert_eq!(get("$.items[0].id"), Some(json!(3)));
        assert_eq!(get("$.missing"), None);
        assert_eq!(get("header:x-request-id"), Some(json!("r1")));
        assert_eq!(get("cookie:sid"), Some(json!("abc")));
    }

    #[test]
    fn refuses_bad_json_paths_and_unknown_kinds() {
        assert!(matches!(
            Extractor::compile("$.items[?"),
            Err(ExtractError::JsonPath { .. })
        ));
        assert!(matches!(
            Extractor::compile("token"),
            Err(ExtractError::Kind { .. })
        ));
        assert!(matches!(
            Extractor::compile("header:bad name"),
            Err(ExtractError::HeaderName { .. })
        ));
    }
}
