#!/bin/bash
# tests/kube/stop.sh [all|apiserver] — stop what tests/kube/start.sh started in $RUN (by pid).
set -uo pipefail
WHAT=${1:-all}
: "${RUN:?set RUN to the run directory}"
procs=apiserver
[ "$WHAT" = all ] && procs="apiserver etcd"
for p in $procs; do
  f="$RUN/$p.pid"
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$f"
done
exit 0
