//! The Trimtab data plane: the sidecar proxy that balances an application's outbound
//! HTTP calls over the endpoints of its BalancerPolicies.
//!
//! Reading order: [`sidecar`] (the running config and listeners), [`forward`] (one
//! request), [`balancer`] (choosing an endpoint), [`outlier`] and [`health`] (taking
//! endpoints out), [`retry`], [`config_source`] (files and fail-static state),
//! [`control_plane`] (the operator's config server and load reports), [`admin`]
//! (metrics and probes).
#![forbid(unsafe_code)]

pub mod admin;
pub mod balancer;
pub mod bots;
pub mod config_source;
pub mod control_plane;
pub mod forward;
pub mod health;
pub mod http_client;
pub mod llm;
pub mod llm_gateway;
pub mod metrics;
pub mod outlier;
pub mod retry;
pub mod route;
pub mod settings;
pub mod sidecar;
pub mod weighting;
