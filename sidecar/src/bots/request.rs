//! Request templates: a state's method, path, headers and body, compiled once with
//! minijinja and rendered per request with the user's `user.id` and `vars`.
//!
//! Every template of a scenario lives in one shared [`minijinja::Environment`] (behind
//! an `Arc`, so a million users share one copy); strings without `{{` or `{%` are kept
//! as literals and never go through the template engine.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Uri};
use minijinja::{Environment, UndefinedBehavior};
use trimtab_api::load_test::{self, Request};

use super::http::SendError;

/// Why a request template was refused at compile time. `field` is relative to the
/// request (`path`, `headers.authorization`, `json.product`).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Template syntax error.
    #[error("{field}: template syntax error: {message}")]
    Template {
        /// The field holding the template.
        field: String,
        /// minijinja's description, with its line.
        message: String,
    },
    /// The header name is not a valid HTTP token.
    #[error("headers.{name}: not a valid HTTP header name")]
    HeaderName {
        /// The name given.
        name: String,
    },
    /// The path does not start with `/`.
    #[error("path {path:?}: expected a path starting with /")]
    Path {
        /// The path given.
        path: String,
    },
    /// More than one body kind.
    #[error("json, form and body: expected at most one of them")]
    Bodies,
}

/// Why rendering failed while the test ran (a variable a template needs is missing,
/// or the result is not a valid header value).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The template engine failed (usually an undefined variable).
    #[error("{field}: {message}")]
    Template {
        /// The field whose template failed.
        field: String,
        /// What minijinja said.
        message: String,
    },
    /// A rendered header value has bytes HTTP forbids.
    #[error("headers.{name}: rendered value is not a valid header value")]
    HeaderValue {
        /// The header.
        name: String,
    },
}

/// The scenario's templates. Rendering looks a template up by its generated name.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
    count: usize,
}

impl Default for Templates {
    fn default() -> Self {
        let mut env = Environment::new();
        // Printing an undefined variable is an error (a missing `vars.token` would
        // otherwise silently send `Bearer `), but `{% if vars.token %}` still works.
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        Self { env, count: 0 }
    }
}

impl Templates {
    /// Parses `source` as a template, or keeps it as a literal when it has no tags.
    pub fn add(&mut self, field: &str, source: &str) -> Result<Text, RequestError> {
        if !source.contains("{{") && !source.contains("{%") && !source.contains("{#") {
            return Ok(Text::Literal(source.to_owned()));
        }
        let name = format!("t{}", self.count);
        self.count += 1;
        self.env
            .add_template_owned(name.clone(), source.to_owned())
            .map_err(|e| RequestError::Template {
                field: field.to_owned(),
                message: describe(&e),
            })?;
        Ok(Text::Template {
            name,
            field: field.to_owned(),
        })
    }

    /// The environment the templates were added to.
    pub fn env(&self) -> &Environment<'static> {
        &self.env
    }
}

/// minijinja's message plus where it happened.
fn describe(error: &minijinja::Error) -> String {
    match (error.detail(), error.line()) {
        (Some(detail), Some(line)) => format!("{} at line {line}: {detail}", error.kind()),
        (Some(detail), None) => format!("{}: {detail}", error.kind()),
        _ => error.to_string(),
    }
}

/// A string field: a literal, or a compiled template named in [`Templates`].
#[derive(Debug, Clone)]
pub enum Text {
    /// Sent as it is.
    Literal(String),
    /// Rendered per request.
    Template {
        /// The template's name in the environment.
        name: String,
        /// The field it came from, for error messages.
        field: String,
    },
}

impl Text {
    /// Whether it is sent as written (no template to render).
    pub fn is_literal(&self) -> bool {
        matches!(self, Self::Literal(_))
    }

    /// Renders with the user's context.
    pub fn render(
        &self,
        env: &Environment<'static>,
        ctx: &minijinja::Value,
    ) -> Result<String, RenderError> {
        match self {
            Self::Literal(text) => Ok(text.clone()),
            Self::Template { name, field } => env
                .get_template(name)
                .and_then(|t| t.render(ctx.clone()))
                .map_err(|e| RenderError::Template {
                    field: field.clone(),
                    message: describe(&e),
                }),
        }
    }
}

/// A JSON body whose strings are templates.
#[derive(Debug, Clone)]
pub enum JsonTemplate {
    /// A non-string scalar, sent as it is.
    Literal(serde_json::Value),
    /// A string template.
    Text(Text),
    /// An array.
    Array(Vec<JsonTemplate>),
    /// An object, in the spec's order.
    Object(Vec<(String, JsonTemplate)>),
}

