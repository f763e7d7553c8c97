#!/usr/bin/env bash
# The noisy neighbour: victim tenant A's ping-pong p99 and new-connection rate through nodeproxy,
# alone and while tenant B pushes iperf3 -P 4 through the same daemon; isolation on and off.
# Release build; needs root. SECONDS (default 5) per measurement, ROUNDS (default 5).
# TENANT_WEIGHT=N gives both tenants a TenantPolicy weight N (default 100; pods have 1024
# shares, and flat tenant groups get N x 4 x 10.24, so N=25 weighs a relay like one pod); DAEMON_WEIGHT
# (default 200) is the daemon's own group; TENANT_GROUPS=nested puts the tenant groups under the
# daemon's group (cgroup v1; flat beside the pods by default); MODES=per-tenant skips the shared
# mode. NEIGHBOUR=storm makes B a connection storm (STORM_CLIENTS, default 4, parallel clients
# connecting as fast as they can) instead of iperf3. NODEPROXY_NO_TENANT_LISTENERS=1 (read by
# the daemon) sends every connection through the shared accept thread, for comparison.
# Each round prints the hypervisor's steal; a run whose rounds lose over 5 % says to run again.
# IDLE=poll keeps idle CPUs polling (/dev/cpu_dma_latency held at 0) so the alone baseline is
# not inflated by idle vCPU wake-ups; the default, IDLE=halt, leaves the node's setting.
# scripts/trace-fairness-tail.sh shows where the victim's tail comes from.
# Last line: victim_p99_ratio=… victim_conn_rate_ratio=… off_p99_ratio=… off_conn_rate_ratio=…
# control_p99_ratio=… control_conn_rate_ratio=… (a pod pair outside the mesh: the kernel alone).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build -q --release -p nodeproxy --bin nodeproxy -p nodeproxy-tests --bin bench-fairness
target_dir=$(cargo metadata -q --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
NODEPROXY_BIN="$target_dir/release/nodeproxy" exec "$target_dir/release/bench-fairness"
