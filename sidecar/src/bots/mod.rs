//! Bot users: the scenario engine behind `trimtab-bots`.
//!
//! A `LoadTest`'s scenario is compiled once ([`scenario`]: every template, JSONPath and
//! CEL expression parsed, every state name resolved), so a broken scenario is refused
//! before any traffic. Then each bot user ([`user`]) walks the scenario's Markov chain
//! with its own deterministic RNG, vars and cookie jar, while [`workload`] decides how
//! many users run and when (closed or open model), [`shard`] gives this process its
//! share, [`invariants`] polls the target's business rules, [`guard`] holds or aborts
//! the load through the [`gate`] when the bots see too many errors or too slow a p99,
//! and everything measured lands in mergeable [`results`].
//!
//! Reading order: [`scenario`] → [`user`] → [`workload`] → [`run`].

pub mod check;
pub mod control;
pub mod extract;
pub mod gate;
pub mod guard;
pub mod http;
pub mod invariants;
pub mod metrics;
pub mod recorder;
pub mod request;
pub mod run;
pub mod scenario;
pub mod shard;
pub mod think;
pub mod user;
pub mod workload;

/// Results are shared with the operator, which merges every runner's.
pub use trimtab_api::results;
