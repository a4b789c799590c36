//! The HTTP API: which route a request is, what its body and query mean, and what the
//! shop answers. Every refusal is a JSON body `{"error": "..."}` whose message names
//! the field, header or parameter at fault, with the status a client can act on:
//! 400 bad input, 401 no session, 404 no such thing, 405 wrong method, 409 the shop's
//! state says no (out of stock, empty cart), 413 body too large.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /api/login` `{"user": "alice"}` | `{"token": "...", "user": "alice"}` |
//! | `GET /api/products?page=N&size=M` | `{"items": [{"id", "name", "price", "stock"}], "page", "pages", "total"}` |
//! | `GET /api/products/{id}` | one product |
//! | `GET /api/cart` | `{"items": [{"product", "name", "quantity", "price"}], "total"}` |
//! | `POST /api/cart` `{"product": 3, "quantity": 1}` | the cart; 409 when out of stock |
//! | `DELETE /api/cart` | the emptied cart |
//! | `POST /api/checkout` | `{"order", "items", "total"}`; 409 naming the product when stock is short |
//! | `GET /api/admin/stock` | `{"items": [{"id", "stock"}]}` (no token: it is what invariants poll) |
//! | `GET /healthz` | `ok` |
//! | `GET /metrics` | Prometheus text |
//! | `GET`, `POST /admin/capacity` `{"capacity": 0.5}` | `{"capacity", "workers", "base_workers"}` |
//!
//! Product ids and quantities are accepted as JSON numbers or as strings of digits,
//! because bot scenarios render request bodies from templates (`"{{ vars.product }}"`).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    capacity::CapacityError,
    cart::{Cart, CartError},
    catalog::{Product, ProductId},
    checkout::{self, CheckoutError},
    config::MAX_PAGE_SIZE,
    metrics,
    server::State,
    sessions::Session,
};

/// Largest request body read: every request this API takes is a few dozen bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest user name accepted at login.
pub const MAX_USER_LEN: usize = 128;

/// What a request is, decided from its method and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /api/login`
    Login,
    /// `GET /api/products`
    ListProducts,
    /// `GET /api/products/{id}`, with the raw id segment.
    GetProduct(String),
    /// `GET /api/cart`
    GetCart,
    /// `POST /api/cart`
    AddToCart,
    /// `DELETE /api/cart`
    ClearCart,
    /// `POST /api/checkout`
    Checkout,
    /// `GET /api/admin/stock`
    AdminStock,
    /// `GET /healthz`
    Health,
    /// `GET /metrics`
    Metrics,
    /// `GET /admin/capacity`
    GetCapacity,
    /// `POST` or `PUT /admin/capacity`
    SetCapacity,
    /// A known path with a method it does not take.
    WrongMethod {
        /// The route's metric label.
        label: &'static str,
        /// The methods it takes, for the `allow` header.
        allow: &'static str,
    },
    /// No such path.
    NotFound,
}

impl Route {
    /// Recognises `method` on `path` (query excluded; one trailing slash ignored).
    pub fn recognize(method: &Method, path: &str) -> Self {
        let path = if path.len() > 1 {
            path.strip_suffix('/').unwrap_or(path)
        } else {
            path
        };
        let get = method == Method::GET || method == Method::HEAD;
        let wrong = |label, allow| Self::WrongMethod { label, allow };
        match path {
            "/api/login" if method == Method::POST => Self::Login,
            "/api/login" => wrong("login", "POST"),
            "/api/products" if get => Self::ListProducts,
            "/api/products" => wrong("products", "GET"),
            "/api/cart" if get => Self::GetCart,
            "/api/cart" if method == Method::POST => Self::AddToCart,
            "/api/cart" if method == Method::DELETE => Self::ClearCart,
            "/api/cart" => wrong("cart", "GET, POST, DELETE"),
            "/api/checkout" if method == Method::POST => Self::Checkout,
            "/api/checkout" => wrong("checkout", "POST"),
            "/api/admin/stock" if get => Self::AdminStock,
            "/api/admin/stock" => wrong("admin_stock", "GET"),
            "/healthz" if get => Self::Health,
            "/healthz" => wrong("healthz", "GET"),
            "/metrics" if get => Self::Metrics,
            "/metrics" => wrong("metrics", "GET"),
            "/admin/capacity" if get => Self::GetCapacity,
            "/admin/capacity" if method == Method::POST || method == Method::PUT => {
                Self::SetCapacity
            }
            "/admin/capacity" => wrong("capacity", "GET, POST, PUT"),
            _ => match path.strip_prefix("/api/products/") {
                Some(id) if !id.contains('/') && get => Self::GetProduct(id.to_owned()),
                Some(id) if !id.contains('/') => wrong("product", "GET"),
                _ => Self::NotFound,
            },
        }
    }

