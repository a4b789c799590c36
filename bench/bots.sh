#!/usr/bin/env bash
# Bot users: memory per user, throughput per core against other load generators, and the
# raw request rate. One run, each peer measured the same way in it, reported as ratios.
#
#   bench/bots.sh [memory|throughput|raw|all] [DURATION]        (defaults: all 30s)
#
# memory      BASE_USERS (1000), then BOT_USERS (1000000) users in one trimtab-bots process
#             (bench/bots/memory.yaml), each sending GET / to nginx `return 200` and thinking
#             THINK (30s, constant), started evenly over RAMP (30s), for MEMORY_DURATION
#             (RAMP + 2 × THINK; at least RAMP + THINK + 10 s, or not every user is alive
#             at once: a user stops when its next request would fall after the end).
#             Peak RSS (VmHWM) of both, and (peak − base peak) ÷ (users − base users); also
#             the steady request rate, trimtab-bots' and nginx's CPU, the most open fds.
#             A quick run: BOT_USERS=100000 bench/bots.sh memory. The offered rate is
#             users ÷ THINK (and users ÷ RAMP while ramping): 33,333/s for the default million,
#             more than two cores can generate and serve; at a rate the machine sustains:
#             THINK=150s RAMP=150s MEMORY_DURATION=310s bench/bots.sh memory
# throughput  the shop flow login → browse → add to cart → checkout without think time
#             (bench/bots/shop-throughput.yaml, bench/bots/locustfile.py, bench/goose) with
#             USERS (64) users for DURATION: trimtab-bots, Locust FastHttpUser and Goose, one
#             at a time, each alone on core GEN_CORE (1), against a fresh shop (release, no
#             service time, unlimited stock) alone on core SERVER_CORE (0). Requests are
#             counted by the shop itself (shop_requests_total, by route and status) over the
#             steady window, and CPU time from /proc, so every tool is measured the same way.
# raw         GET / against nginx `return 200` (one worker on SERVER_CORE) with CONNECTIONS
#             (64) users/connections for DURATION: trimtab-bots (bench/bots/raw.yaml) vs oha,
#             both on GEN_CORE; requests counted by nginx's stub_status.
#
# k6 is not run: the workplace's package list marks go.k6.io/k6 "not-to-use" (AGPL).
# Everything listens on and sends to 127.0.0.1 only, and every run ends by itself.
# oha, Goose and Locust are built once into target/bench (in parallel with the rest of
# the build); later runs reuse them. Prints Markdown tables for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
duration=${2:-30s}
case $part in memory | throughput | raw | all) ;; *)
  echo "usage: bench/bots.sh [memory|throughput|raw|all] [DURATION]" >&2
  exit 2
  ;;
esac
secs=${duration%s}
[[ $secs =~ ^[0-9]+$ && $secs -ge 10 ]] || { echo "DURATION: whole seconds, at least 10s (e.g. 30s)" >&2; exit 2; }
bot_users=${BOT_USERS:-1000000}
base_users=${BASE_USERS:-1000}
users=${USERS:-64}
connections=${CONNECTIONS:-64}
server_core=${SERVER_CORE:-0}
gen_core=${GEN_CORE:-1}
think=${THINK:-30s} ramp=${RAMP:-30s} # the memory users' think time and ramp-up
think=${think%s} ramp=${ramp%s}
# A user stops once its next request would fall after the end, so every user is alive at
# once only while the run lasts at least ramp + think: default ramp + 2 × think.
mem_secs=${MEMORY_DURATION:-$((ramp + 2 * think))s}
mem_secs=${mem_secs%s}

OHA_VERSION=1.16.0
LOCUST_VERSION=2.47.0
SHOP=18280 NGINX=18380
bench=$PWD/target/bench
work=$bench/bots/$part
rm -rf "$work" && mkdir -p "$work" "$bench/bin"
clk=$(getconf CLK_TCK)

need() { command -v "$1" >/dev/null || { apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }; }
need nginx nginx
need curl curl
need taskset util-linux
# A million users may hold thousands of pooled connections.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"

