//! The shop: a small in-memory HTTP shop that Trimtab's bot users log in to, browse,
//! fill carts in and check out of, and that its balancing benchmarks run several
//! replicas of.
//!
//! Two things make it more than a toy:
//!
//! - **Capacity emulation.** Each `/api` request holds one of `round(capacity ×
//!   base_workers)` worker slots for the service time, and reports how busy the slots
//!   are in ORCA `endpoint-load-metrics` headers and on `/metrics`. Replicas of
//!   capacities 1:2:4 on one machine behave like nodes of those sizes, and the capacity
//!   can be changed while running (`POST /admin/capacity`).
//! - **`--bug oversell`.** Checkout does check-then-act on stock, so concurrent
//!   checkouts of the last items drive stock negative: a bug only load finds.
//!
//! Start one in-process (tests, benchmark and demo harnesses):
//!
//! ```no_run
//! # async fn run() -> Result<(), shop::ShopError> {
//! let (addr, shop) = shop::Shop::bind(shop::Config::ephemeral()).await?;
//! println!("shop on http://{addr}");
//! shop.set_capacity(0.5).ok();
//! shop.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod capacity;
pub mod cart;
pub mod catalog;
pub mod checkout;
pub mod config;
pub mod load;
pub mod metrics;
pub mod orca;
pub mod server;
pub mod sessions;

pub use capacity::{CapacityError, Resized};
pub use catalog::{Oversold, ProductId};
pub use config::{Bug, Config, ConfigError, ServiceTimeDistribution};
pub use load::LoadReport;
pub use server::{Shop, ShopError, ShopHandle, Store};
