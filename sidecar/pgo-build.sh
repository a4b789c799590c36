#!/usr/bin/env bash
# The release build the container image ships (sidecar/Containerfile): trimtab-sidecar
# and trimtab-bots compiled with profile-guided optimisation.
#
#   sidecar/pgo-build.sh [OUT_DIR]          (default: target/pgo)
#   TRAIN_DURATION=40s sidecar/pgo-build.sh  (default: 20s of training traffic)
#
# Why: the proxy's request path crosses hyper, tokio, http and our code, many small
# functions each run once per request, and without a profile the compiler cannot tell
# the hot ones from the rest. The path then spans more code than a 32 KB instruction
# cache holds: 1.85x nginx's instruction-cache misses per request for the same
# instruction count (docs/benchmarks.md, "Sidecar proxy overhead"). With a profile the
# compiler lays the hot blocks out together, inlines by measured frequency and moves
# the cold code away.
#
# Steps:
# 1. both binaries built instrumented (-Cprofile-generate) into target/pgo-generate;
# 2. trained on the local demo's traffic, not on the overhead benchmark's (wrk sending
#    one GET through the proxy to nginx): three shop replicas of capacities 1, 2 and 4
#    behind the instrumented sidecar with the demo's cpuWeighted policy, and the
#    instrumented trimtab-bots running examples/shop-loadtest.yaml's shop flow (login,
#    browse, cart, checkout: JSON bodies, bearer tokens, load reports in ORCA headers)
#    with the demo's 400 users through it for TRAIN_DURATION. (Each replica keeps its
#    own sessions, so a cart on another replica than the login answers 401; the proxy
#    forwards those like any other answer, and the bots count them as failed checks);
# 3. the profiles merged by llvm-profdata of rustc's own LLVM version (rustup's
#    llvm-tools, or Debian's llvm-N package, installed when missing);
# 4. both binaries built with -Cprofile-use into target/pgo-use and copied to OUT_DIR.
#
# Two full release builds: 12 to 22 minutes on a 2-core machine, by how much of
# target/pgo-generate and target/pgo-use is left from the last run. Everything listens on
# 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-target/pgo}")
train_duration=${TRAIN_DURATION:-20s}
work=$PWD/target/pgo-work
rm -rf "$work" && mkdir -p "$work/profiles" "$work/state" "$out"
step() { echo "=== pgo-build: $* ($(date -u +%H:%M:%S))" >&2; }
# replace TEXT NEW: stdin to stdout with TEXT (taken literally) replaced by NEW. Fails,
# naming TEXT, when stdin no longer holds it: the example changed under the training.
replace() {
  local content
  content=$(cat)
  [[ $content == *"$1"* ]] ||
    { echo "the example no longer says '$1': update the training in sidecar/pgo-build.sh" >&2; return 1; }
  printf '%s\n' "${content/"$1"/"$2"}"
}

# --- llvm-profdata of the same LLVM major version as rustc -------------------------
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[[ -n $llvm_major ]] || { echo "cannot read rustc's LLVM version from rustc -vV" >&2; exit 1; }
profdata=""
for candidate in "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata "llvm-profdata-$llvm_major"; do
  if command -v "$candidate" >/dev/null 2>&1; then profdata=$candidate; break; fi
done
if [[ -z $profdata ]]; then
  step "installing llvm-$llvm_major for llvm-profdata"
  { apt-get install -y -qq --no-install-recommends "llvm-$llvm_major" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "llvm-$llvm_major" >/dev/null; }; } ||
    { echo "no llvm-profdata for LLVM $llvm_major: install rustup's llvm-tools component or Debian's llvm-$llvm_major" >&2; exit 1; }
  profdata=llvm-profdata-$llvm_major
fi
profdata_major=$("$profdata" --version | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p')
[[ $profdata_major == "$llvm_major" ]] ||
  { echo "$profdata is LLVM $profdata_major, rustc is LLVM $llvm_major: profiles would not match" >&2; exit 1; }

binaries=(-p trimtab-sidecar --bin trimtab-sidecar --bin trimtab-bots)

step "1/4 instrumented build"
RUSTFLAGS="-Cprofile-generate=$work/profiles" \
  cargo build --release --locked --target-dir target/pgo-generate "${binaries[@]}"
# The build scripts and proc macros just built were instrumented too, and wrote
# profiles of the build itself; the training's are the ones wanted.
rm -f "$work/profiles"/*.profraw
cargo build --release --locked -p shop --bin shop

step "2/4 training: the shop flow through the sidecar for $train_duration"
SHOPS=(18271 18272 18273) LISTENER=18274 ADMIN=18275
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
capacity=1
for port in "${SHOPS[@]}"; do
  target/release/shop --listen "127.0.0.1:$port" --capacity "$capacity" >"$work/shop-$port.log" 2>&1 &
  pids+=($!)
  capacity=$((capacity * 2))
done
# The demo's policy (examples/local-demo.yaml) and the example LoadTest's shop flow
# with the demo's workload (400 users, a short ramp), on these ports.
replace 'listener: {port: 15002}' "listener: {port: $LISTENER}" <examples/local-demo.yaml |
  replace '["127.0.0.1:18081", "127.0.0.1:18082", "127.0.0.1:18083"]' \
    "[\"127.0.0.1:${SHOPS[0]}\", \"127.0.0.1:${SHOPS[1]}\", \"127.0.0.1:${SHOPS[2]}\"]" \
    >"$work/policy.yaml"
replace 'workload: {users: 2000, rampUp: 30s, duration: 2m}' \
  "workload: {users: 400, rampUp: 2s, duration: $train_duration}" \
  <examples/shop-loadtest.yaml >"$work/loadtest.yaml"
target/pgo-generate/release/trimtab-sidecar --worker-threads 2 --policy "$work/policy.yaml" \
  --admin-port "$ADMIN" --state-dir "$work/state" >"$work/sidecar.log" 2>&1 &
sidecar_pid=$!
pids+=("$sidecar_pid")
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "${SHOPS[@]}" "$LISTENER"; do
  for _ in $(seq 100); do listening "$port" && break; sleep 0.1; done
  listening "$port" || { echo "nothing listens on 127.0.0.1:$port (logs in $work)" >&2; exit 1; }
done
target/pgo-generate/release/trimtab-bots run "$work/loadtest.yaml" \
  --target "http://127.0.0.1:$LISTENER" --duration "$train_duration" \
  --json "$work/bots.json" >"$work/bots.log" 2>&1 ||
  { echo "the training load failed (logs in $work)" >&2; exit 1; }
# The profile is written when the process exits: stop the sidecar cleanly.
kill -INT "$sidecar_pid"
wait "$sidecar_pid" || { echo "the instrumented sidecar did not exit cleanly (see $work/sidecar.log)" >&2; exit 1; }
cleanup
trap - EXIT
profiles=("$work"/profiles/*.profraw)
[[ ${#profiles[@]} -ge 2 && -e ${profiles[0]} ]] ||
  { echo "the training left ${#profiles[@]} profiles in $work/profiles, expected the sidecar's and the bots'" >&2; exit 1; }

step "3/4 merging ${#profiles[@]} profiles with $profdata"
"$profdata" merge -o "$work/merged.profdata" "${profiles[@]}"

step "4/4 optimised build"
RUSTFLAGS="-Cprofile-use=$work/merged.profdata" \
  cargo build --release --locked --target-dir target/pgo-use "${binaries[@]}"
install -m 0755 target/pgo-use/release/trimtab-sidecar target/pgo-use/release/trimtab-bots "$out/"
step "done: $out/trimtab-sidecar, $out/trimtab-bots"
