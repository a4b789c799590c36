//! A Prometheus instant query (`GET /api/v1/query`) returning CPU cores per pod, by
//! default `sum by (pod) (rate(container_cpu_usage_seconds_total{container!=""}[1m]))`.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use std::collections::BTreeMap;

use serde::Deserialize;

use super::{CpuUsage, MetricsSourceError};

/// Answers larger than this are refused: a per-pod CPU vector is small.
const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// How long one query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A Prometheus server and the query to run.
#[derive(Clone, Debug)]
pub struct Prometheus {
    url: String,
    query: String,
    client: Client<HttpConnector, Empty<bytes::Bytes>>,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    metric: BTreeMap<String, String>,
    /// `[unix time, "value"]`.
    value: (f64, String),
}

impl Prometheus {
    /// A source querying `url` (the server's base URL) with `query`.
    pub fn new(url: &str, query: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_owned(),
            query: query.to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub(super) async fn cpu_usage(&self, namespace: &str) -> Result<CpuUsage, MetricsSourceError> {
        let error = |reason: String| MetricsSourceError::Prometheus {
            url: self.url.clone(),
            reason,
        };
        let uri = format!(
            "{}/api/v1/query?query={}",
            self.url,
            url_encode(&self.query.replace("$namespace", namespace))
        );
        let uri: hyper::Uri = uri.parse().map_err(|e| error(format!("bad URL: {e}")))?;
        let response = tokio::time::timeout(QUERY_TIMEOUT, self.client.get(uri))
            .await
            .map_err(|_| error(format!("no answer within {QUERY_TIMEOUT:?}")))?
            .map_err(|e| error(e.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| error(format!("reading the answer: {e}")))?
            .to_bytes();
        let cores = parse(&body).map_err(|reason| error(format!("HTTP {status}: {reason}")))?;
        Ok(CpuUsage {
            cores,
            window: range_of(&self.query),
        })
    }
}

/// The range of the query's (last) range selector, e.g. 1m for `rate(x[1m])`: the
/// span each value averages over.
fn range_of(query: &str) -> Option<Duration> {
    let open = query.rfind('[')?;
    let close = open + query[open..].find(']')?;
    let range = query[open + 1..close].split(':').next()?.trim();
    range
        .parse::<trimtab_api::Duration>()
        .ok()
        .map(trimtab_api::Duration::get)
}

/// The per-pod vector of an instant-query answer.
fn parse(body: &[u8]) -> Result<BTreeMap<String, f64>, String> {
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| format!("not a Prometheus answer: {e}"))?;
    if answer.status != "success" {
        return Err(answer
            .error
            .unwrap_or_else(|| format!("status {}", answer.status)));
    }
    let data = answer.data.ok_or("answer without data")?;
    if data.result_type != "vector" {
        return Err(format!(
            "expected an instant vector, got {}",
            data.result_type
        ));
    }
    let mut usage = BTreeMap::new();
    for series in data.result {
        let Some(pod) = series.metric.get("pod") else {
            return Err(format!(
                "series {:?} has no pod label; aggregate `by (pod)`",
                series.metric
            ));
        };
        let cores: f64 = series
            .value
            .1
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| {
                format!(
                    "pod {pod}: value {:?} is not a number of cores",
                    series.value.1
                )
            })?;
        usage.insert(pod.clone(), cores);
    }
    Ok(usage)
}

/// Percent-encodes a query string value (RFC 3986 unreserved characters pass).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_per_pod_vector() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"pod":"a"},"value":[1700000000.1,"0.25"]},
            {"metric":{"pod":"b"},"value":[1700000000.1,"1.5"]}]}}"#;
        let usage = parse(body).expect("parses");
        assert_eq!(usage.get("a"), Some(&0.25));
        assert_eq!(usage.get("b"), Some(&1.5));
    }

    #[test]
    fn names_what_is_wrong_with_an_answer() {
        assert!(
            parse(b"<html>")
                .expect_err("html")
                .contains("not a Prometheus answer")
        );
        let no_pod = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"1"]}]}}"#;
        assert!(parse(no_pod).expect_err("no pod").contains("no pod label"));
        let nan = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"pod":"a"},"value":[1,"NaN"]}]}}"#;
        assert!(parse(nan).expect_err("nan").contains("pod a"));
        let failed =
            br#"{"status":"error","errorType":"bad_data","error":"parse error at char 4"}"#;
        assert_eq!(
            parse(failed).expect_err("error status"),
            "parse error at char 4"
        );
    }

    #[test]
    fn the_window_is_the_range_of_the_rate() {
        let default =
            r#"sum by (pod) (rate(container_cpu_usage_seconds_total{container!=""}[1m]))"#;
        assert_eq!(range_of(default), Some(Duration::from_secs(60)));
        assert_eq!(
            range_of("max_over_time(x[30s:5s])"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(range_of("sum by (pod) (cpu_cores)"), None);
    }

    #[test]
    fn encodes_promql_for_a_url() {
        assert_eq!(
            url_encode(r#"sum by (pod) (x{a!=""})"#),
            "sum%20by%20%28pod%29%20%28x%7Ba%21%3D%22%22%7D%29"
        );
    }
}
