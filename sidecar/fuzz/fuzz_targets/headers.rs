//! Headers the sidecar interprets: ORCA `endpoint-load-metrics` from endpoints,
//! `Retry-After` from endpoints, and `Connection` (hop-by-hop removal) from both sides.
#![no_main]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use trimtab_sidecar::{balancer::weights::parse_orca, forward::remove_hop_by_hop, retry};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_orca(text);
    }
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(http::header::RETRY_AFTER, value.clone());
    headers.insert(http::header::CONNECTION, value);
    headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    let _ = retry::retry_after(&headers, SystemTime::now(), Duration::from_secs(60));
    remove_hop_by_hop(&mut headers);
});
