//! The Trimtab test environment: a real etcd and kube-apiserver started per test run
//! (what controller-runtime's envtest does for Go operators), and helpers the
//! end-to-end tests share.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod crds;
pub mod load_test_env;
pub mod node_agent;
pub mod operator_process;
pub mod prometheus_server;
pub mod shop;
