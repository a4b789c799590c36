//! The Trimtab operator: the BalancerPolicy controller that turns policies plus live
//! pod CPU into endpoint weights, the index the sidecars' config is served from, the
//! sidecar-injection webhook, the TLS Secret both are served with, and the operator's
//! own admin server.
#![forbid(unsafe_code)]

pub mod admin;
pub mod balancer_policy;
pub mod conditions;
pub mod config_server;
pub mod index;
pub mod leader;
pub mod load_reports;
pub mod load_test;
pub mod metrics;
pub mod metrics_source;
pub mod quantity;
pub mod sidecar_counts;
pub mod tls_secret;
pub mod webhook;
pub mod weights;
