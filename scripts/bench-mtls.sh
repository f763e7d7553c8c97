#!/usr/bin/env bash
# Pod on node-a → pod on node-b (two network namespaces joined by an underlay veth):
# iperf3 single stream and sequential new connections/s, direct (routed, no daemons) vs through
# both daemons' mTLS tunnel (port 15008, HTTP/2 CONNECT). Release build; needs root, iperf3,
# ip and nft. ROUNDS (default 3) and SECONDS (default 5) per measurement.
# Last line: mtls_throughput_ratio=<ours/direct> conn_rate_ratio=<ours/direct>.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build -q --release -p nodeproxy --bin nodeproxy -p nodeproxy-tests --bin bench-mtls
target_dir=$(cargo metadata -q --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
NODEPROXY_BIN="$target_dir/release/nodeproxy" exec "$target_dir/release/bench-mtls"
