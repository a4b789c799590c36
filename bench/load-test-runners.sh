#!/usr/bin/env bash
# LoadTest runners at scale (issue 7): start skew across 50 runner processes, operator
# CPU and memory while it merges their reports every 2 s, and the time from a
# criticalLoad breach to the last request at the target.
#
#   bench/load-test-runners.sh [--runners 50] [--seconds 30]
#
# Starts a test cluster (etcd, kube-apiserver, kube-controller-manager's Job and GC
# controllers), the test node agent (tests/src/node_agent.rs) running each runner Pod
# as a release trimtab-bots process, the release trimtab-operator and two shops, all on
# 127.0.0.1; every wait is bounded. About 3 minutes with the defaults. Prints Markdown
# for docs/benchmarks.md on stdout, progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q --release --locked -p trimtab-operator -p trimtab-sidecar -p shop \
  --bin trimtab-operator --bin trimtab-bots --bin shop >&2
bench=$(cargo bench --locked -p trimtab-tests --bench load_test_runners --no-run 2>&1 | tee /dev/stderr |
  sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[[ -x $bench ]] || { echo "no load_test_runners bench executable found" >&2; exit 1; }
# Run directly with CARGO=true: workspace_binary's debug build is skipped and the
# release binaries built above (next to this release executable) are used.
CARGO=true "$bench" "$@"
