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
# Rounds and summary go to OUT_DIR (default under the cargo target dir), with fairness.png,
# a plot of every round (its path goes to stderr: the last line of stdout stays the figures).
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
# Every round goes to $OUT_DIR/rounds.csv, drawn into $OUT_DIR/fairness.png at the end.
export OUT_DIR="${OUT_DIR:-$target_dir/bench-fairness/$(date +%Y%m%d-%H%M%S)}"
# The plot needs matplotlib: python3's own, or Debian's for the system python.
plot_py=""
for py in python3 /usr/bin/python3; do
  if "$py" -c 'import matplotlib' 2>/dev/null; then plot_py=$py; break; fi
done
if [ -z "$plot_py" ]; then
  echo "installing python3-matplotlib (for the plot)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-matplotlib >/dev/null; } \
    && plot_py=/usr/bin/python3 || echo "python3-matplotlib did not install: the run will have no plot" >&2
fi
mkdir -p "$OUT_DIR"
NODEPROXY_BIN="$target_dir/release/nodeproxy" "$target_dir/release/bench-fairness" | tee "$OUT_DIR/summary.txt"
if [ -n "$plot_py" ]; then
  "$plot_py" scripts/plot-fairness.py "$OUT_DIR/rounds.csv" "$OUT_DIR/fairness.png" \
    "noisy neighbour: tenant B runs ${NEIGHBOUR:-bulk} beside victim A (IDLE=${IDLE:-halt}, $(nproc) CPUs)" >&2 \
    || echo "the plot failed; the figures are in $OUT_DIR" >&2
fi
