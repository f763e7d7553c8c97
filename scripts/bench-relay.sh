#!/usr/bin/env bash
# iperf3 single stream pod → pod: direct vs through nodeproxy (plain TCP relay), in one run.
# Release build; needs root. ROUNDS (default 3) and SECONDS (default 5) per measurement.
# Last line: relay_throughput_ratio=<ours/direct>.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build -q --release -p nodeproxy --bin nodeproxy -p nodeproxy-tests --bin bench-relay
target_dir=$(cargo metadata -q --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
NODEPROXY_BIN="$target_dir/release/nodeproxy" exec "$target_dir/release/bench-relay"