    /// The metric label: a fixed name per route, so label cardinality stays bounded
    /// whatever paths clients send.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Login => "login",
            Self::ListProducts => "products",
            Self::GetProduct(_) => "product",
            Self::GetCart | Self::AddToCart | Self::ClearCart => "cart",
            Self::Checkout => "checkout",
            Self::AdminStock => "admin_stock",
            Self::Health => "healthz",
            Self::Metrics => "metrics",
            Self::GetCapacity | Self::SetCapacity => "capacity",
            Self::WrongMethod { label, .. } => label,
            Self::NotFound => "unmatched",
        }
    }

    /// Whether the request is shop work that occupies a worker slot. Health checks,
    /// scrapes and the capacity knob do not, so they answer promptly even when the
    /// emulated node is saturated, and do not distort the utilization they report.
    pub fn holds_worker_slot(&self) -> bool {
        matches!(
            self,
            Self::Login
                | Self::ListProducts
                | Self::GetProduct(_)
                | Self::GetCart
                | Self::AddToCart
                | Self::ClearCart
                | Self::Checkout
                | Self::AdminStock
        )
    }
}

/// Why a request was refused.
#[allow(missing_docs)] // the fields are described by each variant's message
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is empty: expected JSON such as {example}")]
    EmptyBody { example: &'static str },
    #[error("request body is not valid JSON ({source}): expected JSON such as {example}")]
    Json {
        source: serde_json::Error,
        example: &'static str,
    },
    #[error("request body must be a JSON object such as {example}, got {got}")]
    NotAnObject { example: &'static str, got: String },
    #[error("field `{field}` is missing: expected {expected}")]
    MissingField {
        field: &'static str,
        expected: &'static str,
    },
    #[error("field `{field}` must be {expected}, got {got}")]
    InvalidField {
        field: &'static str,
        expected: String,
        got: String,
    },
    #[error("query parameter `{name}` must be {expected}, got {got:?}")]
    InvalidQuery {
        name: &'static str,
        expected: String,
        got: String,
    },
    #[error("request body is larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("could not read the request body: {0}")]
    Body(String),
    #[error(
        "missing `authorization` header: log in with POST /api/login and send `authorization: Bearer <token>`"
    )]
    MissingToken,
    #[error("`authorization` header must be `Bearer <token>`")]
    MalformedAuthorization,
    #[error("unknown token in `authorization` header: log in again with POST /api/login")]
    UnknownToken,
    #[error("no product with id {id:?}")]
    NoSuchProduct { id: String },
    #[error(
        "product {product} ({name}) is out of stock: {requested} requested, {available} available"
    )]
    OutOfStock {
        product: ProductId,
        name: String,
        requested: u32,
        available: i64,
    },
    #[error(transparent)]
    Cart(#[from] CartError),
    #[error(transparent)]
    Checkout(#[from] CheckoutError),
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    #[error("{method} is not allowed here; allowed: {allow}")]
    MethodNotAllowed { method: Method, allow: &'static str },
    #[error(
        "no route for {path}: try /api/login, /api/products, /api/cart, /api/checkout, /api/admin/stock, /healthz, /metrics or /admin/capacity"
    )]
    NotFound { path: String },
    #[error("metrics could not be encoded: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the worker pool is closed: the shop is shutting down")]
    PoolClosed,
}

