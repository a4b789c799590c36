//! A session's shopping cart: lines of product and quantity, merged by product and
//! bounded, so a misbehaving bot cannot grow one without limit. Pure data; stock is
//! checked by the caller against the catalog.

use serde::Serialize;

use crate::catalog::ProductId;

/// Distinct products one cart may hold.
pub const MAX_LINES: usize = 100;
/// Units of one product one cart may hold.
pub const MAX_QUANTITY: u32 = 1_000;

/// One line of a cart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CartLine {
    /// The product.
    pub product: ProductId,
    /// How many units.
    pub quantity: u32,
}

/// A cart, its lines kept in product order so an order lists them predictably.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cart {
    lines: Vec<CartLine>,
}

/// A cart change that would break its bounds.
#[allow(missing_docs)] // the fields are described by each variant's message
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CartError {
    #[error("the cart already holds {MAX_LINES} different products; check out first")]
    TooManyLines,
    #[error(
        "product {product}: {quantity} units would exceed the limit of {MAX_QUANTITY} per product"
    )]
    QuantityTooLarge { product: ProductId, quantity: u64 },
}

impl Cart {
    /// The lines, in product order.
    pub fn lines(&self) -> &[CartLine] {
        &self.lines
    }

    /// Whether the cart holds nothing.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Units of `product` already in the cart.
    pub fn quantity_of(&self, product: ProductId) -> u32 {
        self.lines
            .binary_search_by_key(&product, |l| l.product)
            .ok()
            .and_then(|i| self.lines.get(i))
            .map_or(0, |l| l.quantity)
    }

    /// The line for `product` if `quantity` more units were added, without adding them.
    pub fn preview_add(&self, product: ProductId, quantity: u32) -> Result<CartLine, CartError> {
        let total = u64::from(self.quantity_of(product)) + u64::from(quantity);
        if total > u64::from(MAX_QUANTITY) {
            return Err(CartError::QuantityTooLarge {
                product,
                quantity: total,
            });
        }
        if self.quantity_of(product) == 0 && self.lines.len() >= MAX_LINES {
            return Err(CartError::TooManyLines);
        }
        // total ≤ MAX_QUANTITY, checked above.
        let quantity = u32::try_from(total).unwrap_or(MAX_QUANTITY);
        Ok(CartLine { product, quantity })
    }

    /// Adds `quantity` units of `product`, merging with an existing line.
    pub fn add(&mut self, product: ProductId, quantity: u32) -> Result<CartLine, CartError> {
        let line = self.preview_add(product, quantity)?;
        match self.lines.binary_search_by_key(&product, |l| l.product) {
            Ok(i) => {
                if let Some(existing) = self.lines.get_mut(i) {
                    *existing = line;
                }
            }
            Err(i) => self.lines.insert(i, line),
        }
        Ok(line)
    }

    /// Empties the cart, returning what it held (checkout works on the taken lines, so
    /// two concurrent checkouts of one session cannot both order the same items).
    pub fn take(&mut self) -> Vec<CartLine> {
        std::mem::take(&mut self.lines)
    }

    /// Puts lines back after a checkout failed, merging with anything added meanwhile
    /// (capped at the per-product limit rather than refused: nothing is lost silently
    /// beyond that cap).
    pub fn restore(&mut self, lines: &[CartLine]) {
        for line in lines {
            let quantity = line
                .quantity
                .min(MAX_QUANTITY - self.quantity_of(line.product).min(MAX_QUANTITY));
            if quantity > 0 {
                let _ = self.add(line.product, quantity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_the_same_product_twice_merges_the_lines() {
        let mut cart = Cart::default();
        cart.add(7, 1).expect("fits");
        cart.add(3, 2).expect("fits");
        cart.add(7, 4).expect("fits");
        assert_eq!(
            cart.lines(),
            [
                CartLine {
                    product: 3,
                    quantity: 2
                },
                CartLine {
                    product: 7,
                    quantity: 5
                }
            ]
        );
    }

    #[test]
    fn refuses_more_than_the_per_product_limit() {
        let mut cart = Cart::default();
        cart.add(1, MAX_QUANTITY).expect("fits");
        assert_eq!(
            cart.add(1, 1),
            Err(CartError::QuantityTooLarge {
                product: 1,
                quantity: u64::from(MAX_QUANTITY) + 1
            })
        );
    }

    #[test]
    fn refuses_more_than_the_line_limit() {
        let mut cart = Cart::default();
        for product in 1..=MAX_LINES as u32 {
            cart.add(product, 1).expect("fits");
        }
        assert_eq!(cart.add(1_000, 1), Err(CartError::TooManyLines));
        // Adding to an existing line is still fine.
        assert!(cart.add(1, 1).is_ok());
    }

    #[test]
    fn take_empties_and_restore_merges_back() {
        let mut cart = Cart::default();
        cart.add(1, 2).expect("fits");
        let taken = cart.take();
        assert!(cart.is_empty());
        cart.add(1, 1).expect("fits");
        cart.restore(&taken);
        assert_eq!(
            cart.lines(),
            [CartLine {
                product: 1,
                quantity: 3
            }]
        );
    }
}
