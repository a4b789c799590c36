#!/usr/bin/env bash
# Fuzzes one of the sidecar's parsers with libFuzzer, seeded from seeds/TARGET:
#
#   sidecar/fuzz/run.sh policy_file|sidecar_config|headers|upstream_response [SECONDS]   (default 60)
#
# Needs the nightly toolchain (sanitizers) and installs cargo-fuzz if it is missing.
# Crashes land in sidecar/fuzz/artifacts/TARGET/; the corpus grows in corpus/TARGET/.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: run.sh policy_file|sidecar_config|headers|upstream_response [SECONDS]}
seconds=${2:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
mkdir -p "corpus/$target"
cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
  -max_total_time="$seconds" -max_len=65536
