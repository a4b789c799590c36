//! Measures how loaded the shop is: the share of worker slots in use, the demand on
//! them (in use plus queued), and the response and error rates, each averaged over a
//! short window so one slow request does not swing the balancer.
//!
//! Utilization is time-weighted exactly, not sampled: every slot acquisition subtracts
//! its start time from an accumulator and every release adds its end time, so at any
//! instant `accumulator + busy × now` is the integral of busy slots over time (the
//! classic "area under the busy curve" trick). Two reads of that integral, a window
//! apart, give the average over the window whatever the request rate, with two atomic
//! additions per request and no lock.

use std::{
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Counts what the worker pool does. Shared by every request; all updates are single
/// atomic operations.
#[derive(Debug)]
pub struct LoadMeter {
    epoch: Instant,
    busy: AtomicI64,
    busy_area: AtomicI64,
    in_system: AtomicI64,
    in_system_area: AtomicI64,
    responses: AtomicU64,
    errors: AtomicU64,
}

/// The meter's running totals at one instant; two of them make a [`Sample`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Totals {
    /// Microseconds since the meter started.
    pub at_us: i64,
    /// Integral of busy slots over time, in slot-microseconds.
    pub busy_area_us: i64,
    /// Integral of requests in the system (queued or busy), in request-microseconds.
    pub in_system_area_us: i64,
    /// Responses sent so far.
    pub responses: u64,
    /// Of those, server errors (5xx) so far.
    pub errors: u64,
}

/// Averages over one sampling window, before smoothing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    /// Busy slots ÷ slots.
    pub utilization: f64,
    /// (Busy + queued) ÷ slots: above 1 when requests wait for a slot.
    pub demand: f64,
    /// Responses per second.
    pub rps: f64,
    /// Server errors per second.
    pub eps: f64,
}

/// The smoothed load the shop reports in ORCA headers and on `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LoadReport {
    /// Smoothed busy slots ÷ slots, 0–1 (briefly above 1 while a capacity cut drains).
    pub utilization: f64,
    /// Smoothed (busy + queued) ÷ slots.
    pub demand: f64,
    /// Smoothed responses per second.
    pub rps: f64,
    /// Smoothed server errors per second.
    pub eps: f64,
    /// Worker slots at the time of the report.
    pub workers: usize,
    /// Requests waiting for a slot at the time of the report.
    pub queued: i64,
}

impl Default for LoadMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl LoadMeter {
    /// A meter with nothing counted, its clock starting now.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            busy: AtomicI64::new(0),
            busy_area: AtomicI64::new(0),
            in_system: AtomicI64::new(0),
            in_system_area: AtomicI64::new(0),
            responses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// Microseconds since the meter started; `i64` holds 292,000 years of them.
    fn now_us(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX)
    }

    /// A request joins the system (it may have to queue for a slot); dropping the
    /// guard takes it out again, also when the client gives up while queued.
    pub fn arrive(&self) -> InSystem<'_> {
        self.in_system_area
            .fetch_sub(self.now_us(), Ordering::Relaxed);
        self.in_system.fetch_add(1, Ordering::Relaxed);
        InSystem { meter: self }
    }

    /// A request got a worker slot.
    pub(crate) fn start_work(&self) {
        self.busy_area.fetch_sub(self.now_us(), Ordering::Relaxed);
        self.busy.fetch_add(1, Ordering::Relaxed);
    }

    /// A request gave its worker slot back.
    pub(crate) fn finish_work(&self) {
        self.busy.fetch_sub(1, Ordering::Relaxed);
        self.busy_area.fetch_add(self.now_us(), Ordering::Relaxed);
    }

    /// Counts one response; 5xx count as errors (ORCA `eps`). A 409 for an empty
    /// shelf is the shop working, not failing.
    pub fn record_response(&self, status: u16) {
        self.responses.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Slots in use right now.
    pub fn busy(&self) -> i64 {
        self.busy.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot right now.
    pub fn queued(&self) -> i64 {
        (self.in_system.load(Ordering::Relaxed) - self.busy()).max(0)
    }

    /// The running totals now. Each read is a few independent atomic loads, so a
    /// request finishing in between can skew one window slightly; the next window,
    /// read from fresh totals, makes up for it exactly.
    pub fn totals(&self) -> Totals {
        let at_us = self.now_us();
        let busy_area_us = self.busy_area.load(Ordering::Relaxed) + self.busy() * at_us;
        let in_system_area_us = self.in_system_area.load(Ordering::Relaxed)
            + self.in_system.load(Ordering::Relaxed) * at_us;
        Totals {
            at_us,
            busy_area_us,
            in_system_area_us,
            responses: self.responses.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// A request in the system, queued or working; counted out when dropped.
#[derive(Debug)]
pub struct InSystem<'a> {
    meter: &'a LoadMeter,
}

impl Drop for InSystem<'_> {
    fn drop(&mut self) {
        self.meter.in_system.fetch_sub(1, Ordering::Relaxed);
        self.meter
            .in_system_area
            .fetch_add(self.meter.now_us(), Ordering::Relaxed);
    }
}

/// The averages between two readings of the totals, for a pool of `workers` slots.
/// `None` when no time passed.
pub fn sample(previous: &Totals, current: &Totals, workers: usize) -> Option<Sample> {
    let elapsed_us = current.at_us - previous.at_us;
    if elapsed_us <= 0 {
        return None;
    }
    let elapsed_us = elapsed_us as f64;
    let slot_time = elapsed_us * workers.max(1) as f64;
    let per_second = 1e6 / elapsed_us;
    Some(Sample {
        utilization: ((current.busy_area_us - previous.busy_area_us) as f64 / slot_time).max(0.0),
        demand: ((current.in_system_area_us - previous.in_system_area_us) as f64 / slot_time)
            .max(0.0),
        rps: current.responses.saturating_sub(previous.responses) as f64 * per_second,
        eps: current.errors.saturating_sub(previous.errors) as f64 * per_second,
    })
}

/// An exponentially weighted moving average over time with time constant `window`:
/// a sample `dt` after the last one gets weight `1 − e^(−dt/window)`, so irregular
/// sampling intervals average correctly (the same form as PeakEWMA's decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    window: Duration,
    value: f64,
}

impl Ewma {
    /// An average that starts at zero: a fresh shop is idle.
    pub fn new(window: Duration) -> Self {
        Self { window, value: 0.0 }
    }

    /// Folds in `sample`, taken over the last `dt`, and returns the new average.
    pub fn update(&mut self, sample: f64, dt: Duration) -> f64 {
        let window = self.window.as_secs_f64();
        let weight = if window <= 0.0 {
            1.0
        } else {
            1.0 - (-dt.as_secs_f64() / window).exp()
        };
        self.value += weight * (sample - self.value);
        self.value
    }

    /// The current average.
    pub fn value(&self) -> f64 {
        self.value
    }
}

/// The smoothed versions of every [`Sample`] field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Smoothed {
    utilization: Ewma,
    demand: Ewma,
    rps: Ewma,
    eps: Ewma,
}

