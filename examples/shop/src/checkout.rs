//! Turning a cart into an order: every line's stock is taken, or none is.
//!
//! Two disciplines. [`StockDiscipline::Atomic`] takes each line with a compare-and-swap
//! and, if a later line is short, puts the earlier ones back: stock never goes below
//! zero. (It is all-or-nothing but not isolated: for an instant another checkout can see
//! the earlier lines taken and be refused. A real shop would accept that too.)
//! [`StockDiscipline::CheckThenAct`] is `--bug oversell`: it reads every line's stock,
//! pauses as a payment call would, then subtracts blindly, so checkouts racing for the
//! last units all pass the check and drive stock negative. One checkout alone never
//! shows the bug, which is the point: only many concurrent users find it.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde::Serialize;

use crate::{
    cart::CartLine,
    catalog::{Catalog, ProductId},
};

/// How long the buggy checkout waits between checking stock and taking it, as a payment
/// call would (tens of milliseconds is typical): checkouts that far apart overlap. With
/// 1 ms, and later 5 ms, the demo's flash sale missed the race in some runs on a loaded
/// machine (a CI run with every test binary competing for two cores).
pub const OVERSELL_RACE_WINDOW: Duration = Duration::from_millis(50);

/// How checkout takes stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockDiscipline {
    /// Compare-and-swap per line, rolled back on failure: never oversells.
    Atomic,
    /// Check, pause, subtract: oversells under concurrency (`--bug oversell`).
    CheckThenAct,
}

/// One line of a placed order, priced at checkout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrderLine {
    /// The product.
    pub product: ProductId,
    /// Its name at checkout.
    pub name: String,
    /// Units ordered.
    pub quantity: u32,
    /// Unit price.
    pub price: f64,
}

/// A placed order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Order {
    /// Sequential order number, unique within this shop process.
    pub order: u64,
    /// What was ordered.
    pub items: Vec<OrderLine>,
    /// Sum of quantity × price.
    pub total: f64,
}

/// Why an order was refused.
#[allow(missing_docs)] // the fields are described by each variant's message
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckoutError {
    #[error("the cart is empty: add products with POST /api/cart first")]
    EmptyCart,
    #[error("product {product} no longer exists")]
    UnknownProduct { product: ProductId },
    #[error(
        "not enough stock for product {product} ({name}): {requested} requested, {available} available"
    )]
    InsufficientStock {
        product: ProductId,
        name: String,
        requested: u32,
        available: i64,
    },
}

/// Hands out order numbers.
#[derive(Debug, Default)]
pub struct OrderNumbers(AtomicU64);