impl ApiError {
    /// The status a client can act on.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::EmptyBody { .. }
            | Self::Json { .. }
            | Self::NotAnObject { .. }
            | Self::MissingField { .. }
            | Self::InvalidField { .. }
            | Self::InvalidQuery { .. }
            | Self::Body(_)
            | Self::Capacity(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MissingToken | Self::MalformedAuthorization | Self::UnknownToken => {
                StatusCode::UNAUTHORIZED
            }
            Self::NoSuchProduct { .. } | Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::OutOfStock { .. } | Self::Cart(_) | Self::Checkout(_) => StatusCode::CONFLICT,
            Self::Metrics(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::PoolClosed => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The JSON body: the message, plus machine-readable details for stock refusals.
    fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert("error".into(), Value::String(self.to_string()));
        let stock = match self {
            Self::OutOfStock {
                product,
                name,
                requested,
                available,
            }
            | Self::Checkout(CheckoutError::InsufficientStock {
                product,
                name,
                requested,
                available,
            }) => Some((product, name, requested, available)),
            _ => None,
        };
        if let Some((product, name, requested, available)) = stock {
            body.insert("product".into(), Value::from(*product));
            body.insert("name".into(), Value::String(name.clone()));
            body.insert("requested".into(), Value::from(*requested));
            body.insert("available".into(), Value::from(*available));
        }
        Value::Object(body)
    }

    /// The response for this refusal.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = json(self.status(), &self.body());
        match &self {
            Self::MethodNotAllowed { allow, .. } => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            Self::MissingToken | Self::MalformedAuthorization | Self::UnknownToken => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// A JSON response. Serializing these plain structs cannot fail; if it ever did, the
/// client gets a 500 saying so rather than a dropped connection.
pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(body) {
        Ok(bytes) => with_body(status, "application/json", Bytes::from(bytes)),
        Err(e) => with_body(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            Bytes::from(format!("response did not serialize: {e}\n")),
        ),
    }
}

fn with_body(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Answers `req`, already recognised as `route`.
pub async fn respond(state: &State, route: Route, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match handle(state, route, req).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle(
    state: &State,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    match route {
        Route::Login => login(state, req).await,
        Route::ListProducts => list_products(state, req.uri().query()),
        Route::GetProduct(id) => {
            let product = product_by_path(state, &id)?;
            Ok(json(StatusCode::OK, &ProductView::of(product)))
        }
        Route::GetCart => {
            let session = authenticate(state, req.headers())?;
            let cart = session.cart().clone();
            Ok(json(StatusCode::OK, &CartView::of(state, &cart)))
        }
        Route::AddToCart => add_to_cart(state, req).await,
        Route::ClearCart => {
            let session = authenticate(state, req.headers())?;
            session.cart().take();
            Ok(json(StatusCode::OK, &CartView::of(state, &Cart::default())))
        }
        Route::Checkout => check_out(state, req.headers()).await,
        Route::AdminStock => Ok(json(StatusCode::OK, &StockView::of(state))),
        Route::Health => Ok(with_body(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"ok\n"),
        )),
        Route::Metrics => {
            state.refresh_gauges();
            let body = state.metrics.encode()?;
            Ok(with_body(
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                Bytes::from(body),
            ))
        }
        Route::GetCapacity => Ok(json(StatusCode::OK, &CapacityView::of(state))),
        Route::SetCapacity => set_capacity(state, req).await,
        Route::WrongMethod { allow, .. } => Err(ApiError::MethodNotAllowed {
            method: req.method().clone(),
            allow,
        }),
        Route::NotFound => Err(ApiError::NotFound {
            path: truncate(req.uri().path()),
        }),
    }
}

const LOGIN_EXAMPLE: &str = r#"{"user": "alice"}"#;
const CART_EXAMPLE: &str = r#"{"product": 3, "quantity": 1}"#;
const CAPACITY_EXAMPLE: &str = r#"{"capacity": 0.5}"#;

async fn login(state: &State, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = read_json(req, LOGIN_EXAMPLE).await?;
    let fields = object(&body, LOGIN_EXAMPLE)?;
    let user = match fields.get("user") {
        None | Some(Value::Null) => {
            return Err(ApiError::MissingField {
                field: "user",
                expected: "a user name (a non-empty string)",
            });
        }
        Some(Value::String(user))
            if !user.trim().is_empty() && user.chars().count() <= MAX_USER_LEN =>
        {
            user
        }
        Some(other) => {
            return Err(ApiError::InvalidField {
                field: "user",
                expected: format!("a non-empty string of at most {MAX_USER_LEN} characters"),
                got: describe(other),
            });
        }
    };
    let (token, _) = state.store.sessions.login(user);
    state.metrics.sessions.inc();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "token": token, "user": user }),
    ))
}

