//! Closed-loop simulation of the weight controller (`weights::compute`).
//!
//! Three backends with capacities 1:2:4 (100 requests per second per unit) receive an
//! offered load of 70% of their total capacity, split by the weights the controller
//! published the interval before. Each backend's utilization is its traffic ÷ its
//! capacity; the controller sees it through a metrics source that averages over a
//! window and adds seeded noise. After a phase of at least 200 intervals the middle
//! backend's capacity halves (1:1:4: it would run at 140% under the old split) and the
//! run continues as long again. Thresholds are maxLoad 0.9 / criticalLoad 0.98, above
//! the fleet's 70% (82% after the change), so that this is about balancing.
//!
//! Every run starts from equal weights, which put the smallest backend at 163%: it is
//! ejected at once and comes back by slow start, which is most of the first settle
//! time.
//!
//! For every smoothing the CRD allows (swept from 0.01 to 1.0), and for the three ways
//! utilization reaches the controller (CPU only, sampled per interval; CPU only,
//! averaged over a minute as `rate(…[1m])` does; and CPU with qps, as ORCA reports
//! it), the traffic shares must converge to the capacity shares, utilizations must
//! equalize, nothing may oscillate, and the split must re-converge after the capacity
//! change; without noise, no share may swing around its target. Time is simulated: no
//! clock is read, no thread sleeps.
//!
//! The settle times per smoothing are printed; see them with
//! `cargo test -p trimtab-operator --test weights_simulation -- --nocapture`.

use std::time::{Duration, SystemTime};

use trimtab_api::balancer_policy::{EndpointState, Weighting};
use trimtab_operator::weights::{self, Observation, Sample, WeightState};

/// Intervals before, and again after, the capacity change: at least 200, and long
/// enough for the slowest smoothing to forget (the EWMA's memory is ~1/smoothing).
fn phase_len(smoothing: f64) -> usize {
    200.max((4.0 / smoothing).ceil() as usize)
}

/// The controller's interval.
const INTERVAL: Duration = Duration::from_secs(10);
/// Requests per second one capacity unit serves at utilization 1.
const UNIT_QPS: f64 = 100.0;
/// Offered load as a share of the initial total capacity.
const LOAD: f64 = 0.7;
/// Relative measurement noise (one standard deviation) of utilization and qps.
const NOISE: f64 = 0.03;
/// The allowed smoothing range, swept.
const SMOOTHINGS: [f64; 8] = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0];
/// A share counts as settled within this distance of its capacity share.
const SETTLED: f64 = 0.02;
/// The window over which the last intervals of each phase are judged.
const TAIL: usize = 50;

const ADDRESSES: [&str; 3] = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"];

/// How the metrics source measures.
#[derive(Clone, Copy, Debug)]
struct Source {
    name: &'static str,
    /// Intervals the utilization is averaged over.
    window: usize,
    /// Whether the source reports qps (ORCA) or CPU only (metrics-server, Prometheus).
    qps: bool,
    /// Whether the sample says which window it averages over.
    tells_window: bool,
}

const SOURCES: [Source; 3] = [
    Source {
        name: "cpu per interval",
        window: 1,
        qps: false,
        tells_window: true,
    },
    Source {
        name: "cpu rate[1m]",
        window: 6,
        qps: false,
        tells_window: true,
    },
    Source {
        name: "cpu+qps (ORCA)",
        window: 1,
        qps: true,
        tells_window: true,
    },
];

/// SplitMix64 with Box–Muller: a seeded, version-independent noise source, so the
/// simulation is the same on every machine and with every `rand` release.
struct Noise(u64);

