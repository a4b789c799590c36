#!/usr/bin/env bash
# User-space instructions per proxied request: the figure that compares two builds of
# the sidecar on a noisy machine, where requests/s do not (docs/benchmarks.md, "Sidecar
# proxy overhead").
#
#   bench/proxy-instructions.sh [SIDECAR_BINARY]      (default: target/release/trimtab-sidecar)
#
# The same backend and policy as bench/proxy-overhead.sh (nginx returning a 3-byte body,
# roundRobin over one endpoint, one worker thread). The sidecar runs under
# `valgrind --tool=callgrind` with instrumentation off until it has answered once, then
# `wrk -t1 -c8 -d15s` drives it; instructions ÷ requests wrk completed is printed.
# Everything on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$PWD/target/bench/proxy-instructions
rm -rf "$work" && mkdir -p "$work/state"

need() { command -v "$1" >/dev/null || { apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }; }
need nginx nginx
need wrk wrk
need valgrind valgrind
if [[ $# -ge 1 ]]; then
  sidecar_bin=$1
else
  cargo build -q --release -p trimtab-sidecar --bin trimtab-sidecar
  sidecar_bin=$PWD/target/release/trimtab-sidecar
fi

BACKEND=18190 TRIMTAB=18191 ADMIN=18192
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

cat >"$work/backend.conf" <<EOF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "ok\n"; } } }
EOF
nginx -c "$work/backend.conf" -p "$work" & pids+=($!)

cat >"$work/policy.yaml" <<EOF
apiVersion: trimtab.dev/v1alpha1
kind: BalancerPolicy
metadata: {name: bench, namespace: default}
spec:
  clients: {podSelector: {}}
  listener: {port: $TRIMTAB}
  endpoints: ["127.0.0.1:$BACKEND"]
  algorithm: roundRobin
EOF
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.out" \
  "$sidecar_bin" --worker-threads 1 --policy "$work/policy.yaml" --admin-port "$ADMIN" \
  --state-dir "$work/state" >"$work/sidecar.log" 2>&1 &
sidecar_pid=$!
pids+=("$sidecar_pid")

# Under valgrind the sidecar starts slowly: up to a minute for its first answer.
for _ in $(seq 300); do curl -fsS "http://127.0.0.1:$TRIMTAB/" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "http://127.0.0.1:$TRIMTAB/" >/dev/null || { echo "the sidecar never answered" >&2; exit 1; }
callgrind_control -i on "$sidecar_pid" >/dev/null 2>&1
requests=$(wrk -t1 -c8 -d15s "http://127.0.0.1:$TRIMTAB/" | sed -n 's/^ *\([0-9]*\) requests in.*/\1/p')
kill -INT "$sidecar_pid"
wait "$sidecar_pid" 2>/dev/null || true
instructions=$(callgrind_annotate "$work/callgrind.out" 2>/dev/null |
  sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
[[ -n $requests && $requests -gt 0 && -n $instructions ]] || { echo "no measurement (see $work)" >&2; exit 1; }
echo "$sidecar_bin: $requests requests, $instructions instructions, $((instructions / requests)) per request"