fn list_products(state: &State, query: Option<&str>) -> Result<Response<Full<Bytes>>, ApiError> {
    let page = query_number(query, "page", 1, u32::MAX)?.unwrap_or(1);
    let size = query_number(query, "size", 1, MAX_PAGE_SIZE)?.unwrap_or(state.config.page_size);
    let page = state.store.catalog.page(page, size);
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "items": page.items.iter().map(ProductView::of).collect::<Vec<_>>(),
            "page": page.page,
            "pages": page.pages,
            "total": page.total,
        }),
    ))
}

fn product_by_path<'a>(state: &'a State, id: &str) -> Result<&'a Product, ApiError> {
    id.parse::<ProductId>()
        .ok()
        .and_then(|id| state.store.catalog.get(id))
        .ok_or_else(|| ApiError::NoSuchProduct { id: truncate(id) })
}

async fn add_to_cart(
    state: &State,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let session = authenticate(state, req.headers())?;
    let body = read_json(req, CART_EXAMPLE).await?;
    let fields = object(&body, CART_EXAMPLE)?;
    let id = whole_number(fields, "product", None, 1, u64::from(ProductId::MAX))?;
    let quantity = whole_number(
        fields,
        "quantity",
        Some(1),
        1,
        u64::from(crate::cart::MAX_QUANTITY),
    )?;
    let product = ProductId::try_from(id)
        .ok()
        .and_then(|id| state.store.catalog.get(id))
        .ok_or_else(|| ApiError::NoSuchProduct { id: id.to_string() })?;
    // Bounded by MAX_QUANTITY above, so it fits.
    let quantity = u32::try_from(quantity).unwrap_or(crate::cart::MAX_QUANTITY);
    let cart = {
        let mut cart = session.cart();
        let line = cart.preview_add(product.id, quantity)?;
        // Adding to a cart reserves nothing: stock is only taken at checkout, so this
        // check can pass and checkout still be refused, as in any real shop.
        let available = product.stock();
        if available < i64::from(line.quantity) {
            return Err(ApiError::OutOfStock {
                product: product.id,
                name: product.name.clone(),
                requested: line.quantity,
                available,
            });
        }
        cart.add(product.id, quantity)?;
        cart.clone()
    };
    Ok(json(StatusCode::OK, &CartView::of(state, &cart)))
}

async fn check_out(state: &State, headers: &HeaderMap) -> Result<Response<Full<Bytes>>, ApiError> {
    let session = authenticate(state, headers)?;
    let lines = session.cart().take();
    let placed = checkout::place_order(
        &state.store.catalog,
        &state.store.orders,
        &lines,
        state.discipline,
    )
    .await;
    match placed {
        Ok(order) => {
            state.metrics.orders.with_label_values(&["placed"]).inc();
            Ok(json(StatusCode::OK, &order))
        }
        Err(error) => {
            // The cart is the customer's: a refused checkout leaves it as it was.
            session.cart().restore(&lines);
            state.metrics.orders.with_label_values(&["refused"]).inc();
            Err(error.into())
        }
    }
}

async fn set_capacity(
    state: &State,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = read_json(req, CAPACITY_EXAMPLE).await?;
    let fields = object(&body, CAPACITY_EXAMPLE)?;
    let capacity = match fields.get("capacity") {
        None | Some(Value::Null) => {
            return Err(ApiError::MissingField {
                field: "capacity",
                expected: "a number greater than 0, relative to a capacity-1.0 node",
            });
        }
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    let capacity = capacity.ok_or_else(|| ApiError::InvalidField {
        field: "capacity",
        expected: "a number greater than 0".into(),
        got: fields.get("capacity").map(describe).unwrap_or_default(),
    })?;
    state.pool.set_capacity(capacity)?;
    Ok(json(StatusCode::OK, &CapacityView::of(state)))
}

/// The session named by `authorization: Bearer <token>`.
fn authenticate(state: &State, headers: &HeaderMap) -> Result<Arc<Session>, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::MissingToken)?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::MalformedAuthorization)?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(ApiError::MalformedAuthorization)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(ApiError::MalformedAuthorization);
    }
    state
        .store
        .sessions
        .get(token)
        .ok_or(ApiError::UnknownToken)
}

