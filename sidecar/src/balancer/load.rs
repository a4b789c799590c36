//! What a balancer knows about one endpoint: lock-free counters and estimates that the
//! request path updates with atomics and the strategies read.

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use super::peak_ewma;

/// Live load signals of one endpoint. Every field is an atomic: the request path reads
/// and writes them without locks. Two racing updates of the RTT estimate may lose one
/// sample; an estimate tolerates that, a lock on every response would not be worth it.
#[derive(Debug)]
pub struct EndpointLoad {
    /// Requests sent to this endpoint whose response has not finished.
    active: AtomicU32,
    /// The weight the weighted strategies use (config weight, or the live cpuWeighted one).
    weight: AtomicU32,
    /// Peak-EWMA RTT estimate in nanoseconds, as `f64` bits.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, in nanoseconds since `origin`.
    rtt_stamp_ns: AtomicU64,
    origin: Instant,
}

impl EndpointLoad {
    /// A fresh endpoint with `weight`, its RTT estimate at [`peak_ewma::DEFAULT_RTT`].
    pub fn new(weight: u32) -> Self {
        Self::new_at(weight, Instant::now())
    }

    /// As [`Self::new`], with the clock starting at `origin` (for tests).
    pub fn new_at(weight: u32, origin: Instant) -> Self {
        Self {
            active: AtomicU32::new(0),
            weight: AtomicU32::new(weight),
            rtt_ns: AtomicU64::new((peak_ewma::DEFAULT_RTT.as_nanos() as f64).to_bits()),
            rtt_stamp_ns: AtomicU64::new(0),
            origin,
        }
    }

    /// Requests in flight.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a request as started; pair with [`Self::finish`].
    pub fn start(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request as finished.
    pub fn finish(&self) {
        // Saturating: a config reload never resets the counter under a live request, but
        // an underflow here must not wrap to 4 billion active requests.
        let _ = self
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                Some(a.saturating_sub(1))
            });
    }

    /// The current weight.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Replaces the weight (the cpuWeighted controller, or a config reload).
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
    }

    /// Records the time to response headers of one request, as tower's PeakEwma does.
    pub fn observe_rtt(&self, rtt: Duration) {
        self.observe_rtt_at(rtt, Instant::now());
    }

    /// As [`Self::observe_rtt`] at `now`, for callers that read the clock already.
    pub fn observe_rtt_at(&self, rtt: Duration, now: Instant) {
        let stamp = self.nanos_since_origin(now);
        let prev = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let prev_stamp = self.rtt_stamp_ns.load(Ordering::Relaxed);
        let elapsed = Duration::from_nanos(stamp.saturating_sub(prev_stamp));
        let next = peak_ewma::update(prev, rtt.as_nanos() as f64, elapsed, peak_ewma::DECAY);
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.rtt_stamp_ns.store(stamp, Ordering::Relaxed);
    }

    /// The RTT estimate at `now` in nanoseconds, decayed toward zero since the last
    /// sample so that an endpoint that was slow once is tried again.
    pub fn rtt_estimate_at(&self, now: Instant) -> f64 {
        let prev = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let stamp = self.rtt_stamp_ns.load(Ordering::Relaxed);
        let elapsed = Duration::from_nanos(self.nanos_since_origin(now).saturating_sub(stamp));
        peak_ewma::decay(prev, elapsed, peak_ewma::DECAY)
    }

    fn nanos_since_origin(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Anything a balancer can pick from: it exposes its [`EndpointLoad`].
pub trait Target {
    /// The endpoint's load signals.
    fn load(&self) -> &EndpointLoad;
}

impl Target for EndpointLoad {
    fn load(&self) -> &EndpointLoad {
        self
    }
}

impl<T: Target> Target for std::sync::Arc<T> {
    fn load(&self) -> &EndpointLoad {
        T::load(self)
    }
}