impl JsonTemplate {
    fn compile(
        templates: &mut Templates,
        field: &str,
        value: &serde_json::Value,
    ) -> Result<Self, RequestError> {
        Ok(match value {
            serde_json::Value::String(s) => Self::Text(templates.add(field, s)?),
            serde_json::Value::Array(items) => Self::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Self::compile(templates, &format!("{field}[{i}]"), v))
                    .collect::<Result<_, _>>()?,
            ),
            serde_json::Value::Object(map) => Self::Object(
                map.iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone(),
                            Self::compile(templates, &format!("{field}.{k}"), v)?,
                        ))
                    })
                    .collect::<Result<_, RequestError>>()?,
            ),
            other => Self::Literal(other.clone()),
        })
    }

    fn is_literal(&self) -> bool {
        match self {
            Self::Literal(_) => true,
            Self::Text(t) => t.is_literal(),
            Self::Array(items) => items.iter().all(Self::is_literal),
            Self::Object(fields) => fields.iter().all(|(_, v)| v.is_literal()),
        }
    }

    fn render(
        &self,
        env: &Environment<'static>,
        ctx: &minijinja::Value,
    ) -> Result<serde_json::Value, RenderError> {
        Ok(match self {
            Self::Literal(v) => v.clone(),
            Self::Text(t) => serde_json::Value::String(t.render(env, ctx)?),
            Self::Array(items) => serde_json::Value::Array(
                items
                    .iter()
                    .map(|i| i.render(env, ctx))
                    .collect::<Result<_, _>>()?,
            ),
            Self::Object(fields) => serde_json::Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.render(env, ctx)?)))
                    .collect::<Result<_, RenderError>>()?,
            ),
        })
    }
}

/// A request body template.
#[derive(Debug, Clone)]
pub enum BodyTemplate {
    /// No body.
    Empty,
    /// `application/json`.
    Json(JsonTemplate),
    /// `application/x-www-form-urlencoded`.
    Form(Vec<(String, Text)>),
    /// Raw bytes, no content type.
    Raw(Text),
}

/// A request, compiled.
#[derive(Debug, Clone)]
pub struct CompiledRequest {
    /// The method.
    pub method: Method,
    /// The path and query, appended to the target URL.
    pub path: Text,
    /// Request headers (scenario-wide ones first, then the state's own).
    pub headers: Vec<(HeaderName, Text)>,
    /// The body.
    pub body: BodyTemplate,
    /// Whether any part is a template: a literal request needs no per-user context.
    templated: bool,
    /// The whole URI of a literal path, parsed once per run (the target is fixed).
    literal_uri: std::sync::OnceLock<Uri>,
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct RenderedRequest {
    /// The method.
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// Headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body bytes.
    pub body: Bytes,
    /// The body's content type, when it has one.
    pub content_type: Option<&'static str>,
}

impl RenderedRequest {
    /// `POST /api/cart`: how a request is named in failure reports.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

impl CompiledRequest {
    /// Compiles a spec request; `common_headers` are the scenario's `headers`.
    pub fn compile(
        templates: &mut Templates,
        spec: &Request,
        common_headers: &[(String, String)],
    ) -> Result<Self, RequestError> {
        if !spec.path.starts_with('/') {
            return Err(RequestError::Path {
                path: spec.path.clone(),
            });
        }
        let path = templates.add("path", &spec.path)?;
        let mut headers = Vec::new();
        for (name, value) in common_headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(spec.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            let header =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| RequestError::HeaderName {
                    name: name.to_owned(),
                })?;
            // A state's header replaces the scenario-wide one of the same name.
            headers.retain(|(h, _): &(HeaderName, Text)| *h != header);
            headers.push((header, templates.add(&format!("headers.{name}"), value)?));
        }
        let body = match (&spec.json, &spec.form, &spec.body) {
            (None, None, None) => BodyTemplate::Empty,
            (Some(json), None, None) => BodyTemplate::Json(JsonTemplate::compile(
                templates,
                "json",
                &serde_json::Value::Object(json.clone()),
            )?),
            (None, Some(form), None) => BodyTemplate::Form(
                form.iter()
                    .map(|(k, v)| Ok((k.clone(), templates.add(&format!("form.{k}"), v)?)))
                    .collect::<Result<_, RequestError>>()?,
            ),
            (None, None, Some(body)) => BodyTemplate::Raw(templates.add("body", body)?),
            _ => return Err(RequestError::Bodies),
        };
        let templated = !(path.is_literal()
            && headers.iter().all(|(_, v)| v.is_literal())
            && match &body {
                BodyTemplate::Empty => true,
                BodyTemplate::Json(json) => json.is_literal(),
                BodyTemplate::Form(fields) => fields.iter().all(|(_, v)| v.is_literal()),
                BodyTemplate::Raw(text) => text.is_literal(),
            });
        Ok(Self {
            method: method(spec.method),
            path,
            headers,
            body,
            templated,
            literal_uri: std::sync::OnceLock::new(),
        })
    }

    /// Whether rendering needs the user's context (`user.id`, `vars`); building it
    /// serializes the user's vars, work a literal request can skip.
    pub fn needs_context(&self) -> bool {
        self.templated
    }

