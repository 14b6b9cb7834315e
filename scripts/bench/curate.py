"""The curate benchmark behind scripts/bench/curate.sh: kdpipe's `curate` against the same
rules in Python Polars at its best (curate_polars.py), on the same synthetic teacher rows
with the same settings; each side --reps times, interleaved (harness.py). Wall time is
the whole process (reading the Parquet file, every rule, writing the splits)."""
import argparse
import json
import os
import sys

import harness

p = argparse.ArgumentParser()
p.add_argument("--kdpipe", required=True)
p.add_argument("--py", required=True, help="python with polars")
p.add_argument("--work", required=True, help="folder holding bench.toml, eval.jsonl and runs/bench/generate")
p.add_argument("--out", default="bench-results/curate.md")
harness.add_arguments(p)
a = p.parse_args()
root = os.getcwd()
bench = harness.Bench(a, "curate bench")
teacher = os.path.join(a.work, "runs/bench/generate/teacher-00000-of-00001.parquet")
anchor = [a.py, os.path.join(root, "scripts/bench/curate_polars.py"), teacher, os.path.join(a.work, "eval.jsonl"),
          os.path.join(a.work, "py-out"), "--min-agreement", "0.5", "--near-dup", "0.8", "--shingle", "3",
          "--ngram", "13", "--seed", "0", "--split", "0.8,0.1,0.1"]


def kdpipe_report(_lines):
    report = json.load(open(os.path.join(a.work, "runs/bench/curate/report.json")))
    return {"rows_in": report["rows_in"], "rows_out": report["rows_out"],
            "funnel": {s["rule"]: s["removed"] for s in report["funnel"]}}


for rep in range(a.reps):
    # `kdpipe curate` always curates from scratch (only `kdpipe run` skips finished stages).
    bench.run("kdpipe", rep, [a.kdpipe, "curate", "--config", "bench.toml"], cwd=a.work,
              parse=lambda lines: kdpipe_report(lines))
    bench.run("Python Polars", rep, anchor)

k, py = bench.results["kdpipe"][-1], bench.results["Python Polars"][-1]
lines = [
    "# curate speed: kdpipe vs Python Polars\n",
    f"{k['rows_in']:,} synthetic teacher rows (`examples/synth_teacher_rows.rs`), {os.cpu_count()} cores; "
    f"wall time and peak RSS of each whole process. Anchor: {py['engine']} at its best (`scripts/bench/curate_polars.py`: "
    "lazy plans with the default streaming engine, distinct inputs normalized once, integer n-gram hashes, "
    f"LSH banding by grouping on band hashes). {a.reps} runs a side, interleaved.\n",
    "Command: `scripts/bench/curate.sh" + harness.command_args() + "`\n",
    harness.median_range_header() + "\n",
    "| | kdpipe | Python Polars |",
    "|---|---:|---:|",
    f"| wall seconds | {bench.cell('kdpipe', 'wall_s', 2)} | {bench.cell('Python Polars', 'wall_s', 2)} |",
    f"| peak RSS MiB | {bench.cell('kdpipe', 'peak_rss_mb', 0)} | {bench.cell('Python Polars', 'peak_rss_mb', 0)} |",
    f"| rows out | {k['rows_out']:,} | {py['rows_out']:,} |",
]
for rule, n in k["funnel"].items():
    lines.append(f"| removed: {rule} | {n:,} | {py['funnel'].get(rule, 0):,} |")
lines += [
    "",
    f"kdpipe / Python Polars, wall time: {bench.ratio('kdpipe', 'Python Polars', 'wall_s', higher_is_better=False)} "
    f"(Polars' seconds over kdpipe's: above 1 means kdpipe is faster); peak RSS: "
    f"{bench.ratio('kdpipe', 'Python Polars', 'peak_rss_mb', higher_is_better=False)}.",
    "",
    "Near-duplicate and contamination counts differ slightly: the two use different hash functions "
    "(MinHash estimates and n-gram hashes).",
    "",
    bench.load_note(),
    "",
]
bench.write(a.out, "\n".join(lines))
