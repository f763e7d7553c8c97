#!/usr/bin/env bash
# Where the victim's tail comes from: one per-tenant round of the fairness benchmark (release
# build, root, perf), with `perf sched record` on all CPUs during the victim's ping-pong beside
# the bulk tenant. Prints, for the victim's three threads (client pod, its tenant's pool thread,
# server pod) and the bulk tenant's pool thread, how long each waited after a wake-up and after
# being preempted while runnable, and what ran on its CPU meanwhile (scripts/sched-tail.py).
# MEASURE_SECONDS (default 10) per measurement; OUT (default a temp dir) keeps the trace.
# PHASE=conn traces the victim's new-connection phase instead (its conn-rate client and pool).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
cargo build -q --release -p nodeproxy --bin nodeproxy -p nodeproxy-tests --bin bench-fairness
target_dir=$(cargo metadata -q --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
out=${OUT:-$(mktemp -d)}
secs=${MEASURE_SECONDS:-10}  # not SECONDS: bash sets that itself
phase=${PHASE:-pingpong}
case $phase in
  pingpong) victim_client="sockperf pp --tcp -i 10.200.2.2" victim_server="sockperf sr" ;;
  # The echo server answers on a thread per port: no single thread to follow.
  conn) victim_client="bench-fairness conn-rate" victim_server="" ;;
  *) echo "PHASE=$phase: give pingpong (default) or conn" >&2; exit 1 ;;
esac
MODES=per-tenant ROUNDS=1 SECONDS=$secs NODEPROXY_BIN="$target_dir/release/nodeproxy" \
  "$target_dir/release/bench-fairness" >"$out/bench.log" 2>&1 &
bench=$!
# The victim's phase with B runs while `iperf3 -c` and the victim's client both do.
until pgrep -f "iperf3 -c" >/dev/null && pgrep -f "$victim_client" >/dev/null; do
  kill -0 $bench 2>/dev/null || { cat "$out/bench.log"; exit 1; }
  sleep 0.05
done
sleep 2
# A tenant's pool thread: the thread named np-pool-* in its CPU group (cgroup v1 here; v2 nests
# the tenant groups under the daemon's).
group() {
  local tid
  for tid in $(cat /sys/fs/cgroup/cpu/npbench-$bench/nodeproxy-*"$1"/tasks \
    /sys/fs/cgroup/npbench-$bench/daemon/nodeproxy-*"$1"/cgroup.threads 2>/dev/null || true); do
    case $(cat /proc/*/task/"$tid"/comm 2>/dev/null) in np-pool-*) echo "$tid"; return ;; esac
  done
}
victim_pool=$(group victim)
bulk_pool=$(group bulk)
client=$(pgrep -f "$victim_client" | head -1)
server=
[ -n "$victim_server" ] && server="$(pgrep -o -f "$victim_server")=victim-server"  # pod 2's: the oldest
perf sched record -a -o "$out/sched.data" -- sleep 3 >/dev/null 2>&1
wait $bench
grep -E "with B|alone|ratio" "$out/bench.log"
perf script -i "$out/sched.data" -F comm,tid,cpu,time,event,trace 2>/dev/null |
  scripts/sched-tail.py "$victim_pool=victim-pool" "$client=victim-client" ${server:+"$server"} "$bulk_pool=bulk-pool"
echo "trace: $out/sched.data"