/// Reads at most [`MAX_BODY_BYTES`] and parses them as JSON.
async fn read_json(req: Request<Incoming>, example: &'static str) -> Result<Value, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                ApiError::BodyTooLarge
            } else {
                ApiError::Body(e.to_string())
            }
        })?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::EmptyBody { example });
    }
    serde_json::from_slice(&bytes).map_err(|source| ApiError::Json { source, example })
}

fn object<'a>(value: &'a Value, example: &'static str) -> Result<&'a Map<String, Value>, ApiError> {
    value.as_object().ok_or_else(|| ApiError::NotAnObject {
        example,
        got: describe(value),
    })
}

/// A whole number in `min..=max` from a JSON number or a string of digits; `default`
/// when the field is absent or null.
fn whole_number(
    fields: &Map<String, Value>,
    field: &'static str,
    default: Option<u64>,
    min: u64,
    max: u64,
) -> Result<u64, ApiError> {
    let value = match fields.get(field) {
        None | Some(Value::Null) => {
            return default.ok_or(ApiError::MissingField {
                field,
                expected: "a whole number",
            });
        }
        Some(value) => value,
    };
    let number = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    number
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| ApiError::InvalidField {
            field,
            expected: format!("a whole number from {min} to {max}"),
            got: describe(value),
        })
}

/// `name` from a query string, as a whole number in `min..=max`.
fn query_number(
    query: Option<&str>,
    name: &'static str,
    min: u32,
    max: u32,
) -> Result<Option<u32>, ApiError> {
    let Some(raw) = query.and_then(|q| {
        q.rsplit('&')
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }) else {
        return Ok(None);
    };
    raw.parse::<u32>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .map(Some)
        .ok_or_else(|| ApiError::InvalidQuery {
            name,
            expected: format!("a whole number from {min} to {max}"),
            got: truncate(raw),
        })
}

/// A JSON value as it appeared, cut short so an error message stays an error message.
fn describe(value: &Value) -> String {
    truncate(&value.to_string())
}

fn truncate(text: &str) -> String {
    const LIMIT: usize = 64;
    match text.char_indices().nth(LIMIT) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[derive(Serialize)]
struct ProductView<'a> {
    id: ProductId,
    name: &'a str,
    price: f64,
    stock: i64,
}

impl<'a> ProductView<'a> {
    fn of(product: &'a Product) -> Self {
        Self {
            id: product.id,
            name: &product.name,
            price: product.price(),
            stock: product.stock(),
        }
    }
}

#[derive(Serialize)]
struct CartItemView<'a> {
    product: ProductId,
    name: &'a str,
    quantity: u32,
    price: f64,
}

#[derive(Serialize)]
struct CartView<'a> {
    items: Vec<CartItemView<'a>>,
    total: f64,
}

impl<'a> CartView<'a> {
    fn of(state: &'a State, cart: &Cart) -> Self {
        let mut total_cents = 0;
        let items = cart
            .lines()
            .iter()
            .filter_map(|line| {
                let product = state.store.catalog.get(line.product)?;
                total_cents += product.price_cents * u64::from(line.quantity);
                Some(CartItemView {
                    product: product.id,
                    name: &product.name,
                    quantity: line.quantity,
                    price: product.price(),
                })
            })
            .collect();
        Self {
            items,
            total: total_cents as f64 / 100.0,
        }
    }
}

#[derive(Serialize)]
struct StockItemView {
    id: ProductId,
    stock: i64,
}

#[derive(Serialize)]
struct StockView {
    items: Vec<StockItemView>,
}

