#!/usr/bin/env bash
# trimtab-sidecar's LLM gateway against the LiteLLM proxy (issue 4): the same mock
# provider, the same load generator, the same machine; throughput, latency and proxy CPU.
#
#   bench/llm-litellm.sh [DURATION] [CONNECTIONS]      (defaults: 10s 32)
#   LITELLM_SERVERS="uvicorn:1 uvicorn:2 gunicorn:2 granian:1"   (the default: LiteLLM's
#   server and worker count per run; the ratios are taken against the best of them)
#
# Outside any namespace: installs LiteLLM's proxy from PyPI into a cached venv (pinned by
# bench/llm-litellm/requirements.txt, wheels only, once) and builds trimtab-sidecar and
# trimtab-mock-llm (release). Then everything that runs (mock, proxies, wrk) runs inside
# fresh network and PID namespaces that have only loopback: LiteLLM cannot reach GitHub
# for its price map, nor send telemetry, even if it tried (its own switches are off too).
#
# For each target: `wrk -t1 -cCONNECTIONS -dDURATION --latency` with a POST script (whole
# answers, then SSE streams), then the same at one connection for latency; the proxy's
# CPU seconds are its process tree's utime+stime from /proc around each run. Prints
# Markdown for docs/benchmarks.md and leaves everything in target/bench/llm-litellm/.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
connections=${2:-32}
litellm_servers=${LITELLM_SERVERS:-uvicorn:1 uvicorn:2 gunicorn:2 granian:1}
work=$PWD/target/bench/llm-litellm
rm -rf "$work" && mkdir -p "$work"
[[ $(id -u) == 0 ]] || { echo "needs root (unshare --net)" >&2; exit 1; }

need() { command -v "$1" >/dev/null || { apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }; }
need wrk wrk
need curl curl
need unshare util-linux
need ip iproute2

# --- LiteLLM, once per requirements file --------------------------------------------------
reqs=$PWD/bench/llm-litellm/requirements.txt
venv=${XDG_CACHE_HOME:-$HOME/.cache}/trimtab/litellm-venv
# The lock is CPython 3.11's. Debian's interpreter comes first: statically linked, it ran
# Python code about 20% faster here than pyenv's build on a shared libpython.
python=$({ command -v /usr/bin/python3.11 python3.11 python3 || true; } | head -1)
if [[ $python == /usr/bin/python3.11 ]] && ! "$python" -c 'import ensurepip' 2>/dev/null; then
  apt-get install -y -qq python3.11-venv >/dev/null || { apt-get update -qq && apt-get install -y -qq python3.11-venv >/dev/null; }
fi
# The March 2026 LiteLLM compromise ran from a .pth file at every interpreter start: look
# before any interpreter of the venv starts. Only setuptools' own .pth belongs there.
check_pth() {
  local stray
  stray=$(find "$venv/lib" -path '*/site-packages/*.pth' ! -name distutils-precedence.pth)
  [[ -z $stray ]] || { echo "unexpected .pth files in the LiteLLM venv: $stray" >&2; exit 1; }
}
stamp="$(sha256sum "$reqs" | cut -d' ' -f1) $python"
if [[ $(cat "$venv/.trimtab-requirements" 2>/dev/null) != "$stamp" ]]; then
  echo "installing LiteLLM into $venv (with $python)" >&2
  rm -rf "$venv" && "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check pip==26.3
  "$venv/bin/pip" install -q --disable-pip-version-check --only-binary=:all: --no-deps -r "$reqs"
  check_pth
  "$venv/bin/pip" check -q >/dev/null || { "$venv/bin/pip" check >&2; exit 1; }
  echo "$stamp" >"$venv/.trimtab-requirements"
fi
check_pth

cargo build -q --release -p trimtab-sidecar --bin trimtab-sidecar
cargo build -q --release -p mock-llm --bin trimtab-mock-llm