    /// `base` + the rendered path as a URI; a literal path's is parsed once.
    pub fn uri(&self, base: &str, rendered: &RenderedRequest) -> Result<Uri, SendError> {
        if let Some(uri) = self.literal_uri.get() {
            return Ok(uri.clone());
        }
        let text = format!("{base}{}", rendered.path);
        let uri: Uri = text.parse().map_err(|_| SendError::Uri { uri: text })?;
        if self.path.is_literal() {
            // Another user may have set it first: the same URI either way.
            let _ = self.literal_uri.set(uri.clone());
        }
        Ok(uri)
    }

    /// Renders with the user's context.
    pub fn render(
        &self,
        env: &Environment<'static>,
        ctx: &minijinja::Value,
    ) -> Result<RenderedRequest, RenderError> {
        let path = self.path.render(env, ctx)?;
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, text) in &self.headers {
            let value = text.render(env, ctx)?;
            let value = HeaderValue::try_from(value).map_err(|_| RenderError::HeaderValue {
                name: name.to_string(),
            })?;
            headers.push((name.clone(), value));
        }
        let (body, content_type) = match &self.body {
            BodyTemplate::Empty => (Bytes::new(), None),
            BodyTemplate::Json(json) => (
                // Serializing a serde_json::Value cannot fail.
                Bytes::from(serde_json::to_vec(&json.render(env, ctx)?).unwrap_or_default()),
                Some("application/json"),
            ),
            BodyTemplate::Form(fields) => {
                let mut out = String::new();
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push('&');
                    }
                    form_encode(&mut out, k);
                    out.push('=');
                    form_encode(&mut out, &v.render(env, ctx)?);
                }
                (Bytes::from(out), Some("application/x-www-form-urlencoded"))
            }
            BodyTemplate::Raw(text) => (Bytes::from(text.render(env, ctx)?), None),
        };
        Ok(RenderedRequest {
            method: self.method.clone(),
            path,
            headers,
            body,
            content_type,
        })
    }
}

/// The WHATWG `application/x-www-form-urlencoded` byte serializer.
fn form_encode(out: &mut String, text: &str) {
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
}

fn method(m: load_test::Method) -> Method {
    match m {
        load_test::Method::Get => Method::GET,
        load_test::Method::Head => Method::HEAD,
        load_test::Method::Post => Method::POST,
        load_test::Method::Put => Method::PUT,
        load_test::Method::Patch => Method::PATCH,
        load_test::Method::Delete => Method::DELETE,
        load_test::Method::Options => Method::OPTIONS,
    }
}

#[cfg(test)]
mod tests {
    use minijinja::context;

    use super::*;

    fn request(yaml: &str) -> Request {
        serde_yaml_ng::from_str(yaml).expect("valid request yaml")
    }

    #[test]
    fn renders_path_headers_and_json_with_user_and_vars() {
        let mut templates = Templates::default();
        let compiled = CompiledRequest::compile(
            &mut templates,
            &request(
                r#"{method: POST, path: "/api/products?page={{ user.id % 5 + 1 }}",
                   headers: {authorization: "Bearer {{ vars.token }}"},
                   json: {product: "{{ vars.product }}", quantity: 1}}"#,
            ),
            &[("x-bot".into(), "yes".into())],
        )
        .expect("compiles");
        let ctx = context! { user => context!{ id => 7 }, vars => context!{ token => "abc", product => 3 } };
        let rendered = compiled.render(templates.env(), &ctx).expect("renders");
        assert_eq!(rendered.line(), "POST /api/products?page=3");
        assert_eq!(rendered.headers.len(), 2);
        assert_eq!(rendered.headers[1].1, "Bearer abc");
        assert_eq!(&rendered.body[..], br#"{"product":"3","quantity":1}"#);
    }

    #[test]
    fn printing_a_missing_variable_is_a_render_error_naming_the_field() {
        let mut templates = Templates::default();
        let compiled = CompiledRequest::compile(
            &mut templates,
            &request(r#"{path: /x, headers: {authorization: "Bearer {{ vars.token }}"}}"#),
            &[],
        )
        .expect("compiles");
        let ctx = context! { user => context!{ id => 1 }, vars => context!{} };
        let error = compiled
            .render(templates.env(), &ctx)
            .expect_err("undefined");
        assert!(
            error.to_string().starts_with("headers.authorization"),
            "{error}"
        );
    }

    #[test]
    fn form_bodies_are_url_encoded() {
        let mut templates = Templates::default();
        let compiled = CompiledRequest::compile(
            &mut templates,
            &request(r#"{method: POST, path: /f, form: {q: "a b&{{ user.id }}"}}"#),
            &[],
        )
        .expect("compiles");
        let ctx = context! { user => context!{ id => 1 }, vars => context!{} };
        let rendered = compiled.render(templates.env(), &ctx).expect("renders");
        assert_eq!(&rendered.body[..], b"q=a+b%261");
    }

    #[test]
    fn template_syntax_errors_name_the_field() {
        let mut templates = Templates::default();
        let error =
            CompiledRequest::compile(&mut templates, &request(r#"{path: "/x/{{ user.id "}"#), &[])
                .expect_err("bad template");
        assert!(
            error.to_string().starts_with("path: template syntax error"),
            "{error}"
        );
    }
}
