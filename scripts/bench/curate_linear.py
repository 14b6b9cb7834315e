#!/usr/bin/env python3
"""Does curate's time grow linearly with the rows, on a machine whose speed drifts?

One binary curates two sizes of synthetic rows in turn: a slot of small runs, a large run,
another slot of small runs, and so on, ending with a slot of small runs. Each large run is
compared with the small runs just before and after it (their median time a row), so a
drift of the machine's speed over the hour a 100M run set takes falls on both sides of each
ratio. A ratio of 1.00 is linear growth; the summary gives the median ratio over the large
runs and their range (a range holding 1.00 is a tie with linear).

The folders are those `curate_scale.sh` leaves in ROWS_CACHE (bench.toml, runs/bench):

    ROWS_CACHE=~/benchrows scripts/bench/curate_scale.sh 10 100    # once, to make the rows
    scripts/bench/curate_linear.py BINARY ~/benchrows/10M-topk0 ~/benchrows/100M-topk0 [LARGE_RUNS] [SMALL_PER_SLOT]

Defaults: 3 large runs, 2 small runs a slot. Progress on stderr, the tables on stdout.
"""
import collections
import json
import os
import statistics
import subprocess
import sys
import time

Run = collections.namedtuple("Run", "wall cpu rows_in rows_out")


def curate(binary, folder, kept):
    """One `kdpipe curate` in `folder`: wall and CPU seconds (user + system, from the
    children's times once it is reaped), rows in and out. `kept` holds each folder's rows
    out, which must not change from one run to the next."""
    before, t0 = os.times(), time.monotonic()
    p = subprocess.run([binary, "curate", "--config", "bench.toml"], cwd=folder,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall, after = time.monotonic() - t0, os.times()
    if p.returncode != 0:
        sys.exit(f"curate failed in {folder}:\n{p.stderr}")
    report = json.load(open(os.path.join(folder, "runs/bench/curate/report.json")))
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    run = Run(wall, cpu, report["rows_in"], report["rows_out"])
    kept.setdefault(folder, run.rows_out)
    if kept[folder] != run.rows_out:
        sys.exit(f"{folder}: {run.rows_out:,} rows out, {kept[folder]:,} in an earlier run")
    print(f"curate_linear: {folder}: {run.wall:.1f} s, {run.cpu:.1f} CPU s, "
          f"{run.rows_in:,} rows in, {run.rows_out:,} out", file=sys.stderr, flush=True)
    return run


def main():
    if len(sys.argv) not in (4, 5, 6):
        sys.exit(__doc__)
    binary, small, large = sys.argv[1:4]
    large_runs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    per_slot = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    for folder in (small, large):
        if not os.path.exists(os.path.join(folder, "bench.toml")):
            sys.exit(f"{folder}/bench.toml is missing: make the rows with "
                     "ROWS_CACHE=… scripts/bench/curate_scale.sh first")
    kept = {}
    slots = [[curate(binary, small, kept) for _ in range(per_slot)]]
    larges = []
    for _ in range(large_runs):
        larges.append(curate(binary, large, kept))
        slots.append([curate(binary, small, kept) for _ in range(per_slot)])

    def per_row(runs, key):
        return statistics.median(getattr(r, key) / r.rows_in * 1e6 for r in runs)

    print("| large run | small runs before, s | large run, s | small runs after, s "
          "| µs a row, small (median of both slots) | µs a row, large | × (wall) | × (CPU) |")
    print("|---:|---|---:|---|---:|---:|---:|---:|")
    ratios = {"wall": [], "cpu": []}
    for i, run in enumerate(larges):
        around = slots[i] + slots[i + 1]
        for key in ratios:
            ratios[key].append(per_row([run], key) / per_row(around, key))
        print(f"| {i + 1} | {', '.join(f'{r.wall:.1f}' for r in slots[i])} | {run.wall:.1f} | "
              f"{', '.join(f'{r.wall:.1f}' for r in slots[i + 1])} | {per_row(around, 'wall'):.2f} | "
              f"{per_row([run], 'wall'):.2f} | {ratios['wall'][-1]:.2f} | {ratios['cpu'][-1]:.2f} |")
    print()
    rows = (larges[0].rows_in, slots[0][0].rows_in)
    for key, name in (("wall", "wall time"), ("cpu", "CPU time")):
        r = ratios[key]
        if len(r) < 2:
            verdict = "one large run, no range: no verdict"
        elif min(r) <= 1.0 <= max(r):
            verdict = "a tie with linear"
        else:
            verdict = "above linear" if min(r) > 1.0 else "below linear"
        print(f"{name} a row, {rows[0]:,} rows against {rows[1]:,}: ×{statistics.median(r):.2f} "
              f"(range {min(r):.2f}–{max(r):.2f} over {len(r)} large runs): {verdict}")


if __name__ == "__main__":
    main()