pids=() builds=()
cleanup() {
  for p in "${pids[@]}" "${builds[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# --- builds: the peers in the background, trimtab-bots and the shop in the foreground ---
oha_bin=$bench/bin/oha
goose_bin=$bench/goose/release/shop-goose
locust_bin=$bench/locust-venv/bin/locust
declare -A build_pid
if [[ $part == raw || $part == all ]] && [[ ! -x $oha_bin ]]; then
  CARGO_TARGET_DIR=$bench/oha-build cargo install -q oha --locked --version "$OHA_VERSION" --root "$bench" \
    >"$work/build-oha.log" 2>&1 &
  build_pid[oha]=$! builds+=($!)
fi
if [[ $part == throughput || $part == all ]]; then
  # Incremental: a no-op when bench/goose has not changed.
  cargo build -q --release --locked --manifest-path bench/goose/Cargo.toml --target-dir "$bench/goose" \
    >"$work/build-goose.log" 2>&1 &
  build_pid[goose]=$! builds+=($!)
  if [[ ! -x $locust_bin ]]; then
    (python3 -m venv "$bench/locust-venv" && "$bench/locust-venv/bin/pip" install -q "locust==$LOCUST_VERSION") \
      >"$work/build-locust.log" 2>&1 &
    build_pid[locust]=$! builds+=($!)
  fi
fi
cargo build -q --release -p trimtab-sidecar --bin trimtab-bots
if [[ $part == throughput || $part == all ]]; then cargo build -q --release -p shop --bin shop; fi
bots_bin=$PWD/target/release/trimtab-bots
shop_bin=$PWD/target/release/shop
for name in "${!build_pid[@]}"; do
  wait "${build_pid[$name]}" || { echo "building $name failed: see $work/build-$name.log" >&2; tail -20 "$work/build-$name.log" >&2; exit 1; }
done
builds=()

# --- helpers ------------------------------------------------------------------------
now() { date +%s.%N; }
# CPU seconds (user + system, all threads) of a live process; fields 14 and 15 of stat.
cpu() { sed 's/^.*) //' "/proc/$1/stat" | awk -v t="$clk" '{ printf "%.2f", ($12 + $13) / t }'; }
alive() { kill -0 "$1" 2>/dev/null; }
wait_http() { # url
  for _ in $(seq 100); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "$1 never answered" >&2
  exit 1
}
# A LoadTest with its `users` replaced.
with_users() { sed -E "s/users: [0-9]+/users: $2/" "$1"; }

cat >"$work/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/nginx.err warn;
worker_rlimit_nofile $(ulimit -n);
events { worker_connections 65536; }
http { access_log off; keepalive_requests 10000000; keepalive_timeout 120s;
  server { listen 127.0.0.1:$NGINX backlog=65535;
    location = /nginx-status { stub_status; }
    location / { return 200 "ok\n"; } } }
EOF
start_nginx() {
  taskset -c "$server_core" nginx -c "$work/nginx.conf" -p "$work" &
  nginx_pid=$! pids+=($!)
  wait_http "http://127.0.0.1:$NGINX/"
  nginx_worker=$(pgrep -P "$nginx_pid" | head -1)
}
nginx_requests() { curl -fsS "http://127.0.0.1:$NGINX/nginx-status" | awk 'NR == 3 { print $3 }'; }

echo "# bench/bots.sh $part ${secs}s — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r)"
echo "trimtab-bots: $("$bots_bin" --version); $(nginx -v 2>&1)"
echo

# --- memory -------------------------------------------------------------------------
# Runs `n` users; sets mem_result to
# "peak_kb rss_after_ramp_kb steady_rps p99 failures requests max_fds cpu_cores nginx_cores".
memory_run() {
  local n=$1 name=mem-$1
  with_users bench/bots/memory.yaml "$n" | sed -E "s/mean: [0-9]+s/mean: ${think}s/; s/rampUp: [0-9]+s/rampUp: ${ramp}s/" \
    >"$work/$name.yaml"
  "$bots_bin" run "$work/$name.yaml" --target "http://127.0.0.1:$NGINX" --duration "${mem_secs}s" \
    --json "$work/$name.json" >"$work/$name.out" 2>&1 &
  local pid=$! peak=0 ramp_rss=0 r0=0 t0=0 c0=0 n0=0 r1=0 t1=0 c1=0 n1=0 fds=0 start
  pids+=($pid)
  start=$(date +%s)
  while alive "$pid"; do
    local hwm rss el f
    hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    f=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    ((f > fds)) && fds=$f
    [[ -n $hwm ]] && peak=$hwm
    el=$(($(date +%s) - start))
    if ((el >= ramp + 1)) && [[ $ramp_rss == 0 && -n $rss ]]; then ramp_rss=$rss; fi
    # The steady rate and CPU: from 5 s after the ramp to 5 s before the end.
    if ((el >= ramp + 5)) && [[ $t0 == 0 ]]; then r0=$(nginx_requests) c0=$(cpu "$pid") n0=$(cpu "$nginx_worker") t0=$(now); fi
    if ((el >= mem_secs - 5)) && [[ $t1 == 0 ]]; then r1=$(nginx_requests) c1=$(cpu "$pid") n1=$(cpu "$nginx_worker") t1=$(now); fi
    sleep 1
  done
  wait "$pid" || { echo "trimtab-bots with $n users failed:" >&2; tail -20 "$work/$name.out" >&2; exit 1; }
  local rps cores ncores p99 failures requests
  rps=$(awk -v a="$r0" -v b="$r1" -v s="$t0" -v e="$t1" 'BEGIN { printf "%.0f", (e > s ? (b - a) / (e - s) : 0) }')
  cores=$(awk -v a="$c0" -v b="$c1" -v s="$t0" -v e="$t1" 'BEGIN { printf "%.2f", (e > s ? (b - a) / (e - s) : 0) }')
  ncores=$(awk -v a="$n0" -v b="$n1" -v s="$t0" -v e="$t1" 'BEGIN { printf "%.2f", (e > s ? (b - a) / (e - s) : 0) }')
  p99=$(awk '$1 == "all" { print $6 }' "$work/$name.out")
  failures=$(awk '$1 == "all" { print $3 }' "$work/$name.out")
  requests=$(awk '$1 == "all" { print $2 }' "$work/$name.out")
  mem_result="$peak $ramp_rss $rps $p99 $failures $requests $fds $cores $ncores"
}

if [[ $part == memory || $part == all ]]; then
  ((mem_secs >= ramp + think + 10)) || { echo "MEMORY_DURATION: at least RAMP + THINK + 10 s = $((ramp + think + 10))s" >&2; exit 2; }
  start_nginx
  t=$(date +%s)
  memory_run "$base_users"
  read -r b_peak b_ramp b_rps b_p99 b_fail b_req b_fds b_cpu b_ncpu <<<"$mem_result"
  memory_run "$bot_users"
  read -r m_peak m_ramp m_rps m_p99 m_fail m_req m_fds m_cpu m_ncpu <<<"$mem_result"
  kill "$nginx_pid" 2>/dev/null || true
  wait "$nginx_pid" 2>/dev/null || true
  echo "## Memory: users thinking ${think} s (constant) between GET / to nginx, started over ${ramp} s, ${mem_secs} s run ($(($(date +%s) - t)) s)"
  echo
  echo "| users | peak RSS (VmHWM) | RSS at end of ramp | steady requests/s (offered) | trimtab-bots CPU (cores) | nginx CPU (cores) | open fds (max) | requests | failures | p99 |"
  echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for row in "$base_users $b_peak $b_ramp $b_rps $b_cpu $b_ncpu $b_fds $b_req $b_fail $b_p99" \
    "$bot_users $m_peak $m_ramp $m_rps $m_cpu $m_ncpu $m_fds $m_req $m_fail $m_p99"; do
    read -r n peak rr rps c nc fds req fail p99 <<<"$row"
    awk -v n="$n" -v p="$peak" -v r="$rr" -v s="$rps" -v c="$c" -v nc="$nc" -v fd="$fds" -v q="$req" -v f="$fail" -v l="$p99" -v th="$think" \
      'BEGIN { printf "| %d | %.1f MB | %.1f MB | %d (%.0f) | %.2f | %.2f | %d | %d | %d | %s |\n", n, p / 1024, r / 1024, s, n / th, c, nc, fd, q, f, l }'
  done
  echo
  awk -v n="$bot_users" -v b="$base_users" -v p="$m_peak" -v q="$b_peak" 'BEGIN {
    printf "bytes per user: %.0f (peak − base peak) ÷ (users − base users); %.0f all-in (peak ÷ users); fixed overhead %.1f MB\n",
      (p - q) * 1024 / (n - b), p * 1024 / n, q / 1024 }'
  echo
