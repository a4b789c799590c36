#!/usr/bin/env bash
# Weight propagation at scale (issue 5): 1,000 BalancerPolicies × 10 static endpoints,
# 2,000 subscribed sidecars, the real trimtab-operator against a real kube-apiserver.
#
#   bench/propagation.sh [--policies 1000] [--samples 200] [--spacing-ms 300] [--concurrency 16]
#
# Starts a test cluster (etcd + kube-apiserver, tests/src/cluster.rs), creates 2 pods per
# policy (objects only) and a pod-bound TokenRequest token for each, starts the release
# trimtab-operator, runs one in-process long-poll subscriber per pod over HTTPS, creates
# the policies (cpuWeighted, loadReports, interval 1s), then posts, per sampled policy, a
# load report with every endpoint idle and 0.5 s later one making endpoint 0 four times
# busier than the others, and measures the time from that second report until both of
# that policy's subscribers hold weights that reflect it. Also reports
# reconcile throughput from the operator's /metrics and its RSS (VmRSS, VmHWM).
# Everything on 127.0.0.1; every loop is bounded (first configs: 300 s at most;
# propagation: 60 s after the last report). About 4 minutes with the defaults today.
# Prints Markdown tables for docs/benchmarks.md on stdout, progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

# 2,000 subscribers hold 2,000 sockets here and 2,000 in the operator (which inherits this).
[[ $(ulimit -n) == unlimited || $(ulimit -n) -ge 8192 ]] || ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# Build first, so the compiler's output does not mix with the tables. The operator is
# measured in release mode: the bench runs target/release/trimtab-operator.
cargo build -q --release --locked -p trimtab-operator --bin trimtab-operator >&2
bench=$(cargo bench --locked -p trimtab-tests --bench propagation --no-run 2>&1 | tee /dev/stderr |
  sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[[ -x $bench ]] || { echo "no propagation bench executable found" >&2; exit 1; }
echo "# bench/propagation.sh${*:+ $*} — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
# The executable is run directly, not through `cargo bench`: OperatorProcess::start calls
# `$CARGO build -p trimtab-operator` (the debug profile) before it takes the binary next
# to this release executable, i.e. the release build made above. CARGO=true skips that
# unused debug build, which takes minutes when the debug tree is stale.
CARGO=true "$bench" "$@"