impl Noise {
    fn next_unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random bits in (0, 1].
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn gaussian(&mut self) -> f64 {
        let (u1, u2) = (self.next_unit(), self.next_unit());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `value` with relative noise `NOISE`, never negative.
    fn measure(&mut self, value: f64) -> f64 {
        (value * (1.0 + NOISE * self.gaussian())).max(0.0)
    }
}

/// One run: per interval, the traffic shares and true utilizations.
struct Trace {
    phase: usize,
    shares: Vec<[f64; 3]>,
    utilizations: Vec<[f64; 3]>,
    /// Intervals in which some endpoint was Ejected.
    ejected_intervals: usize,
    /// Intervals in which some endpoint was Throttled.
    throttled_intervals: usize,
    /// Intervals in which every endpoint was Ejected.
    all_ejected: usize,
    /// Intervals in which an ejection was withheld (the fleet was out of capacity).
    out_of_capacity: usize,
}

fn settings(smoothing: f64) -> Weighting {
    Weighting {
        smoothing,
        // The fleet runs at 70%, and at 82% after the capacity change: thresholds above
        // that, so that the test is about balancing, not about a fleet out of capacity.
        max_load: 0.9,
        critical_load: 0.98,
        ..Weighting::default()
    }
}

fn capacities(interval: usize, phase: usize) -> [f64; 3] {
    if interval < phase {
        [1.0, 2.0, 4.0]
    } else {
        [1.0, 1.0, 4.0]
    }
}

fn capacity_shares(interval: usize, phase: usize) -> [f64; 3] {
    let c = capacities(interval, phase);
    let total: f64 = c.iter().sum();
    c.map(|x| x / total)
}

fn simulate(smoothing: f64, source: Source, noisy: bool) -> Trace {
    let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let time = |k: usize| epoch + INTERVAL * k as u32;
    let settings = settings(smoothing);
    let phase = phase_len(smoothing);
    let offered = LOAD * UNIT_QPS * capacities(0, phase).iter().sum::<f64>();
    let mut noise = Noise(0x0074_7269_6d74_6162 ^ smoothing.to_bits());
    let mut measure = |v: f64| if noisy { noise.measure(v) } else { v };

    // Interval 0: no samples yet, the controller publishes equal weights.
    let blind: Vec<Observation> = ADDRESSES
        .iter()
        .map(|a| Observation::new(*a, None))
        .collect();
    let mut out =
        weights::compute(&WeightState::default(), &blind, time(0), &settings).expect("valid input");
    let mut trace = Trace {
        phase,
        shares: Vec::new(),
        utilizations: Vec::new(),
        ejected_intervals: 0,
        throttled_intervals: 0,
        all_ejected: 0,
        out_of_capacity: 0,
    };
    let mut traffic_history: Vec<[f64; 3]> = Vec::new();
    for k in 0..2 * phase {
        // Interval k runs on the weights published at time(k). With every endpoint
        // ejected the sidecars' panic threshold spreads traffic evenly.
        let w: Vec<f64> = out.endpoints.iter().map(|e| f64::from(e.weight)).collect();
        let total: f64 = w.iter().sum();
        let shares = if total > 0.0 {
            [w[0] / total, w[1] / total, w[2] / total]
        } else {
            trace.all_ejected += 1;
            [1.0 / 3.0; 3]
        };
        let traffic = shares.map(|s| s * offered);
        let caps = capacities(k, phase);
        let utilization = [0, 1, 2].map(|i| traffic[i] / (caps[i] * UNIT_QPS));
        trace.shares.push(shares);
        trace.utilizations.push(utilization);
        traffic_history.push(traffic);

        // At time(k + 1) the source reports, averaged over its window.
        let span = &traffic_history[traffic_history.len().saturating_sub(source.window)..];
        let observations: Vec<Observation> = (0..3)
            .map(|i| {
                // Capacity changes at an interval boundary; each interval's utilization
                // is its traffic over that interval's capacity.
                let first = k + 1 - span.len();
                let mean = |f: &dyn Fn(usize, &[f64; 3]) -> f64| {
                    span.iter()
                        .enumerate()
                        .map(|(j, t)| f(first + j, t))
                        .sum::<f64>()
                        / span.len() as f64
                };
                let u = mean(&|j, t| t[i] / (capacities(j, phase)[i] * UNIT_QPS));
                let qps = mean(&|_, t| t[i]);
                let sample = Sample {
                    utilization: measure(u),
                    qps: source.qps.then(|| measure(qps)),
                    error_rate: None,
                    at: time(k + 1),
                    window: source.tells_window.then_some(INTERVAL * span.len() as u32),
                };
                Observation::new(ADDRESSES[i], Some(sample))
            })
            .collect();
        out = weights::compute(&out.state, &observations, time(k + 1), &settings)
            .expect("valid input");
        if out
            .endpoints
            .iter()
            .any(|e| e.state == EndpointState::Ejected)
        {
            trace.ejected_intervals += 1;
        }
        if out.fleet == weights::Fleet::OutOfCapacity {
            trace.out_of_capacity += 1;
        }
        if out
            .endpoints
            .iter()
            .any(|e| e.state == EndpointState::Throttled)
        {
            trace.throttled_intervals += 1;
        }
    }
    trace
}

fn deviation(shares: &[f64; 3], target: &[f64; 3]) -> f64 {
    (0..3)
        .map(|i| (shares[i] - target[i]).abs())
        .fold(0.0, f64::max)
}

/// The shares of one phase, as they were or as a rolling mean over `smooth`
/// intervals (noise of ±`NOISE` passes straight through smoothing 1, by design; the
/// rolling mean shows where the split sits).
fn phase_shares(trace: &Trace, start: usize, smooth: usize) -> Vec<[f64; 3]> {
    (start..start + trace.phase)
        .map(|k| {
            let from = k.saturating_sub(smooth - 1).max(start);
            let n = (k + 1 - from) as f64;
            [0, 1, 2].map(|i| (from..=k).map(|j| trace.shares[j][i]).sum::<f64>() / n)
        })
        .collect()
}

/// Intervals from the start of the phase until the shares stay within `SETTLED` of
/// the capacity shares for the rest of the phase; `None` unless they do so for at
/// least the last `TAIL` intervals.
fn settle_time(shares: &[[f64; 3]], target: &[f64; 3]) -> Option<usize> {
    let last_out = shares.iter().rposition(|s| deviation(s, target) > SETTLED);
    match last_out {
        None => Some(0),
        Some(k) if k + 1 + TAIL <= shares.len() => Some(k + 1),
        Some(_) => None,
    }
}

fn rms(values: impl Iterator<Item = f64>) -> f64 {
    let (n, sum) = values.fold((0.0, 0.0), |(n, s), v| (n + 1.0, s + v * v));
    (sum / n).sqrt()
}

/// Checks one noisy phase; returns its settle time (of the 10-interval mean split).
fn check_noisy_phase(trace: &Trace, start: usize, label: &str) -> usize {
    let target = capacity_shares(start, trace.phase);
    let rolling = phase_shares(trace, start, 10);
    let settle = settle_time(&rolling, &target).unwrap_or_else(|| {
        panic!(
            "{label}: the split never settles within {SETTLED} of {target:.3?}; last: {:.3?}",
            &rolling[rolling.len() - 5..]
        )
    });
    let tail = start + trace.phase - TAIL..start + trace.phase;

    // Converged: the mean split over the tail is the capacity split.
    let mean_share =
        [0, 1, 2].map(|i| tail.clone().map(|k| trace.shares[k][i]).sum::<f64>() / TAIL as f64);
    assert!(
        deviation(&mean_share, &target) < 0.01,
        "{label}: mean shares {mean_share:.4?}, capacity shares {target:.4?}"
    );

    // Utilizations equal, within a few percent of each other.
    let mean_u = [0, 1, 2]
        .map(|i| tail.clone().map(|k| trace.utilizations[k][i]).sum::<f64>() / TAIL as f64);
    let spread = mean_u.iter().copied().fold(f64::MIN, f64::max)
        - mean_u.iter().copied().fold(f64::MAX, f64::min);
    assert!(
        spread < 0.05,
        "{label}: mean utilizations {mean_u:.3?} differ by {spread:.3}"
    );

    // Noise-sized scatter, not a swing.
    let scatter = rms(tail.clone().map(|k| deviation(&trace.shares[k], &target)));
    assert!(
        scatter < 0.02,
        "{label}: shares scatter by {scatter:.4} (rms) around the capacity split"
    );

    // No growing oscillation: interval-to-interval moves do not grow from the first
    // half of the tail to the second.
    let moves: Vec<f64> = tail
        .clone()
        .skip(1)
        .map(|k| deviation(&trace.shares[k], &trace.shares[k - 1]))
        .collect();
    let half = moves.len() / 2;
    let (early, late) = (
        rms(moves[..half].iter().copied()),
        rms(moves[half..].iter().copied()),
    );
    assert!(
        late <= 2.0 * early + 0.005,
        "{label}: share moves grow, rms {early:.4} then {late:.4}"
    );
    settle
}

/// Checks one noiseless phase; returns its settle time.
fn check_exact_phase(trace: &Trace, start: usize, label: &str) -> usize {
    let target = capacity_shares(start, trace.phase);
    let shares = phase_shares(trace, start, 1);
    let settle = settle_time(&shares, &target).unwrap_or_else(|| {
        panic!(
            "{label}: shares never settle within {SETTLED} of {target:.3?}; first: {:.3?}; last: {:.3?}",
            &shares[..30],
            &shares[shares.len() - 5..]
        )
    });
    // Exactly there at the end, with only weight rounding left.
    let end = deviation(&shares[shares.len() - 1], &target);
    assert!(end < 0.005, "{label}: ends {end:.4} off the capacity split");
    for i in 0..3 {
        // Never swings around the target: the sign of (share − target), where it is
        // more than 1 point off, changes at most once (an ejection sends a share to 0
        // and it comes back from below).
        let errors: Vec<f64> = shares
            .iter()
            .map(|s| s[i] - target[i])
            .filter(|e| e.abs() > 0.01)
            .collect();
        let flips = errors.windows(2).filter(|p| p[0] * p[1] < 0.0).count();
        assert!(
            flips <= 1,
            "{label}: backend {i} crossed its capacity share {flips} times: {:.3?}",
            &shares[..40]
        );
    }
    settle
}

#[test]
fn weights_converge_to_capacity_shares_for_every_smoothing_and_reconverge_after_a_capacity_change()
{
    println!(
        "settle time in intervals (split within {SETTLED} of the capacity split; noisy: \
         10-interval mean, noise {NOISE}); in the noisy run, intervals with an endpoint \
         Ejected, with one Throttled, and with an ejection withheld (out of capacity)"
    );
    println!("{:<28} | {:^15} | {:^15} |", "", "exact", "noisy");
    println!(
        "{:<18} {:>9} | {:>7} {:>7} | {:>7} {:>7} | {:>7} {:>9} {:>8}",
        "source",
        "smoothing",
        "1:2:4",
        "1:1:4",
        "1:2:4",
        "1:1:4",
        "ejected",
        "throttled",
        "withheld"
    );
    for source in SOURCES {
        for smoothing in SMOOTHINGS {
            let label = format!("{} smoothing {smoothing}", source.name);
            let exact = simulate(smoothing, source, false);
            let exact1 = check_exact_phase(&exact, 0, &format!("{label}, 1:2:4, no noise"));
            let exact2 = check_exact_phase(
                &exact,
                exact.phase,
                &format!("{label}, after halving, no noise"),
            );
            let noisy = simulate(smoothing, source, true);
            let noisy1 = check_noisy_phase(&noisy, 0, &format!("{label}, 1:2:4"));
            let noisy2 = check_noisy_phase(&noisy, noisy.phase, &format!("{label}, after halving"));
            assert_eq!(noisy.all_ejected, 0, "{label}: every endpoint ejected");
            println!(
                "{:<18} {smoothing:>9} | {exact1:>7} {exact2:>7} | {noisy1:>7} {noisy2:>7} | {:>7} {:>9} {:>8}",
                source.name,
                noisy.ejected_intervals,
                noisy.throttled_intervals,
                noisy.out_of_capacity
            );
        }
    }
}

#[test]
fn a_windowed_sample_that_does_not_say_its_window_makes_the_cpu_only_loop_ring() {
    // Why `Sample::window` exists: dividing a minute-averaged utilization by the split
    // of the last interval puts a delay inside the loop. With smoothing 1 the split
    // then swings for as long as the run lasts.
    let silent = Source {
        name: "cpu rate[1m], window not given",
        window: 6,
        qps: false,
        tells_window: false,
    };
    let trace = simulate(1.0, silent, false);
    let tail = trace.phase - TAIL..trace.phase;
    let smallest = tail.clone().map(|k| trace.shares[k][0]);
    let (low, high) = smallest.fold((f64::MAX, f64::MIN), |(l, h), s| (l.min(s), h.max(s)));
    assert!(
        high - low > 0.05,
        "expected the smallest backend's share to swing, saw {low:.3}..{high:.3}"
    );
    // Told the window, the same source converges (the sweep above checks it for
    // every smoothing).
    let told = simulate(1.0, SOURCES[1], false);
    check_exact_phase(&told, 0, "cpu rate[1m], window given");
}