impl OrderNumbers {
    /// The next order number, starting at 1.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Takes the stock for `lines` under `discipline` and prices the order.
pub async fn place_order(
    catalog: &Catalog,
    numbers: &OrderNumbers,
    lines: &[CartLine],
    discipline: StockDiscipline,
) -> Result<Order, CheckoutError> {
    if lines.is_empty() {
        return Err(CheckoutError::EmptyCart);
    }
    let mut products = Vec::with_capacity(lines.len());
    for line in lines {
        let product = catalog
            .get(line.product)
            .ok_or(CheckoutError::UnknownProduct {
                product: line.product,
            })?;
        products.push((product, line.quantity));
    }
    let short = |product: &crate::catalog::Product, requested: u32, available: i64| {
        CheckoutError::InsufficientStock {
            product: product.id,
            name: product.name.clone(),
            requested,
            available,
        }
    };
    match discipline {
        StockDiscipline::Atomic => {
            for (taken, &(product, quantity)) in products.iter().enumerate() {
                if let Err(available) = product.take(i64::from(quantity)) {
                    for &(earlier, quantity) in products.iter().take(taken) {
                        earlier.put_back(i64::from(quantity));
                    }
                    return Err(short(product, quantity, available));
                }
            }
        }
        StockDiscipline::CheckThenAct => {
            for &(product, quantity) in &products {
                let available = product.stock();
                if available < i64::from(quantity) {
                    return Err(short(product, quantity, available));
                }
            }
            // The bug: the world changes while we are not looking.
            tokio::task::yield_now().await;
            tokio::time::sleep(OVERSELL_RACE_WINDOW).await;
            for &(product, quantity) in &products {
                product.take_unchecked(i64::from(quantity));
            }
        }
    }
    let items: Vec<OrderLine> = products
        .iter()
        .map(|&(product, quantity)| OrderLine {
            product: product.id,
            name: product.name.clone(),
            quantity,
            price: product.price(),
        })
        .collect();
    let total_cents: u64 = products
        .iter()
        .map(|&(product, quantity)| product.price_cents * u64::from(quantity))
        .sum();
    Ok(Order {
        order: numbers.next(),
        items,
        total: total_cents as f64 / 100.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(product: ProductId, quantity: u32) -> CartLine {
        CartLine { product, quantity }
    }

    #[tokio::test]
    async fn an_order_takes_the_stock_of_every_line() {
        let catalog = Catalog::new(3, 5);
        let numbers = OrderNumbers::default();
        let order = place_order(
            &catalog,
            &numbers,
            &[line(1, 2), line(3, 5)],
            StockDiscipline::Atomic,
        )
        .await
        .expect("in stock");
        assert_eq!(order.order, 1);
        assert_eq!(catalog.get(1).map(|p| p.stock()), Some(3));
        assert_eq!(catalog.get(3).map(|p| p.stock()), Some(0));
    }

    #[tokio::test]
    async fn a_short_line_refuses_the_whole_order_and_restores_the_others() {
        let catalog = Catalog::new(2, 1);
        let numbers = OrderNumbers::default();
        let refused = place_order(
            &catalog,
            &numbers,
            &[line(1, 1), line(2, 2)],
            StockDiscipline::Atomic,
        )
        .await;
        assert!(matches!(
            refused,
            Err(CheckoutError::InsufficientStock {
                product: 2,
                requested: 2,
                available: 1,
                ..
            })
        ));
        assert_eq!(catalog.get(1).map(|p| p.stock()), Some(1));
    }

    #[tokio::test]
    async fn an_empty_cart_is_refused() {
        let catalog = Catalog::new(1, 1);
        let refused = place_order(
            &catalog,
            &OrderNumbers::default(),
            &[],
            StockDiscipline::Atomic,
        )
        .await;
        assert_eq!(refused, Err(CheckoutError::EmptyCart));
    }

    #[tokio::test]
    async fn check_then_act_alone_behaves() {
        let catalog = Catalog::new(1, 1);
        let numbers = OrderNumbers::default();
        let lines = [line(1, 1)];
        assert!(
            place_order(&catalog, &numbers, &lines, StockDiscipline::CheckThenAct)
                .await
                .is_ok()
        );
        assert!(
            place_order(&catalog, &numbers, &lines, StockDiscipline::CheckThenAct)
                .await
                .is_err()
        );
        assert_eq!(catalog.get(1).map(|p| p.stock()), Some(0));
    }

    #[tokio::test]
    async fn check_then_act_oversells_when_checkouts_overlap() {
        let catalog = Catalog::new(1, 1);
        let numbers = OrderNumbers::default();
        let lines = [line(1, 1)];
        let orders = futures_join(&catalog, &numbers, &lines, StockDiscipline::CheckThenAct).await;
        assert_eq!(orders, 10, "every overlapping checkout passed the check");
        assert_eq!(catalog.get(1).map(|p| p.stock()), Some(-9));
    }

    #[tokio::test]
    async fn atomic_never_oversells_when_checkouts_overlap() {
        let catalog = Catalog::new(1, 1);
        let numbers = OrderNumbers::default();
        let lines = [line(1, 1)];
        let orders = futures_join(&catalog, &numbers, &lines, StockDiscipline::Atomic).await;
        assert_eq!(orders, 1);
        assert_eq!(catalog.get(1).map(|p| p.stock()), Some(0));
    }

    /// Runs ten checkouts concurrently on one task and counts the placed orders.
    async fn futures_join(
        catalog: &Catalog,
        numbers: &OrderNumbers,
        lines: &[CartLine],
        discipline: StockDiscipline,
    ) -> usize {
        let checkouts = (0..10).map(|_| place_order(catalog, numbers, lines, discipline));
        futures_util::future::join_all(checkouts)
            .await
            .iter()
            .filter(|outcome| outcome.is_ok())
            .count()
    }
}
