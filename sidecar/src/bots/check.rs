//! Checks and invariant expectations: CEL expressions (via the `cel` crate) over the
//! response a user just got, its `vars` and `user.id`.
//!
//! CEL because it is the language Kubernetes users already write validation rules in,
//! and because it cannot loop forever or touch the outside world.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock},
};

use cel::{Context, Env, Program, Value, objects::Key};
use http::HeaderMap;

/// A CEL expression that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("CEL syntax error at column {column}: {message}")]
pub struct CelSyntaxError {
    /// 1-based column of the first error (0 when the parser did not say).
    pub column: isize,
    /// The parser's description.
    pub message: String,
}

/// A compiled CEL expression that must evaluate to `true`.
#[derive(Debug)]
pub struct Check {
    /// The expression as written: what failure reports show.
    pub source: String,
    program: Program,
}

impl Check {
    /// Parses `source`.
    pub fn compile(source: &str) -> Result<Self, CelSyntaxError> {
        match Program::compile(source) {
            Ok(program) => Ok(Self {
                source: source.to_owned(),
                program,
            }),
            Err(errors) => {
                let first = errors.errors.first();
                Err(CelSyntaxError {
                    // cel-parser reports (line, column) with a 1-based column.
                    column: first.map(|e| e.pos.1).unwrap_or(0),
                    message: first
                        .map(|e| e.msg.clone())
                        .unwrap_or_else(|| errors.to_string()),
                })
            }
        }
    }

    /// `Ok(true)` when the expression holds, `Ok(false)` when it is false, `Err` with
    /// the evaluation error (a missing key, a type mismatch, a non-boolean result).
    pub fn evaluate(&self, ctx: &Context<'_, '_>) -> Result<bool, String> {
        match self.program.execute(ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("evaluated to {other:?}, expected a bool")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// CEL's standard library, built once: `Context::default()` builds it anew, which cost
/// more than a third of the bots' CPU when done for every request with checks.
static STDLIB: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// The variables checks see: `response` (status, headers, json), `vars`, `user`.
pub fn context(
    status: u16,
    headers: &HeaderMap,
    json: Option<&serde_json::Value>,
    vars: &[(Arc<str>, serde_json::Value)],
    user_id: u64,
) -> Context<'static, 'static> {
    let mut response: HashMap<Key, Value> = HashMap::new();
    response.insert(key("status"), Value::Int(i64::from(status)));
    let mut header_map: HashMap<Key, Value> = HashMap::new();
    for name in headers.keys() {
        let joined = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        header_map.insert(key(name.as_str()), Value::String(Arc::new(joined)));
    }
    response.insert(key("headers"), Value::Map(header_map.into()));
    response.insert(key("json"), json.map(from_json).unwrap_or(Value::Null));
    let vars: HashMap<Key, Value> = vars.iter().map(|(k, v)| (key(k), from_json(v))).collect();
    let mut user: HashMap<Key, Value> = HashMap::new();
    user.insert(key("id"), from_u64(user_id));
    let mut ctx = Context::with_env(Arc::clone(&STDLIB));
    ctx.add_variable_from_value("response", Value::Map(response.into()));
    ctx.add_variable_from_value("vars", Value::Map(vars.into()));
    ctx.add_variable_from_value("user", Value::Map(user.into()));
    ctx
}

fn key(name: &str) -> Key {
    Key::String(Arc::new(name.to_owned()))
}

fn from_u64(n: u64) -> Value {
    i64::try_from(n).map(Value::Int).unwrap_or(Value::UInt(n))
}

/// JSON to CEL, with integers as CEL `int` (what `response.status == 200` and
/// `i.stock >= 0` compare against) and only the ones beyond `i64` as `uint`.
pub fn from_json(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => {
            Value::List(Arc::new(items.iter().map(from_json).collect()))
        }
        serde_json::Value::Object(map) => {
            let map: HashMap<Key, Value> =
                map.iter().map(|(k, v)| (key(k), from_json(v))).collect();
            Value::Map(map.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn eval(expr: &str, status: u16, body: serde_json::Value) -> Result<bool, String> {
        let check = Check::compile(expr).expect("compiles");
        let vars = vec![(Arc::from("token"), json!("t"))];
        check.evaluate(&context(status, &HeaderMap::new(), Some(&body), &vars, 7))
    }

    #[test]
    fn checks_see_status_json_vars_and_user() {
        assert_eq!(eval("response.status == 200", 200, json!({})), Ok(true));
        assert_eq!(
            eval(
                "response.status == 200 || response.status == 409",
                409,
                json!({})
            ),
            Ok(true)
        );
        assert_eq!(
            eval("size(response.json.items) > 0", 200, json!({"items": [1]})),
            Ok(true)
        );
        assert_eq!(
            eval("size(response.json.items) > 0", 200, json!({"items": []})),
            Ok(false)
        );
        assert_eq!(
            eval(
                "response.json.items.all(i, i.stock >= 0)",
                200,
                json!({"items": [{"stock": 1}, {"stock": -1}]})
            ),
            Ok(false)
        );
        assert_eq!(
            eval("vars.token == 't' && user.id == 7", 200, json!({})),
            Ok(true)
        );
    }

    #[test]
    fn a_missing_key_or_non_bool_is_an_error_not_a_pass() {
        assert!(eval("response.json.nope == 1", 200, json!({})).is_err());
        assert!(eval("response.status", 200, json!({})).is_err());
    }

    #[test]
    fn syntax_errors_name_the_column() {
        let error = Check::compile("response.status == 200 )").expect_err("stray parenthesis");
        assert_eq!(error.column, 24, "{error}");
        assert!(
            error
                .to_string()
                .starts_with("CEL syntax error at column 24"),
            "{error}"
        );
    }

    #[test]
    fn malformed_expressions_are_refused_naming_the_column() {
        // cel-interpreter 0.10's parser panicked on these; its successor, `cel`, reports them.
        for source in [
            "response.status == ",
            "1 + @",
            "x[",
            "a ? b",
            "'unterminated",
        ] {
            let error = Check::compile(source).expect_err("malformed");
            assert!(
                error.to_string().starts_with("CEL syntax error at column"),
                "{source}: {error}"
            );
        }
    }

    #[test]
    fn compiled_checks_can_be_shared_between_tasks() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Check>();
    }
}
