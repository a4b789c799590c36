//! A small HTTP client for the shop's tests: real requests over loopback, each with a
//! timeout so a hung shop fails the test instead of hanging it.
#![allow(dead_code)] // each test file uses a different part

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Shopper {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }

    /// The ORCA `endpoint-load-metrics` header as a map of key to number.
    pub fn orca(&self) -> HashMap<String, f64> {
        let value = self
            .headers
            .get("endpoint-load-metrics")
            .expect("endpoint-load-metrics header present")
            .to_str()
            .expect("ASCII header");
        let body = value.strip_prefix("TEXT ").expect("ORCA TEXT format");
        body.split(',')
            .map(|pair| {
                let (key, number) = pair.trim().split_once('=').expect("key=value");
                (key.to_owned(), number.parse().expect("a number"))
            })
            .collect()
    }
}

impl Shopper {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
            .expect("valid request");
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .expect("the shop answers in time")
            .expect("the request reaches the shop");
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(REQUEST_TIMEOUT, body.collect())
            .await
            .expect("the body arrives in time")
            .expect("the body is readable")
            .to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &str) -> Reply {
        self.send(Method::POST, path, token, Some(body)).await
    }

    /// Logs in as `user` and returns the token (`$.token`, as the scenario extracts it).
    pub async fn login(&self, user: &str) -> String {
        let reply = self
            .post("/api/login", None, &format!(r#"{{"user": "{user}"}}"#))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "login: {}", reply.text());
        reply.json()["token"]
            .as_str()
            .expect("$.token is a string")
            .to_owned()
    }

    /// Stock of `product` as GET /api/admin/stock reports it.
    pub async fn stock_of(&self, product: u64) -> i64 {
        let reply = self.get("/api/admin/stock", None).await;
        assert_eq!(reply.status, StatusCode::OK);
        reply.json()["items"]
            .as_array()
            .expect("items array")
            .iter()
            .find(|item| item["id"].as_u64() == Some(product))
            .and_then(|item| item["stock"].as_i64())
            .expect("product listed with its stock")
    }
}