impl Smoothed {
    /// All averages at zero, with time constant `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            utilization: Ewma::new(window),
            demand: Ewma::new(window),
            rps: Ewma::new(window),
            eps: Ewma::new(window),
        }
    }

    /// Folds in a window's sample and returns the report to publish.
    pub fn update(
        &mut self,
        sample: &Sample,
        dt: Duration,
        workers: usize,
        queued: i64,
    ) -> LoadReport {
        LoadReport {
            utilization: self.utilization.update(sample.utilization, dt),
            demand: self.demand.update(sample.demand, dt),
            rps: self.rps.update(sample.rps, dt),
            eps: self.eps.update(sample.eps, dt),
            workers,
            queued,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(at_ms: i64, busy_ms: i64, in_system_ms: i64, responses: u64) -> Totals {
        Totals {
            at_us: at_ms * 1000,
            busy_area_us: busy_ms * 1000,
            in_system_area_us: in_system_ms * 1000,
            responses,
            errors: 0,
        }
    }

    #[test]
    fn two_of_four_slots_busy_for_a_whole_window_is_half_utilization() {
        let s = sample(&totals(0, 0, 0, 0), &totals(100, 200, 200, 10), 4).expect("time passed");
        assert!((s.utilization - 0.5).abs() < 1e-9);
        assert!((s.rps - 100.0).abs() < 1e-9);
    }

    #[test]
    fn queued_requests_raise_demand_above_one_but_not_utilization() {
        // 4 slots busy and 4 more requests waiting, for the whole 100 ms.
        let s = sample(&totals(0, 0, 0, 0), &totals(100, 400, 800, 0), 4).expect("time passed");
        assert!((s.utilization - 1.0).abs() < 1e-9);
        assert!((s.demand - 2.0).abs() < 1e-9);
    }

    #[test]
    fn no_sample_when_no_time_passed() {
        assert_eq!(sample(&totals(5, 0, 0, 0), &totals(5, 0, 0, 0), 4), None);
    }

    #[test]
    fn meter_integrates_busy_time_of_requests_in_progress() {
        let meter = LoadMeter::new();
        let before = meter.totals();
        let waiting = meter.arrive();
        meter.start_work();
        std::thread::sleep(Duration::from_millis(20));
        // Still working: the integral already covers the time so far.
        let during = meter.totals();
        let s = sample(&before, &during, 1).expect("time passed");
        assert!(
            s.utilization > 0.8,
            "one of one slots busy, got {}",
            s.utilization
        );
        meter.finish_work();
        drop(waiting);
        meter.record_response(200);
        std::thread::sleep(Duration::from_millis(20));
        let after = meter.totals();
        let s = sample(&during, &after, 1).expect("time passed");
        assert!(
            s.utilization < 0.2,
            "idle after the request, got {}",
            s.utilization
        );
        assert_eq!(meter.busy(), 0);
        assert_eq!(meter.queued(), 0);
    }

    #[test]
    fn ewma_reaches_63_percent_of_a_step_after_one_window() {
        let mut ewma = Ewma::new(Duration::from_secs(1));
        for _ in 0..10 {
            ewma.update(1.0, Duration::from_millis(100));
        }
        assert!((ewma.value() - (1.0 - (-1.0f64).exp())).abs() < 1e-9);
    }

    #[test]
    fn ewma_weights_samples_by_the_time_they_cover() {
        let mut fine = Ewma::new(Duration::from_secs(1));
        let mut coarse = Ewma::new(Duration::from_secs(1));
        for _ in 0..4 {
            fine.update(1.0, Duration::from_millis(50));
        }
        coarse.update(1.0, Duration::from_millis(200));
        assert!((fine.value() - coarse.value()).abs() < 1e-9);
    }
}
