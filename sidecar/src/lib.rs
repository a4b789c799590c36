//! The Trimtab data plane: the sidecar proxy that balances an application's outbound
//! HTTP calls over the endpoints of its BalancerPolicies.
#![forbid(unsafe_code)]

pub mod balancer;
