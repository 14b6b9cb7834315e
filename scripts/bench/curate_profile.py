#!/usr/bin/env python3
"""Where does curate's time a row grow between two sizes? One `perf record` of one curate
at each size (CPU-clock samples, so it works in a VM without hardware counters), cut into
curate's passes by the `seconds a pass:` line of its stderr, and for each pass the samples
a row at both sizes and the functions whose samples grew more than the rows did.

    scripts/bench/curate_profile.py BINARY ~/benchrows/10M-topk0 ~/benchrows/100M-topk0 \\
        [--freq 499] [--top 12] [--reuse]

The folders are those `curate_linear.py` takes (bench.toml, runs/bench). Each pass's window
is laid back from the last sample (split files last, then near-duplicate clusters, then the
head rules; the partition is the rest, with the start-up), so a window's edges are off by
the seconds between a pass's end and the next line's clock, a fraction of a second.

A function's "excess" is its samples at the large size less its samples at the small size
times the ratio of the rows: what the large run spent in it beyond linear growth. One run
a size: a profile says where the time went, not whether a difference is more than the
machine's run-to-run spread (curate_linear.py measures that).

Progress on stderr, the tables on stdout. Needs `perf` (linux-perf).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

from curate_linear import pass_seconds

PASSES = ["partition", "head rules", "near-duplicate clusters", "split files"]
SAMPLE = re.compile(r"\s*[\d.]+%\s+(\d+)\s+\[.\]\s+(.*)")


def record(binary, folder, freq, reuse):
    """One profiled curate in `folder`: the perf data's path, its stderr, its rows in."""
    data = os.path.join(folder, "curate_profile.perf")
    log = os.path.join(folder, "curate_profile.stderr")
    if not (reuse and os.path.exists(data) and os.path.exists(log)):
        print(f"curate_profile: perf record of curate in {folder}", file=sys.stderr)
        with open(log, "w") as stderr:
            done = subprocess.run(["perf", "record", "-q", "-F", str(freq), "-e", "cpu-clock", "-o", data, "--",
                                   os.path.abspath(binary), "curate", "--config", "bench.toml"],
                                  cwd=folder, stderr=stderr)
        if done.returncode != 0:
            sys.exit(f"curate_profile: the profiled curate in {folder} failed (exit {done.returncode}): see {log}")
    rows_in = json.load(open(os.path.join(folder, "runs/bench/curate/report.json")))["rows_in"]
    return data, open(log).read(), rows_in


def last_sample_time(data):
    out = subprocess.run(["perf", "script", "-i", data, "-F", "time"], capture_output=True, text=True,
                         check=True).stdout
    if not out.split():
        sys.exit(f"curate_profile: {data} holds no samples")
    return float(out.split()[-1].rstrip(":"))


def windows(data, stderr):
    """Each pass's (start, end) in perf's clock, laid back from the last sample."""
    seconds = pass_seconds(stderr)
    if not all(f"pass {p} s" in seconds for p in PASSES):
        sys.exit(f"curate_profile: no `seconds a pass:` line with {PASSES} in {data}'s stderr "
                 "(a kdpipe that prints it, and a run in more than one part, are needed)")
    end = last_sample_time(data) + 1e-3
    spans = {}
    for name in reversed(PASSES[1:]):
        start = end - seconds[f"pass {name} s"]
        spans[name] = (start, end)
        end = start
    spans[PASSES[0]] = (0.0, end)
    return spans


def samples_by_function(data, span):
    out = subprocess.run(["perf", "report", "-i", data, "--sort", "sym", "--stdio", "-n",
                          "--time", f"{span[0]:.6f},{span[1]:.6f}"], capture_output=True, text=True,
                         check=True).stdout
    counts = {}
    for line in out.splitlines():
        m = SAMPLE.match(line)
        if m:
            counts[m.group(2).strip()] = counts.get(m.group(2).strip(), 0) + int(m.group(1))
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary")
    parser.add_argument("small", help="folder of the smaller size's rows")
    parser.add_argument("large", help="folder of the larger size's rows")
    parser.add_argument("--freq", type=int, default=499, help="samples a second a CPU")
    parser.add_argument("--top", type=int, default=12, help="functions shown a pass")
    parser.add_argument("--reuse", action="store_true", help="use a folder's earlier profile if it has one")
    args = parser.parse_args()
    for folder in (args.small, args.large):
        if not os.path.exists(os.path.join(folder, "bench.toml")):
            sys.exit(f"{folder}/bench.toml is missing: make the rows with "
                     "ROWS_CACHE=… scripts/bench/curate_scale.sh first")
    if shutil.which("perf") is None:
        sys.exit("curate_profile: perf is not installed (apt-get install linux-perf)")
    runs = [record(args.binary, folder, args.freq, args.reuse) for folder in (args.small, args.large)]
    (small_data, small_log, small_rows), (large_data, large_log, large_rows) = runs
    scale = large_rows / small_rows
    small_spans, large_spans = windows(small_data, small_log), windows(large_data, large_log)
    print(f"{large_rows:,} rows against {small_rows:,}; samples at {args.freq} Hz a CPU; "
          f"× is the large run's samples a row over the small run's\n")
    print("| pass | samples, small | samples, large | × a row |")
    print("|---|---:|---:|---:|")
    tables = []
    for name in PASSES:
        small = samples_by_function(small_data, small_spans[name])
        large = samples_by_function(large_data, large_spans[name])
        total_small, total_large = sum(small.values()), sum(large.values())
        print(f"| {name} | {total_small:,} | {total_large:,} | "
              f"{total_large / max(total_small, 1) / scale:.2f} |")
        excess = sorted(((large.get(f, 0) - scale * small.get(f, 0), f) for f in set(small) | set(large)),
                        reverse=True)
        lines = [f"\n{name}: the functions with the most samples beyond linear growth\n",
                 "| excess samples | small | large | × a row | function |", "|---:|---:|---:|---:|---|"]
        for extra, function in excess[:args.top]:
            n_small, n_large = small.get(function, 0), large.get(function, 0)
            ratio = f"{n_large / n_small / scale:.2f}" if n_small else "new"
            lines.append(f"| {extra:,.0f} | {n_small:,} | {n_large:,} | {ratio} | `{function[:100]}` |")
        tables.append("\n".join(lines))
    print("\n".join(tables))


if __name__ == "__main__":
    main()
