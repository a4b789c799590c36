#!/usr/bin/env bash
# The measuring half of bench/llm-litellm.sh. It runs as PID 1 of fresh network and PID
# namespaces (`unshare --net --pid --mount-proc --fork`): the only interface is loopback,
# and every process started here dies with this script. Do not run it on its own.
#
#   run-in-netns.sh WORK DURATION CONNECTIONS SIDECAR_BIN MOCK_BIN VENV LITELLM_SERVERS
#
# LITELLM_SERVERS: space-separated SERVER:WORKERS, SERVER one of uvicorn, gunicorn, granian.
#
# Appends one TSV row per wrk run to WORK/results.tsv:
#   target config mode connections requests seconds rps p50_ms p99_ms cpu_s errors
set -euo pipefail
work=$1 duration=$2 connections=$3 sidecar_bin=$4 mock_bin=$5 venv=$6 litellm_servers=$7
here=$(cd "$(dirname "$0")" && pwd)
results=$work/results.tsv
: >"$results"
: >"$work/idle.tsv"

# --- loopback only, or nothing runs -----------------------------------------------------
ip link set lo up
links=$(ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')
[[ $links == "lo " ]] || { echo "network namespace has more than loopback: $links" >&2; exit 1; }
[[ -z $(ip -4 route show) ]] || { echo "network namespace has IPv4 routes" >&2; exit 1; }
# The route lookup and the connect() below fail in the kernel (no route, no interface to
# send on): no packet is built. 192.0.2.1 is TEST-NET-1, reserved for documentation.
if ip route get 192.0.2.1 >/dev/null 2>&1; then echo "192.0.2.1 is routable" >&2; exit 1; fi
if timeout 2 bash -c 'exec 3<>/dev/tcp/192.0.2.1/80' 2>"$work/netcheck.err"; then
  echo "connected to 192.0.2.1" >&2; exit 1
fi
{
  echo "interfaces: $links"
  echo "IPv4 routes: none; ip route get 192.0.2.1: $(ip route get 192.0.2.1 2>&1 || true)"
  echo "connect 192.0.2.1:80: $(sed -n 's/.*: //p' "$work/netcheck.err" | tail -1)"
} >"$work/netcheck.txt"
cat "$work/netcheck.txt" >&2

MOCK=18200 TRIMTAB=18201 ADMIN=18203 LITELLM=18210
mock_key=sk-mock-provider-key
master_key=sk-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
clk=$(getconf CLK_TCK)
"$venv/bin/python" -c 'import importlib.metadata as m, sys; print("litellm", m.version("litellm"), "python", sys.version.split()[0], "uvicorn", m.version("uvicorn"))' \
  >"$work/litellm-version.txt"

# CPU seconds (user + system) of a process and all its descendants, reaped children
# included (they move into the parent's cutime/cstime).
tree_cpu() {
  local f line
  for f in /proc/[0-9]*/stat; do
    { read -r line <"$f"; } 2>/dev/null || continue
    echo "${line%% *} ${line##*) }"
  done | awk -v root="$1" -v hz="$clk" '
    { ppid[$1] = $3; t[$1] = $13 + $14 + $15 + $16 }
    END {
      tree[root] = 1; grew = 1
      while (grew) { grew = 0; for (p in ppid) if (!(p in tree) && (ppid[p] in tree)) { tree[p] = 1; grew = 1 } }
      s = 0; for (p in tree) s += t[p]; printf "%.2f\n", s / hz
    }'
}
to_ms() { awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'; }

# settle PID: wait (at most 30 s) until PID's tree is idle, using under 4% of a core over
# half a second. wrk walks away from its open requests when a run ends; a slow proxy is
# still working on them, and that work must not land in the next run.
settle() {
  local a b
  for _ in $(seq 60); do
    a=$(tree_cpu "$1"); sleep 0.5; b=$(tree_cpu "$1")
    awk -v a="$a" -v b="$b" 'BEGIN { exit !(b - a < 0.02) }' && return 0
  done
  echo "  process $1 still busy after 30 s" >&2
}

# run TARGET CONFIG MODE CONNECTIONS URL AUTH PID: one wrk run, CPU of PID's tree around it.
run() {
  local target=$1 config=$2 mode=$3 conns=$4 url=$5 auth=$6 pid=$7
  local stream=0 before after out file
  [[ $mode == stream ]] && stream=1
  file=$work/wrk-$target-$config-$mode-c$conns.txt
  settle "$pid"
  before=$(tree_cpu "$pid")
  out=$(BENCH_STREAM=$stream BENCH_AUTH=$auth wrk -t1 -c"$conns" -d"$duration" --timeout 10s --latency \
    -s "$here/post.lua" "$url")
  after=$(tree_cpu "$pid")
  echo "$out" >"$file"
  local requests seconds rps p50 p99 errors
  requests=$(awk '/ requests in / {print $1}' <<<"$out")
  seconds=$(awk '/ requests in / {sub(/s,$/, "", $4); print $4}' <<<"$out")
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p50=$(to_ms "$(awk '$1=="50%" {print $2}' <<<"$out")")
  p99=$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")
  errors=$(awk '/Non-2xx/ {n+=$NF} /Socket errors/ {gsub(/,/, ""); n+=$4+$6+$8+$10} END {print n+0}' <<<"$out")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$config" "$mode" "$conns" \
    "$requests" "$seconds" "$rps" "$p50" "$p99" "$(awk -v a="$before" -v b="$after" 'BEGIN {printf "%.2f", b-a}')" \
    "$errors" >>"$results"
  echo "  $target/$config $mode c$conns: $rps req/s, p50 $p50 ms, p99 $p99 ms, errors $errors" >&2
}

# check URL AUTH: one whole answer and one stream must come back right before measuring.
check() {
  local url=$1 auth=$2 hdr=() body
  [[ -n $auth ]] && hdr=(-H "Authorization: Bearer $auth")
  body='{"model":"gpt-4o-mini","max_tokens":64,"stream":false,"messages":[{"role":"user","content":"Say hello in twelve words."}]}'
  curl -fsS --max-time 30 "${hdr[@]}" -H 'content-type: application/json' -d "$body" "$url" | grep -q 'Hello from' \
    || { echo "no whole answer from $url" >&2; return 1; }
  curl -fsSN --max-time 30 "${hdr[@]}" -H 'content-type: application/json' -d "${body/false/true}" "$url" | grep -q '\[DONE\]' \
    || { echo "no stream from $url" >&2; return 1; }
}

# measure TARGET CONFIG URL AUTH PID: warm up, then whole and stream at the bench's
# concurrency (throughput) and at one connection (latency).
measure() {
  local target=$1 config=$2 url=$3 auth=$4 pid=$5 mode
  check "$url" "$auth"
  for mode in whole stream; do
    BENCH_STREAM=$([[ $mode == stream ]] && echo 1 || echo 0) BENCH_AUTH=$auth \
      wrk -t1 -c"$connections" -d5s --timeout 10s -s "$here/post.lua" "$url" >/dev/null
  done
  # What the target burns with no requests at all (background tasks), over 3 s.
  settle "$pid"
  local a b
  a=$(tree_cpu "$pid"); sleep 3; b=$(tree_cpu "$pid")
  printf '%s\t%s\t%s\n' "$target" "$config" "$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", b-a}')" >>"$work/idle.tsv"
  for mode in whole stream; do run "$target" "$config" "$mode" "$connections" "$url" "$auth" "$pid"; done
  for mode in whole stream; do run "$target" "$config" "$mode" 1 "$url" "$auth" "$pid"; done
}

# stop PID: SIGTERM, then SIGKILL to what is left of its tree after 20 s.
stop() {
  local pid=$1 kids
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    kids=$(ps -o pid= --ppid "$pid" || true)
    kill -9 "$pid" $kids 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

wait_for() { # URL PID SECONDS
  for _ in $(seq $(($3 * 10))); do
    kill -0 "$2" 2>/dev/null || { echo "process $2 died before $1 answered" >&2; return 1; }
    curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$1 did not answer within $3 s" >&2; return 1
}

# --- the mock provider: answers at once, needs the provider key ---------------------------
"$mock_bin" --port "$MOCK" --name mock --behaviour "{\"expectedKey\": \"$mock_key\"}" >"$work/mock.log" 2>&1 &
mock_pid=$!
wait_for "http://127.0.0.1:$MOCK/_mock/stats" "$mock_pid" 10

echo "direct to the mock" >&2
measure direct - "http://127.0.0.1:$MOCK/v1/chat/completions" "$mock_key" "$mock_pid"

# --- trimtab-sidecar ------------------------------------------------------------------------
cat >"$work/policy.yaml" <<EOF
apiVersion: trimtab.dev/v1alpha1
kind: BalancerPolicy
metadata: {name: llm-bench, namespace: default}
spec:
  clients: {podSelector: {}}
  listener: {port: $TRIMTAB, protocol: openai}
  providers:
  - name: mock
    type: openai
    baseUrl: http://127.0.0.1:$MOCK/v1
    model: gpt-4o-mini
    contextWindow: 128000
    apiKey: {env: MOCK_OPENAI_KEY}
EOF
for threads in 1 2; do
  echo "trimtab-sidecar, $threads worker thread(s)" >&2
  MOCK_OPENAI_KEY=$mock_key "$sidecar_bin" --worker-threads "$threads" --policy "$work/policy.yaml" \
    --admin-port "$ADMIN" --state-dir "$work/state" >"$work/sidecar-$threads.log" 2>&1 &
  pid=$!
  wait_for "http://127.0.0.1:$ADMIN/ready" "$pid" 20
  for _ in $(seq 100); do check "http://127.0.0.1:$TRIMTAB/v1/chat/completions" "" 2>/dev/null && break; sleep 0.1; done
  measure trimtab "$threads-thread" "http://127.0.0.1:$TRIMTAB/v1/chat/completions" "" "$pid"
  stop "$pid"
done

# --- LiteLLM proxy ---------------------------------------------------------------------------
sed "s/@MOCK@/$MOCK/" "$here/config.yaml.in" >"$work/litellm.yaml"
n=0
for server in $litellm_servers; do
  workers=${server#*:} server=${server%%:*} n=$((n + 1))
  port=$((LITELLM + n)) # a port of its own: a worker that outlived its stop cannot hold it
  case $server in
    uvicorn) flags=() ;;
    gunicorn) flags=(--run_gunicorn) ;;
    granian) flags=(--run_granian) ;;
    *) echo "unknown LiteLLM server $server" >&2; exit 1 ;;
  esac
  echo "LiteLLM proxy, $server with $workers worker(s)" >&2
  env LITELLM_MASTER_KEY="$master_key" MOCK_OPENAI_KEY="$mock_key" LITELLM_LOG=ERROR \
    LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS=True LITELLM_LOCAL_BLOG_POSTS=True \
    LITELLM_LOCAL_POLICY_TEMPLATES=True LITELLM_LOCAL_AUTOROUTER_PRESETS=True \
    LITELLM_MODEL_COST_MAP_URL=http://127.0.0.1:9/ LITELLM_ANTHROPIC_BETA_HEADERS_URL=http://127.0.0.1:9/ \
    LITELLM_BLOG_POSTS_URL=http://127.0.0.1:9/ LITELLM_AUTOROUTER_PRESETS_URL=http://127.0.0.1:9/ \
    DISABLE_ADMIN_UI=True HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 \
    "$venv/bin/litellm" --config "$work/litellm.yaml" --host 127.0.0.1 --port "$port" "${flags[@]}" \
    --num_workers "$workers" >"$work/litellm-$server-$workers.log" 2>&1 &
  pid=$!
  wait_for "http://127.0.0.1:$port/health/liveliness" "$pid" 240
  measure litellm "$server-$workers" "http://127.0.0.1:$port/v1/chat/completions" "$master_key" "$pid"
  stop "$pid"
done
stop "$mock_pid"
