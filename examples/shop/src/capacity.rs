//! Emulates a node of a given size: a pool of worker slots that every `/api` request
//! holds for the service time. A capacity-2 shop has twice the slots of a capacity-1
//! shop, so it serves twice the throughput at the same latency, which is what the
//! balancing benchmarks (capacities 1:2:4) need, without burning real CPU.
//!
//! Requests beyond the pool wait in the semaphore's FIFO queue, as they would in a
//! thread pool's run queue. The capacity can change while the shop runs (the reaction
//! benchmark halves it mid-run): growing adds slots at once; shrinking removes free
//! slots at once and takes the rest as busy ones are released, so in-flight requests
//! finish undisturbed.

use std::sync::{
    Mutex, PoisonError,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::load::{InSystem, LoadMeter};

/// The largest capacity multiplier accepted.
pub const MAX_CAPACITY: f64 = 1_000.0;
/// The largest pool: beyond this the emulation is no longer a small node.
pub const MAX_WORKERS: usize = 100_000;

/// A capacity that cannot be emulated.
#[allow(missing_docs)] // the fields are described by each variant's message
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CapacityError {
    #[error("capacity = {value}: expected a number greater than 0 and at most {MAX_CAPACITY}")]
    OutOfRange { value: f64 },
    #[error(
        "capacity {capacity} × base_workers {base_workers} = {workers} worker slots: expected at most {MAX_WORKERS}"
    )]
    TooManyWorkers {
        capacity: f64,
        base_workers: u32,
        workers: f64,
    },
}

/// Worker slots for `capacity` × `base_workers`, rounded, never fewer than one (a
/// shop with no slots would not be slow, it would be down).
pub fn workers_for(capacity: f64, base_workers: u32) -> Result<usize, CapacityError> {
    if !capacity.is_finite() || capacity <= 0.0 || capacity > MAX_CAPACITY {
        return Err(CapacityError::OutOfRange { value: capacity });
    }
    let workers = (capacity * f64::from(base_workers)).round();
    if workers > MAX_WORKERS as f64 {
        return Err(CapacityError::TooManyWorkers {
            capacity,
            base_workers,
            workers,
        });
    }
    // In range 0..=MAX_WORKERS after the checks above, so the cast is exact.
    Ok((workers as usize).max(1))
}

/// The outcome of a capacity change.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Resized {
    /// The capacity now in force.
    pub capacity: f64,
    /// Worker slots now.
    pub workers: usize,
    /// Worker slots before the change.
    pub previous_workers: usize,
}

/// The pool of worker slots.
#[derive(Debug)]
pub struct WorkerPool {
    semaphore: Semaphore,
    base_workers: u32,
    /// The target number of slots; what utilization is measured against.
    workers: AtomicUsize,
    capacity_bits: AtomicU64,
    /// Slots still to be removed after a cut: each release pays one off instead of
    /// returning its permit.
    owed: AtomicUsize,
    /// Serialises capacity changes (an admin action, never on the request path).
    resize: Mutex<()>,
}

impl WorkerPool {
    /// A pool sized for `capacity` × `base_workers`.
    pub fn new(capacity: f64, base_workers: u32) -> Result<Self, CapacityError> {
        let workers = workers_for(capacity, base_workers)?;
        Ok(Self {
            semaphore: Semaphore::new(workers),
            base_workers,
            workers: AtomicUsize::new(workers),
            capacity_bits: AtomicU64::new(capacity.to_bits()),
            owed: AtomicUsize::new(0),
            resize: Mutex::new(()),
        })
    }

    /// Worker slots the pool is sized for.
    pub fn workers(&self) -> usize {
        self.workers.load(Ordering::Relaxed)
    }

    /// The capacity multiplier in force.
    pub fn capacity(&self) -> f64 {
        f64::from_bits(self.capacity_bits.load(Ordering::Relaxed))
    }

    /// Slots of a capacity-1.0 node.
    pub fn base_workers(&self) -> u32 {
        self.base_workers
    }

    /// Resizes the pool to `capacity` × `base_workers` slots.
    pub fn set_capacity(&self, capacity: f64) -> Result<Resized, CapacityError> {
        let target = workers_for(capacity, self.base_workers)?;
        let _serial = self.resize.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = self.workers.swap(target, Ordering::Relaxed);
        self.capacity_bits
            .store(capacity.to_bits(), Ordering::Relaxed);
        if target > previous {
            let mut grow = target - previous;
            // Slots still owed from an earlier cut are simply no longer owed.
            let cancelled = self.claim_owed(grow);
            grow -= cancelled;
            self.semaphore.add_permits(grow);
        } else if previous > target {
            let cut = previous - target;
            let removed = self.semaphore.forget_permits(cut);
            self.owed.fetch_add(cut - removed, Ordering::Relaxed);
            // A slot released between the two lines above went back to the
            // semaphore before the debt was recorded; take it now.
            let claimed = self.claim_owed(usize::MAX);
            let removed = self.semaphore.forget_permits(claimed);
            self.owed.fetch_add(claimed - removed, Ordering::Relaxed);
        }
        tracing::info!(
            capacity,
            workers = target,
            previous_workers = previous,
            "capacity changed"
        );
        Ok(Resized {
            capacity,
            workers: target,
            previous_workers: previous,
        })
    }