fi

# --- throughput -----------------------------------------------------------------------
warm=$((secs / 6 > 5 ? secs / 6 : 5))
window=$((secs - warm - 3))
shop_url=http://127.0.0.1:$SHOP
start_shop() {
  RUST_LOG=warn taskset -c "$server_core" "$shop_bin" --listen "127.0.0.1:$SHOP" --service-time 0 \
    --base-workers 100000 --initial-stock 1000000000000000 >"$work/shop-$1.log" 2>&1 &
  shop_pid=$! pids+=($!)
  wait_http "$shop_url/healthz"
}
stop_shop() { kill "$shop_pid" 2>/dev/null || true; wait "$shop_pid" 2>/dev/null || true; }
# route/status deltas of shop_requests_total between two scrapes: "route status count".
shop_delta() {
  awk 'function key(s) { gsub(/^shop_requests_total\{|\}$/, "", s); gsub(/[a-z]+="/, "", s); gsub(/"/, "", s); sub(/,/, " ", s); return s }
       FNR == NR { if ($1 ~ /^shop_requests_total\{/) before[$1] = $2; next }
       $1 ~ /^shop_requests_total\{/ && $2 - before[$1] > 0 { print key($1), $2 - before[$1] }' "$1" "$2"
}
# Measures a running tool over the steady window; sets result[name] to
# "requests/s checkouts/s non2xx_share tool_cpu shop_cpu logins browses carts".
measure() { # name pid
  local name=$1 pid=$2 c0 s0 t0 c1 s1 t1
  sleep "$warm"
  alive "$pid" || { echo "$name exited early:" >&2; tail -20 "$work/$name.out" >&2; exit 1; }
  curl -fsS "$shop_url/metrics" >"$work/$name.m0"
  c0=$(cpu "$pid") s0=$(cpu "$shop_pid") t0=$(now)
  sleep "$window"
  alive "$pid" || { echo "$name exited before the window ended:" >&2; tail -20 "$work/$name.out" >&2; exit 1; }
  curl -fsS "$shop_url/metrics" >"$work/$name.m1"
  c1=$(cpu "$pid") s1=$(cpu "$shop_pid") t1=$(now)
  shop_delta "$work/$name.m0" "$work/$name.m1" >"$work/$name.delta"
  result[$name]=$(awk -v c0="$c0" -v c1="$c1" -v s0="$s0" -v s1="$s1" -v t0="$t0" -v t1="$t1" '
    BEGIN { c = c1 - c0; s = s1 - s0; t = t1 - t0 }
    $1 == "metrics" { next } # our own scrapes
    { all += $3; if ($2 !~ /^2/) bad += $3; if ($2 ~ /^2/) n[$1] += $3 }
    END { printf "%.0f %.0f %.4f %.3f %.3f %d %d %d\n", all / t, n["checkout"] / t, (all ? bad / all : 1),
          c / t, s / t, n["login"], n["products"], n["cart"] }' "$work/$name.delta")
}
run_tool() { # name command... (started pinned to gen_core)
  local name=$1
  shift
  start_shop "$name"
  taskset -c "$gen_core" "$@" >"$work/$name.out" 2>&1 &
  local pid=$!
  pids+=($pid)
  measure "$name" "$pid"
  wait "$pid" || true # Locust and Goose exit non-zero when any request failed; the shop's counts judge.
  stop_shop
}

declare -A result
if [[ $part == throughput || $part == all ]]; then
  with_users bench/bots/shop-throughput.yaml "$users" >"$work/shop.yaml"
  t=$(date +%s)
  run_tool trimtab-bots "$bots_bin" run "$work/shop.yaml" --target "$shop_url" --duration "${secs}s" --json "$work/trimtab-bots.json"
  run_tool locust "$locust_bin" -f bench/bots/locustfile.py --headless -u "$users" -r "$users" -t "${secs}s" \
    -H "$shop_url" --only-summary --loglevel WARNING --stop-timeout 1
  run_tool goose "$goose_bin" -H "$shop_url" -u "$users" -r "$users" -t "${secs}s" --no-gzip \
    --report-file "$work/goose.json"
  echo "## Throughput: the shop flow, $users users, ${secs} s each (window ${window} s after ${warm} s), tool on core $gen_core, shop on core $server_core ($(($(date +%s) - t)) s)"
  echo "Locust $LOCUST_VERSION (FastHttpUser), Goose $("$goose_bin" --version 2>/dev/null | awk '{ print $NF }')"
  echo
  echo "| tool | requests/s | checkouts/s | logins / browses / carts (2xx) | non-2xx | tool CPU (cores) | requests per CPU-second | shop CPU (cores) | trimtab ÷ tool, requests/s | trimtab ÷ tool, per CPU-second |"
  echo "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  read -r t_rps _ _ t_cpu _ <<<"${result[trimtab-bots]}"
  for name in trimtab-bots locust goose; do
    read -r rps co bad cpu scpu li br ca <<<"${result[$name]}"
    awk -v n="$name" -v r="$rps" -v co="$co" -v b="$bad" -v c="$cpu" -v s="$scpu" -v li="$li" -v br="$br" -v ca="$ca" \
      -v tr="$t_rps" -v tc="$t_cpu" 'BEGIN { pc = c > 0 ? r / c : 0; tpc = tc > 0 ? tr / tc : 0
        printf "| %s | %.0f | %.0f | %d / %d / %d | %.2f%% | %.2f | %.0f | %.2f | %.2f | %.2f |\n",
          n, r, co, li, br, ca, b * 100, c, pc, s, (r ? tr / r : 0), (pc ? tpc / pc : 0) }'
  done
  echo
fi

# --- raw --------------------------------------------------------------------------------
if [[ $part == raw || $part == all ]]; then
  start_nginx
  with_users bench/bots/raw.yaml "$connections" >"$work/raw.yaml"
  raw_run() { # name command...; sets raw_result to "requests/s cpu_cores nginx_cores"
    local name=$1 pid c0 t0 r0 n0 c1 t1 r1 n1
    shift
    taskset -c "$gen_core" "$@" >"$work/$name.out" 2>&1 &
    pid=$! pids+=($!)
    sleep "$warm"
    alive "$pid" || { echo "$name exited early:" >&2; tail -20 "$work/$name.out" >&2; exit 1; }
    r0=$(nginx_requests) c0=$(cpu "$pid") n0=$(cpu "$nginx_worker") t0=$(now)
    sleep "$window"
    alive "$pid" || { echo "$name exited before the window ended:" >&2; tail -20 "$work/$name.out" >&2; exit 1; }
    r1=$(nginx_requests) c1=$(cpu "$pid") n1=$(cpu "$nginx_worker") t1=$(now)
    wait "$pid" || true
    raw_result=$(echo "$r0 $r1 $c0 $c1 $t0 $t1 $n0 $n1" |
      awk '{ t = $6 - $5; printf "%.0f %.3f %.3f\n", ($2 - $1 - 1) / t, ($4 - $3) / t, ($8 - $7) / t }')
  }
  t=$(date +%s)
  raw_run trimtab-bots-raw "$bots_bin" run "$work/raw.yaml" --target "http://127.0.0.1:$NGINX" --duration "${secs}s"
  read -r b_rps b_cpu b_ncpu <<<"$raw_result"
  raw_run oha "$oha_bin" -c "$connections" -z "${secs}s" --no-tui "http://127.0.0.1:$NGINX/"
  read -r o_rps o_cpu o_ncpu <<<"$raw_result"
  b_fail=$(awk '$1 == "all" { print $3 }' "$work/trimtab-bots-raw.out")
  o_codes=$(awk '/Status code distribution/ { on = 1; next } on && NF == 0 { exit } on { $1 = $1; printf "%s%s", (n++ ? ", " : ""), $0 }' "$work/oha.out")
  echo "## Raw: GET / to nginx \`return 200\` (1 worker, core $server_core), $connections connections, ${secs} s each, generator on core $gen_core ($(($(date +%s) - t)) s)"
  echo "oha $OHA_VERSION"
  echo
  echo "| tool | requests/s | generator CPU (cores) | requests per CPU-second | ÷ oha, requests/s | ÷ oha, per CPU-second | nginx CPU (cores) | failures / status codes |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
  awk -v r="$b_rps" -v c="$b_cpu" -v or="$o_rps" -v oc="$o_cpu" -v n="$b_ncpu" -v f="$b_fail" \
    'BEGIN { printf "| trimtab-bots | %.0f | %.2f | %.0f | %.2f | %.2f | %.2f | %s failed |\n", r, c, r / c, r / or, (r / c) / (or / oc), n, f }'
  awk -v r="$o_rps" -v c="$o_cpu" -v n="$o_ncpu" -v codes="$o_codes" \
    'BEGIN { printf "| oha | %.0f | %.2f | %.0f | 1.00 | 1.00 | %.2f | %s |\n", r, c, r / c, n, codes }'
  echo
fi
echo "logs and raw outputs: $work"
