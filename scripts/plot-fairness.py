#!/usr/bin/env python3
"""Draws a fairness benchmark run: each pair's p99 and connection rate, alone and beside B.

Usage: scripts/plot-fairness.py OUT_DIR/rounds.csv OUT.png [TITLE]
(rounds.csv is what bench-fairness writes with OUT_DIR set; scripts/bench-fairness.sh calls
this for you.) One dot per round, a bar at the (upper) median; the figure above each "with B" bar is
its median over the same pair's median alone, as bench-fairness computes it.
"""

import csv
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

PAIRS = ["outside the mesh", "per-tenant", "shared"]
LABELS = {
    "outside the mesh": "outside the mesh\n(no proxy)",
    "per-tenant": "nodeproxy\nisolation on",
    "shared": "nodeproxy\nisolation off",
}
PHASES = [("alone", "#8fb8de"), ("with B", "#d9534f")]


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    rows = list(csv.DictReader(open(sys.argv[1], newline="")))
    if not rows:
        sys.exit(f"{sys.argv[1]}: no rounds in it; did the benchmark run?")
    pairs = [p for p in PAIRS if any(r["pair"] == p for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title, log in [
        (axes[0], "p99_us", "ping-pong p99 (µs, log scale)", True),
        (axes[1], "conn_per_s", "new connections per second", False),
    ]:
        for i, pair in enumerate(pairs):
            medians, noisy_top = {}, 0.0
            for j, (phase, colour) in enumerate(PHASES):
                values = [float(r[key]) for r in rows if r["pair"] == pair and r["phase"] == phase]
                if not values:
                    continue
                x = i * 3 + j
                # The upper median, as bench-fairness takes it, so the ratios match its own.
                medians[phase] = statistics.median_high(values)
                if phase == "with B":
                    noisy_top = max(values)
                ax.bar(x, medians[phase], color=colour, width=0.8,
                       label=phase if i == 0 else None)
                ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
            if len(medians) == 2:
                ratio = medians["with B"] / medians["alone"]
                ax.annotate(f"×{ratio:.2f}", (i * 3 + 1, noisy_top),
                            ha="center", va="bottom", fontsize=9, weight="bold",
                            xytext=(0, 4), textcoords="offset points")
        ax.set_xticks([i * 3 + 0.5 for i in range(len(pairs))])
        ax.set_xticklabels([LABELS[p] for p in pairs])
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        # Room above the tallest dot for its ratio.
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * (1.4 if log else 1.08))
        ax.legend()
    fig.suptitle(sys.argv[3] if len(sys.argv) > 3 else "noisy neighbour: tenant B runs iperf3 -P 4")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    print(f"plot: {sys.argv[2]}", file=sys.stderr)


if __name__ == "__main__":
    main()