impl StockView {
    fn of(state: &State) -> Self {
        Self {
            items: state
                .store
                .catalog
                .products()
                .iter()
                .map(|p| StockItemView {
                    id: p.id,
                    stock: p.stock(),
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct CapacityView {
    capacity: f64,
    workers: usize,
    base_workers: u32,
}

impl CapacityView {
    fn of(state: &State) -> Self {
        Self {
            capacity: state.pool.capacity(),
            workers: state.pool.workers(),
            base_workers: state.pool.base_workers(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_the_scenario_routes() {
        assert_eq!(Route::recognize(&Method::POST, "/api/login"), Route::Login);
        assert_eq!(
            Route::recognize(&Method::GET, "/api/products"),
            Route::ListProducts
        );
        assert_eq!(
            Route::recognize(&Method::GET, "/api/products/7"),
            Route::GetProduct("7".into())
        );
        assert_eq!(
            Route::recognize(&Method::POST, "/api/cart"),
            Route::AddToCart
        );
        assert_eq!(
            Route::recognize(&Method::POST, "/api/checkout"),
            Route::Checkout
        );
        assert_eq!(
            Route::recognize(&Method::GET, "/api/admin/stock"),
            Route::AdminStock
        );
        assert_eq!(Route::recognize(&Method::GET, "/api/cart/"), Route::GetCart);
    }

    #[test]
    fn wrong_method_and_unknown_paths_are_told_apart() {
        assert_eq!(
            Route::recognize(&Method::GET, "/api/login"),
            Route::WrongMethod {
                label: "login",
                allow: "POST"
            }
        );
        assert_eq!(
            Route::recognize(&Method::GET, "/api/products/7/reviews"),
            Route::NotFound
        );
        assert_eq!(Route::recognize(&Method::GET, "/"), Route::NotFound);
        assert_eq!(Route::recognize(&Method::GET, "/nope"), Route::NotFound);
    }

    #[test]
    fn only_shop_work_holds_a_worker_slot() {
        assert!(Route::Checkout.holds_worker_slot());
        assert!(!Route::Health.holds_worker_slot());
        assert!(!Route::Metrics.holds_worker_slot());
        assert!(!Route::SetCapacity.holds_worker_slot());
    }

    #[test]
    fn product_ids_are_read_from_numbers_and_digit_strings() {
        let fields = |json: &str| match serde_json::from_str::<Value>(json) {
            Ok(Value::Object(map)) => map,
            other => panic!("not an object: {other:?}"),
        };
        assert_eq!(
            whole_number(&fields(r#"{"product": 3}"#), "product", None, 1, 10).ok(),
            Some(3)
        );
        assert_eq!(
            whole_number(&fields(r#"{"product": "3"}"#), "product", None, 1, 10).ok(),
            Some(3)
        );
        assert_eq!(
            whole_number(&fields(r#"{}"#), "quantity", Some(1), 1, 10).ok(),
            Some(1)
        );
        let refused = whole_number(&fields(r#"{"product": "three"}"#), "product", None, 1, 10);
        let message = refused.map_err(|e| e.to_string()).expect_err("refused");
        assert!(
            message.contains("`product`") && message.contains("three"),
            "{message}"
        );
        assert!(whole_number(&fields(r#"{"product": 0}"#), "product", None, 1, 10).is_err());
        assert!(whole_number(&fields(r#"{"product": 1.5}"#), "product", None, 1, 10).is_err());
    }

    #[test]
    fn query_numbers_are_validated_and_named() {
        assert_eq!(
            query_number(Some("page=2"), "page", 1, 9).ok(),
            Some(Some(2))
        );
        assert_eq!(
            query_number(Some("size=3&page=4"), "page", 1, 9).ok(),
            Some(Some(4))
        );
        assert_eq!(query_number(None, "page", 1, 9).ok(), Some(None));
        let message = query_number(Some("page=0"), "page", 1, 9)
            .map_err(|e| e.to_string())
            .expect_err("refused");
        assert!(message.contains("`page`"), "{message}");
        assert!(query_number(Some("page"), "page", 1, 9).is_err());
    }

    #[test]
    fn long_input_is_cut_short_in_messages() {
        let long = "x".repeat(1000);
        assert!(truncate(&long).chars().count() <= 65);
        assert_eq!(truncate("é"), "é");
    }
}
