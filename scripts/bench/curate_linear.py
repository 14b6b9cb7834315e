#!/usr/bin/env python3
"""Does curate's time grow linearly with the rows, on a machine whose speed drifts?

One binary curates two sizes of synthetic rows in turn: a slot of small runs, a large run,
another slot of small runs, and so on, ending with a slot of small runs. Each large run is
compared with the small runs just before and after it (their median time a row), so a
drift of the machine's speed over the hour a 100M run set takes falls on both sides of each
ratio. A ratio of 1.00 is linear growth; the summary gives the median ratio over the large
runs and their range (a range holding 1.00 is a tie with linear). Runs go through
harness.py's `Bench`: wall, CPU (user + system) and peak RSS from wait4, and a run that
starts while another job uses the CPUs fails the benchmark unless --allow-load.

The folders are those `curate_scale.sh` leaves in ROWS_CACHE (bench.toml, runs/bench):

    ROWS_CACHE=~/benchrows scripts/bench/curate_scale.sh 10 100    # once, to make the rows
    scripts/bench/curate_linear.py BINARY ~/benchrows/10M-topk0 ~/benchrows/100M-topk0 \\
        [--large-runs 3] [--small-per-slot 2]

On a VM that drops idle page cache (this one runs a DAMON pageout scheme), copy the folders'
bench.toml, eval.jsonl and runs/bench/generate to tmpfs (/dev/shm) to measure curate's own
work without the disk. Curate's `seconds a pass:` line (from its stderr) gives a second
table: each pass's µs a row at both sizes.

Progress on stderr, the tables on stdout.
"""
import argparse
import json
import os
import re
import statistics
import sys

import harness


def pass_seconds(stderr):
    """Each pass's seconds from curate's `seconds a pass:` line (kdpipe versions before it
    have none: then no pass table), as metrics named `pass <name> s`."""
    line = next((l for l in stderr.splitlines() if "seconds a pass:" in l), None)
    if line is None:
        return {}
    found = re.findall(r"([a-z -]+?) ([0-9.]+)(?:,|$)", line.split("seconds a pass:", 1)[1])
    return {f"pass {name.strip()} s": float(seconds) for name, seconds in found}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary")
    parser.add_argument("small", help="folder of the smaller size's rows")
    parser.add_argument("large", help="folder of the larger size's rows")
    parser.add_argument("--large-runs", type=int, default=3)
    parser.add_argument("--small-per-slot", type=int, default=2)
    harness.add_arguments(parser)
    args = parser.parse_args()
    for folder in (args.small, args.large):
        if not os.path.exists(os.path.join(folder, "bench.toml")):
            sys.exit(f"{folder}/bench.toml is missing: make the rows with "
                     "ROWS_CACHE=… scripts/bench/curate_scale.sh first")
    args.reps = args.large_runs
    bench = harness.Bench(args, "curate_linear")
    kept = {}

    def curate(folder, rep):
        """One `kdpipe curate` in `folder`, with its rows in and out from the report and
        each pass's seconds from its stderr; a folder's rows out must not change from one
        run to the next."""
        log_path = os.path.join(folder, "curate_linear.stderr")

        def report(_lines):
            out = json.load(open(os.path.join(folder, "runs/bench/curate/report.json")))
            metrics = {"rows_in": out["rows_in"], "rows_out": out["rows_out"]}
            metrics.update(pass_seconds(open(log_path).read()))
            return metrics

        with open(log_path, "w") as log:
            run = bench.run(folder, rep, [args.binary, "curate", "--config", "bench.toml"], cwd=folder,
                            parse=report, stderr=log)
        kept.setdefault(folder, run["rows_out"])
        if kept[folder] != run["rows_out"]:
            sys.exit(f"{folder}: {run['rows_out']:,} rows out, {kept[folder]:,} in an earlier run")
        return run

    slots = [[curate(args.small, 0) for _ in range(args.small_per_slot)]]
    larges = []
    for rep in range(args.large_runs):
        larges.append(curate(args.large, rep))
        slots.append([curate(args.small, rep) for _ in range(args.small_per_slot)])

    def per_row(runs, key):
        return statistics.median(r[key] / r["rows_in"] * 1e6 for r in runs)

    def seconds(runs):
        return ", ".join(f"{r['wall_s']:.1f}" for r in runs)

    lines = ["| large run | small runs before, s | large run, s | small runs after, s "
             "| µs a row, small (median of both slots) | µs a row, large | × (wall) | × (CPU) "
             "| peak RSS MiB, small (max) | peak RSS MiB, large |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    ratios = {"wall_s": [], "cpu_s": []}
    # The small runs each large run is compared with: the slots just before and after it.
    arounds = [slots[i] + slots[i + 1] for i in range(len(larges))]
    for i, (run, around) in enumerate(zip(larges, arounds)):
        for key in ratios:
            ratios[key].append(per_row([run], key) / per_row(around, key))
        lines.append(
            f"| {i + 1} | {seconds(slots[i])} | {run['wall_s']:.1f} | {seconds(slots[i + 1])} | "
            f"{per_row(around, 'wall_s'):.2f} | {per_row([run], 'wall_s'):.2f} | "
            f"{ratios['wall_s'][-1]:.2f} | {ratios['cpu_s'][-1]:.2f} | "
            f"{max(r['peak_rss_mb'] for r in around):,} | {run['peak_rss_mb']:,} |")
    lines.append("")
    passes = [k for k in larges[0] if k.startswith("pass ")]
    if passes:
        lines += ["Each pass, µs a row (large runs against the median of their small runs):", "",
                  "| pass | " + " | ".join(f"large run {i + 1}" for i in range(len(larges))) + " |",
                  "|---|" + "---:|" * len(larges)]
        for key in passes:
            cells = []
            for run, around in zip(larges, arounds):
                small, large = per_row(around, key), per_row([run], key)
                cells.append(f"{small:.3f} → {large:.3f} (×{large / small:.2f})")
            lines.append(f"| {key[5:-2]} | " + " | ".join(cells) + " |")
        lines.append("")
    rows = (larges[0]["rows_in"], slots[0][0]["rows_in"])
    for key, name in (("wall_s", "wall time"), ("cpu_s", "CPU time")):
        r = ratios[key]
        if len(r) < 2:
            verdict = "one large run, no range: no verdict"
        elif min(r) <= 1.0 <= max(r):
            verdict = "a tie with linear"
        else:
            verdict = "above linear" if min(r) > 1.0 else "below linear"
        lines.append(f"{name} a row, {rows[0]:,} rows against {rows[1]:,}: ×{statistics.median(r):.2f} "
                     f"(range {min(r):.2f}–{max(r):.2f} over {len(r)} large runs): {verdict}")
    lines += ["", bench.load_note()]
    print("\n".join(lines))
    if bench.busy_runs() and not args.allow_load:
        sys.exit("curate_linear: some runs started while another job was using the CPUs: rerun on a quiet "
                 "machine, or pass --allow-load")


if __name__ == "__main__":
    main()
