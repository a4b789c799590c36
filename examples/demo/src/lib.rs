//! The local demo: the README's first command. Three shop replicas of capacities 1:2:4,
//! the Trimtab sidecar in front of them and the example LoadTest's bot users, all in
//! one process on loopback; round robin against cpuWeighted with the same bots, then
//! a flash sale against shops with `--bug oversell` for the stock invariant to catch.
//!
//! Reading order: [`phases`] (what runs when), then the pieces it wires together —
//! [`replicas`] (shops on their own threads), [`policy`] (the BalancerPolicy file
//! pointed at them), [`proxy`] (the in-process sidecar), [`loadtest`] (the bots' spec
//! fitted to one machine) — and [`report`] (the table).
#![forbid(unsafe_code)]

pub mod loadtest;
pub mod phases;
pub mod policy;
pub mod proxy;
pub mod replicas;
pub mod report;

pub use phases::{Demo, DemoError, Options, Oversell, Progress, Sizing, run_demo};
pub use report::{Report, render};
