//! The products and their stock. The product list never changes after start, so it is
//! read without any lock; each product's stock is one atomic integer, so checkouts of
//! different products never contend and checkouts of the same product contend only on
//! that product's counter.

use std::sync::atomic::{AtomicI64, Ordering};

use serde::Serialize;

/// A product id: `1..=products`. Small and dense, so it doubles as an index.
pub type ProductId = u32;

/// One product.
#[derive(Debug)]
pub struct Product {
    /// Its id.
    pub id: ProductId,
    /// A made-up but stable name, so demo output is readable.
    pub name: String,
    /// Price in cents: money is never a float inside the shop.
    pub price_cents: u64,
    /// Signed on purpose: with `--bug oversell` stock can go below zero, and the
    /// invariant that checks it has to be able to see that.
    stock: AtomicI64,
}

impl Product {
    /// Units in stock now.
    pub fn stock(&self) -> i64 {
        self.stock.load(Ordering::Acquire)
    }

    /// Sets the stock (restocking between demo runs).
    pub fn set_stock(&self, stock: i64) {
        self.stock.store(stock, Ordering::Release);
    }

    /// Takes `quantity` units if that many are left, atomically (a compare-and-swap
    /// loop, so two checkouts can never both take the last unit). On refusal returns
    /// what was available.
    pub fn take(&self, quantity: i64) -> Result<(), i64> {
        self.stock
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |stock| {
                (stock >= quantity).then_some(stock - quantity)
            })
            .map(|_| ())
    }

    /// Subtracts `quantity` without looking: the act half of the oversell bug's
    /// check-then-act.
    pub fn take_unchecked(&self, quantity: i64) {
        self.stock.fetch_sub(quantity, Ordering::AcqRel);
    }

    /// Returns units taken by an order that could not be completed.
    pub fn put_back(&self, quantity: i64) {
        self.stock.fetch_add(quantity, Ordering::AcqRel);
    }

    /// The price in currency units, for JSON.
    pub fn price(&self) -> f64 {
        self.price_cents as f64 / 100.0
    }
}

/// All products, by id.
#[derive(Debug)]
pub struct Catalog {
    products: Box<[Product]>,
}

/// One page of the catalog.
#[derive(Debug)]
pub struct Page<'a> {
    /// The products on this page (empty past the last page).
    pub items: &'a [Product],
    /// The page number asked for (1-based).
    pub page: u32,
    /// Pages in the catalog at this page size.
    pub pages: u32,
    /// Products in the catalog.
    pub total: u32,
}

/// Products with negative stock: what `--bug oversell` leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Oversold {
    /// How many products are below zero.
    pub products: u32,
    /// How many units were sold that did not exist.
    pub units: i64,
}

const ADJECTIVES: [&str; 10] = [
    "Sturdy", "Vintage", "Compact", "Deluxe", "Organic", "Foldable", "Wireless", "Classic",
    "Rugged", "Tiny",
];
const NOUNS: [&str; 10] = [
    "Umbrella",
    "Kettle",
    "Backpack",
    "Lamp",
    "Notebook",
    "Headphones",
    "Teapot",
    "Blanket",
    "Skateboard",
    "Cactus",
];

impl Catalog {
    /// `count` products (ids `1..=count`), each with `initial_stock` units. Names and
    /// prices are derived from the id, so every replica of a demo has the same shop.
    pub fn new(count: u32, initial_stock: i64) -> Self {
        let products = (1..=count)
            .map(|id| {
                let i = id as usize;
                Product {
                    id,
                    name: format!(
                        "{} {} #{id}",
                        ADJECTIVES[i % ADJECTIVES.len()],
                        NOUNS[(i / ADJECTIVES.len()) % NOUNS.len()]
                    ),
                    // 4.99 to 98.99, neighbours priced differently (37 is coprime to 95).
                    price_cents: 499 + u64::from(id % 95 * 37 % 95) * 100,
                    stock: AtomicI64::new(initial_stock),
                }
            })
            .collect();
        Self { products }
    }

    /// Every product, in id order.
    pub fn products(&self) -> &[Product] {
        &self.products
    }

    /// The product with `id`, if there is one.
    pub fn get(&self, id: ProductId) -> Option<&Product> {
        let index = usize::try_from(id).ok()?.checked_sub(1)?;
        self.products.get(index)
    }

    /// Page `page` (1-based) of `size` products. A page past the end is empty, not an
    /// error: the client learns `pages` from any page.
    pub fn page(&self, page: u32, size: u32) -> Page<'_> {
        let total = u32::try_from(self.products.len()).unwrap_or(u32::MAX);
        let size = size.max(1);
        let start = (page.max(1) as usize - 1).saturating_mul(size as usize);
        let end = start.saturating_add(size as usize).min(self.products.len());
        Page {
            items: self.products.get(start..end).unwrap_or(&[]),
            page,
            pages: total.div_ceil(size),
            total,
        }
    }

    /// Products whose stock went negative, and by how much in total.
    pub fn oversold(&self) -> Oversold {
        self.products
            .iter()
            .map(Product::stock)
            .filter(|&stock| stock < 0)
            .fold(Oversold::default(), |acc, stock| Oversold {
                products: acc.products + 1,
                units: acc.units - stock,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_the_catalog_without_overlap() {
        let catalog = Catalog::new(25, 1);
        let first = catalog.page(1, 10);
        assert_eq!(first.items.first().map(|p| p.id), Some(1));
        assert_eq!((first.pages, first.total), (3, 25));
        let last = catalog.page(3, 10);
        assert_eq!(
            last.items.iter().map(|p| p.id).collect::<Vec<_>>(),
            (21..=25).collect::<Vec<_>>()
        );
        assert!(catalog.page(4, 10).items.is_empty());
        assert!(catalog.page(u32::MAX, u32::MAX).items.is_empty());
    }

    #[test]
    fn ids_start_at_one() {
        let catalog = Catalog::new(3, 1);
        assert!(catalog.get(0).is_none());
        assert_eq!(catalog.get(3).map(|p| p.id), Some(3));
        assert!(catalog.get(4).is_none());
    }

    #[test]
    fn take_never_goes_below_zero() {
        let catalog = Catalog::new(1, 2);
        let product = catalog.get(1).expect("exists");
        assert_eq!(product.take(2), Ok(()));
        assert_eq!(product.take(1), Err(0));
        assert_eq!(product.stock(), 0);
    }

    #[test]
    fn take_from_many_threads_sells_exactly_the_stock() {
        let catalog = Catalog::new(1, 100);
        let sold = AtomicI64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        if catalog.get(1).is_some_and(|p| p.take(1).is_ok()) {
                            sold.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(sold.load(Ordering::Relaxed), 100);
        assert_eq!(catalog.get(1).map(Product::stock), Some(0));
    }

    #[test]
    fn oversold_counts_products_and_units_below_zero() {
        let catalog = Catalog::new(3, 1);
        catalog.get(1).expect("exists").take_unchecked(3);
        catalog.get(2).expect("exists").take_unchecked(1);
        assert_eq!(
            catalog.oversold(),
            Oversold {
                products: 1,
                units: 2
            }
        );
    }

    #[test]
    fn prices_are_positive_and_names_distinct() {
        let catalog = Catalog::new(100, 1);
        assert!(
            catalog
                .products()
                .iter()
                .all(|p| (499..=9899).contains(&p.price_cents))
        );
        let names: std::collections::HashSet<_> =
            catalog.products().iter().map(|p| &p.name).collect();
        assert_eq!(names.len(), 100);
    }
}
