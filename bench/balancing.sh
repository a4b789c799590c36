#!/usr/bin/env bash
# Balancing quality and reaction of trimtab-sidecar's six algorithms, in one process:
# three shops of capacities 1:2:4 (worker slots × service time, utilization reported in
# ORCA headers) behind an in-process sidecar, bot users offering 70% of the total
# capacity as an open model (Poisson arrivals, latency from the intended start).
#
#   bench/balancing.sh [ARGS...]        (about 5 minutes with the defaults)
#
# quality   per algorithm, fresh shops and sidecar: 20 s warm-up, 15 s measured; rate,
#           p50/p99/p99.9, errors, each shop's share of the requests and utilization,
#           when the split reached 1:2:4, p99 ÷ roundRobin and ÷ weightedRoundRobin with
#           the oracle weights 1:2:4.
# reaction  cpuWeighted and peakEwma: after 20 s the capacity-4 shop is halved, 12 s
#           more; when its share settles (±5% of its final share), in seconds and in
#           update periods (weighting.interval, 1 s here), and the overshoot.
#           Halving the capacity-4 shop at 70% leaves 98% of the remaining capacity
#           offered; `--reaction-shop 1` (1:1:4, 82%) and `--load 0.5` (70% after the
#           cut) react in a regime that is not saturated.
#
# ARGS go to the benchmark (sidecar/benches/balancing.rs), e.g. `--part reaction`,
# `--only cpuWeighted`, `--weighting 'smoothing: 0.6'`, `--trace`;
# `bench/balancing.sh --help` lists them.
# Everything listens on and sends to 127.0.0.1 only, and every run ends by itself.
# Prints Markdown tables for docs/benchmarks.md on stdout, progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

# Build first, so the compiler's output does not mix with the tables.
cargo bench -q -p trimtab-sidecar --bench balancing --no-run >&2
echo "# bench/balancing.sh${*:+ $*} — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
cargo bench -q -p trimtab-sidecar --bench balancing -- "$@"
