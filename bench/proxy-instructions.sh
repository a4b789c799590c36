#!/usr/bin/env bash
# User-space instructions per proxied request, for trimtab-sidecar and for nginx: the
# figure that compares two builds (or two proxies) on a noisy machine, where requests/s
# do not (docs/benchmarks.md, "Sidecar proxy overhead").
#
#   bench/proxy-instructions.sh [SIDECAR_BINARY]      (default: target/release/trimtab-sidecar)
#   PEERS=1 bench/proxy-instructions.sh ...           (nginx too, with and without the
#                                                      forwarding fields trimtab adds)
#   CACHE_SIM=1 bench/proxy-instructions.sh ...       (also simulated cache misses and
#                                                      branch mispredictions per request)
#
# The same backend and policy as bench/proxy-overhead.sh (nginx returning a 3-byte body,
# roundRobin over one endpoint, one worker). Each proxy runs under
# `valgrind --tool=callgrind` with instrumentation off until it has answered once, then
# `wrk -t1 -c8 -d15s` drives it; instructions ÷ requests wrk completed is printed.
# nginx runs with `master_process off`, so that the measured process is its worker.
# CACHE_SIM=1 adds callgrind's cache and branch simulation (its default model: 32 KB
# L1 caches, the host's last level), which explains what instruction counts cannot:
# two proxies with equal counts can spend different time in them.
# HAProxy is not measured: it does not answer under valgrind. Kernel time is not
# counted: the proxies make the same system calls per request (docs/benchmarks.md).
# Everything on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/nginx-proxy.sh
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

BACKEND=18190 PROXY=18191 ADMIN=18192
simulate=()
[[ ${CACHE_SIM:-0} == 1 ]] && simulate=(--cache-sim=yes --branch-sim=yes)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

cat >"$work/backend.conf" <<CONF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "ok\n"; } } }
CONF
nginx -c "$work/backend.conf" -p "$work" & pids+=($!)

# measure NAME COMMAND...: runs COMMAND under callgrind on port $PROXY and prints
# NAME's instructions per request.
measure() {
  local name=$1 out="$work/callgrind.$1.out"
  shift
  valgrind --tool=callgrind "${simulate[@]}" --instr-atstart=no --callgrind-out-file="$out" "$@" \
    >"$work/$name.log" 2>&1 &
  local pid=$!
  # Under valgrind a proxy starts slowly: up to a minute for its first answer.
  for _ in $(seq 300); do curl -fsS -m 2 "http://127.0.0.1:$PROXY/" >/dev/null 2>&1 && break; sleep 0.2; done
  curl -fsS -m 5 "http://127.0.0.1:$PROXY/" >/dev/null || { echo "$name never answered" >&2; kill "$pid"; exit 1; }
  callgrind_control -i on "$pid" >/dev/null 2>&1
  local requests instructions
  requests=$(wrk -t1 -c8 -d15s "http://127.0.0.1:$PROXY/" | sed -n 's/^ *\([0-9]*\) requests in.*/\1/p')
  kill -INT "$pid"
  wait "$pid" 2>/dev/null || true
  instructions=$(callgrind_annotate "$out" 2>/dev/null |
    sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
  [[ -n $requests && $requests -gt 0 && -n $instructions ]] || { echo "no measurement of $name (see $work)" >&2; exit 1; }
  echo "$name: $requests requests, $instructions instructions, $((instructions / requests)) per request"
  [[ ${CACHE_SIM:-0} == 1 ]] || return 0
  # The totals line, in --show's order; a count of zero is printed without a share.
  callgrind_annotate --show=I1mr,D1mr,D1mw,Bcm,Bim "$out" 2>/dev/null |
    sed -n 's/^\(.*\)PROGRAM TOTALS.*/\1/p' | sed 's/([^)]*)//g; s/,//g' |
    awk -v n="$requests" -v name="$name" '{ printf "%s per request: I1 misses %.0f, D1 read misses %.0f, D1 write misses %.0f, mispredicted branches %.0f conditional + %.0f indirect\n", name, $1/n, $2/n, $3/n, $4/n, $5/n }'
}

cat >"$work/policy.yaml" <<CONF
apiVersion: trimtab.dev/v1alpha1
kind: BalancerPolicy
metadata: {name: bench, namespace: default}
spec:
  clients: {podSelector: {}}
  listener: {port: $PROXY}
  endpoints: ["127.0.0.1:$BACKEND"]
  algorithm: roundRobin
CONF
measure trimtab "$sidecar_bin" --worker-threads 1 --policy "$work/policy.yaml" \
  --admin-port "$ADMIN" --state-dir "$work/state"
# The profile of the sidecar stays where callgrind_annotate users expect it.
cp "$work/callgrind.trimtab.out" "$work/callgrind.out"

[[ ${PEERS:-0} == 1 ]] || exit 0
for forwarded in none all; do
  nginx_proxy_conf "$work/nginx-$forwarded.conf" "$work" "$PROXY" "$BACKEND" "$forwarded" \
    "master_process off;"
  measure "nginx-forwarded-$forwarded" nginx -c "$work/nginx-$forwarded.conf" -p "$work"
done