started=$(date -u +%Y-%m-%dT%H:%MZ)
load=$(cut -d' ' -f1-3 /proc/loadavg)
unshare --net --pid --mount-proc --fork -- bash "$PWD/bench/llm-litellm/run-in-netns.sh" \
  "$work" "$duration" "$connections" "$PWD/target/release/trimtab-sidecar" \
  "$PWD/target/release/trimtab-mock-llm" "$venv" "$litellm_servers"
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ----------------------------------------------------------------------------------
report() {
  local r=$work/results.tsv
  echo "Run of $started, load average $load at the start, $load_after at the end; $(nproc) cores shared by wrk, the mock and the proxy."
  echo "trimtab $(git describe --always --dirty 2>/dev/null || echo '?'), $(cat "$work/litellm-version.txt"), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), kernel $(uname -r)."
  echo "LiteLLM servers: $litellm_servers (SERVER:WORKERS; \`litellm --num_workers WORKERS\`, with --run_gunicorn or --run_granian for those)."
  echo "Network namespace check: $(paste -sd';' "$work/netcheck.txt")."
  echo
  echo "Throughput, $connections connections, $duration per run (CPU = the proxy's process tree; for \"direct\", the mock's):"
  echo
  echo "| target | config | answer | requests/s | p50 ms | p99 ms | CPU s | requests per CPU-second | errors |"
  echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  awk -F'\t' -v c="$connections" '$4==c {
      printf "| %s | %s | %s | %.0f | %.3f | %.3f | %.2f | %s | %d |\n", $1, $2, $3, $7, $8, $9, $10,
        ($10 > 0 ? sprintf("%.0f", $5/$10) : "-"), $11 }' "$r"
  echo
  echo "Latency, 1 connection, $duration per run; added = proxy percentile minus direct percentile:"
  echo
  echo "| target | config | answer | requests/s | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU s | requests per CPU-second | errors |"
  echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  awk -F'\t' '$4==1 { if ($1=="direct") { d50[$3]=$8; d99[$3]=$9 }
      printf "| %s | %s | %s | %.0f | %.3f | %.3f | %s | %s | %.2f | %s | %d |\n", $1, $2, $3, $7, $8, $9,
        ($1=="direct" ? "-" : sprintf("%.3f", $8-d50[$3])), ($1=="direct" ? "-" : sprintf("%.3f", $9-d99[$3])),
        $10, ($10 > 0 ? sprintf("%.0f", $5/$10) : "-"), $11 }' "$r"
  echo
  echo "CPU seconds used over 3 s with no requests, after the warm-up: $(awk -F'\t' '{printf "%s%s %s %s", (NR>1 ? ", " : ""), $1, $2, $3}' "$work/idle.tsv")."
  echo
  echo "trimtab at $connections connections ÷ LiteLLM, against LiteLLM's best config for each figure (at $connections connections, and at either concurrency):"
  echo
  echo "| trimtab config | answer | requests/s ratio | requests per CPU-second ratio | requests per CPU-second ratio, LiteLLM's best at 1 or $connections connections |"
  echo "| --- | --- | ---: | ---: | ---: |"
  awk -F'\t' -v c="$connections" '$10>0 {
      if ($1=="litellm") { if ($5/$10>la[$3]) la[$3]=$5/$10; if ($4==c) { if ($7>lr[$3]) lr[$3]=$7; if ($5/$10>lc[$3]) lc[$3]=$5/$10 } }
      if ($1=="trimtab" && $4==c) { n++; k[n]=$2 SUBSEP $3; tr[n]=$7; tc[n]=$5/$10 } }
    END { for (i=1; i<=n; i++) { split(k[i], a, SUBSEP)
      printf "| %s | %s | %.1f× | **%.1f×** | %.1f× |\n", a[1], a[2], tr[i]/lr[a[2]], tc[i]/lc[a[2]], tc[i]/la[a[2]] } }' "$r"
}
report | tee "$work/report.md"