    /// Takes up to `at_most` slots off the debt, returning how many it took.
    fn claim_owed(&self, at_most: usize) -> usize {
        let mut claimed = 0;
        // fetch_update retries only while other threads change `owed` concurrently.
        let _ = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                claimed = owed.min(at_most);
                (claimed > 0).then_some(owed - claimed)
            });
        claimed
    }

    /// Waits for a free slot (FIFO), counting the wait and the work on `meter`.
    /// `None` only if the pool was closed, which this shop never does.
    pub async fn admit<'a>(&'a self, meter: &'a LoadMeter) -> Option<Slot<'a>> {
        let in_system = meter.arrive();
        let permit = self.semaphore.acquire().await.ok()?;
        meter.start_work();
        Some(Slot {
            pool: self,
            meter,
            permit: Some(permit),
            _in_system: in_system,
        })
    }
}

/// A held worker slot; released (or retired, after a capacity cut) when dropped.
#[derive(Debug)]
pub struct Slot<'a> {
    pool: &'a WorkerPool,
    meter: &'a LoadMeter,
    permit: Option<SemaphorePermit<'a>>,
    _in_system: InSystem<'a>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.meter.finish_work();
        if let Some(permit) = self.permit.take() {
            if self.pool.claim_owed(1) == 1 {
                permit.forget();
            } else {
                drop(permit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_scale_with_capacity_and_round() {
        assert_eq!(workers_for(1.0, 4), Ok(4));
        assert_eq!(workers_for(2.0, 4), Ok(8));
        assert_eq!(workers_for(0.5, 4), Ok(2));
        assert_eq!(workers_for(0.6, 4), Ok(2)); // 2.4 rounds to 2
        assert_eq!(workers_for(0.7, 4), Ok(3)); // 2.8 rounds to 3
    }

    #[test]
    fn tiny_capacity_still_has_one_worker() {
        assert_eq!(workers_for(0.01, 4), Ok(1));
    }

    #[test]
    fn refuses_zero_negative_and_non_finite_capacity() {
        for value in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            assert!(workers_for(value, 4).is_err(), "{value} accepted");
        }
    }

    #[tokio::test]
    async fn shrinking_retires_busy_slots_as_they_are_released() {
        let meter = LoadMeter::new();
        let pool = WorkerPool::new(1.0, 4).expect("valid");
        let held: Vec<_> = [(); 4]
            .iter()
            .map(|_| pool.semaphore.try_acquire())
            .collect();
        assert!(held.iter().all(Result::is_ok));
        let resized = pool.set_capacity(0.5).expect("valid");
        assert_eq!((resized.previous_workers, resized.workers), (4, 2));
        assert_eq!(pool.owed.load(Ordering::Relaxed), 2);
        // Return the four slots through the pool's own release path.
        for permit in held.into_iter().flatten() {
            meter.start_work();
            drop(Slot {
                pool: &pool,
                meter: &meter,
                permit: Some(permit),
                _in_system: meter.arrive(),
            });
        }
        assert_eq!(pool.semaphore.available_permits(), 2);
        assert_eq!(pool.owed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn growing_cancels_an_outstanding_cut_before_adding_slots() {
        let pool = WorkerPool::new(1.0, 4).expect("valid");
        let held: Vec<_> = [(); 4]
            .iter()
            .map(|_| pool.semaphore.try_acquire())
            .collect();
        pool.set_capacity(0.25).expect("valid"); // owes 3
        pool.set_capacity(2.0).expect("valid"); // cancels 3, adds 4
        assert_eq!(pool.owed.load(Ordering::Relaxed), 0);
        drop(held);
        assert_eq!(pool.semaphore.available_permits(), 8);
        assert_eq!(pool.workers(), 8);
    }

    #[tokio::test]
    async fn idle_pool_shrinks_at_once() {
        let pool = WorkerPool::new(4.0, 4).expect("valid");
        pool.set_capacity(1.0).expect("valid");
        assert_eq!(pool.semaphore.available_permits(), 4);
        assert_eq!(pool.owed.load(Ordering::Relaxed), 0);
    }
}
