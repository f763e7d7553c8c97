#!/usr/bin/env python3
"""Reads `perf script` output of a `perf sched record` (sched_switch, sched_waking) and, for the
threads named on the command line (tid=label), shows how their time off-CPU splits into waiting
after being woken (wake → run) and waiting after being preempted while runnable (switched out in
state R → run again), with percentiles, and which tasks ran on the CPU while they waited.

Usage: perf script -i FILE -F comm,tid,cpu,time,event,trace | sched-tail.py TID=label ..."""
import collections
import re
import sys

want = dict(a.split("=", 1) for a in sys.argv[1:])
switch = re.compile(r"prev_comm=(.*?) prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)")
waking = re.compile(r"comm=(.*?) pid=(\d+) ")
ready_at = {}  # tid -> (time, "wake" | "preempt")
waits = collections.defaultdict(lambda: collections.defaultdict(list))
switch_outs = collections.defaultdict(collections.Counter)
running = {}  # cpu -> (comm, since)
blame = collections.defaultdict(collections.Counter)
waiting_on = collections.defaultdict(dict)  # cpu -> {tid: since}

for line in sys.stdin:
    parts = line.split()
    if len(parts) < 5:
        continue
    try:
        cpu = int(parts[2].strip("[]"))
        t = float(parts[3].rstrip(":")) * 1e6
    except ValueError:
        continue
    if "sched:sched_waking" in line:
        m = waking.search(line.split("sched_waking:", 1)[1])
        if m and m.group(2) in want and m.group(2) not in ready_at:
            ready_at[m.group(2)] = (t, "wake")
    elif "sched:sched_switch" in line:
        m = switch.search(line)
        if not m:
            continue
        prev_comm, prev, state, next_comm, nxt = m.groups()
        if cpu in running:
            comm, since = running[cpu]
            for tid in want:
                if tid in ready_at and tid != prev:
                    blame[tid][comm] += t - max(since, ready_at[tid][0])
        if prev in want:
            switch_outs[prev][state.rstrip("+")] += 1
            if state.startswith("R"):
                ready_at[prev] = (t, "preempt")
        if nxt in want and nxt in ready_at:
            since, why = ready_at.pop(nxt)
            waits[nxt][why].append(t - since)
        running[cpu] = (next_comm.split("[")[0] if next_comm else "?", t)


def pct(v, q):
    return sorted(v)[min(len(v) - 1, int(len(v) * q))] if v else float("nan")


for tid, label in want.items():
    print(f"{label} (tid {tid}): switched out {dict(switch_outs[tid])}")
    for why in ("wake", "preempt"):
        v = waits[tid][why]
        print(
            f"  after {why:7s}: n={len(v):6d} total={sum(v) / 1000:8.1f} ms "
            f"p50={pct(v, .5):6.1f} p99={pct(v, .99):7.1f} p99.9={pct(v, .999):7.1f} µs, "
            f">100 µs: {sum(1 for x in v if x > 100)}"
        )
    top = ", ".join(f"{c} {us / 1000:.1f} ms" for c, us in blame[tid].most_common(5))
    print(f"  ran on its CPU while it waited: {top}")
