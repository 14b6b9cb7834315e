#!/usr/bin/env bash
# How `kdpipe curate` grows with the number of teacher rows: synthetic rows
# (`examples/synth_teacher_rows.rs`, 4 samples an input, every rule with work to do, the
# settings of scripts/bench/curate.sh) at each size, one `kdpipe curate` each, its wall
# time and peak RSS (the whole process, from wait4's rusage). Prints one table; a
# measurement of one engine, not a comparison (curate.sh compares against Python Polars).
# TOPK=20 gives every row token top-20 soft labels (a local teacher's rows; most of their
# bytes), which curate streams from the teacher files to the splits.
#
#   [TOPK=20] scripts/bench/curate_scale.sh [MILLIONS...]     (default: 1 2 4)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/curate-bench-config.sh
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1 2 4)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kdpipe/target}"
cargo build --release --locked --bin kdpipe --example synth_teacher_rows >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "| teacher rows | top-k | teacher files MB | curate s | peak RSS MB | rows / s | rows out |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
for m in "${sizes[@]}"; do
  rm -rf "$work/runs"
  inputs=$(python3 -c "print(int($m * 1e6 / 4))")
  "$CARGO_TARGET_DIR/release/examples/synth_teacher_rows" "$inputs" 4 "$work/runs/bench" "$work/eval.jsonl" "${TOPK:-0}" >&2
  write_curate_bench_config "$work/bench.toml"
  python3 - "$CARGO_TARGET_DIR/release/kdpipe" "$work" <<'PY'
import json, os, resource, subprocess, sys, time
kdpipe, work = sys.argv[1:3]
t0 = time.monotonic()
p = subprocess.run([kdpipe, "curate", "--config", "bench.toml"], cwd=work, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, text=True)
wall = time.monotonic() - t0
if p.returncode != 0:
    sys.exit(p.stderr)
rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
r = json.load(open(os.path.join(work, "runs/bench/curate/report.json")))
gen = os.path.join(work, "runs/bench/generate")
mb = sum(os.path.getsize(os.path.join(gen, f)) for f in os.listdir(gen) if f.endswith(".parquet")) / 1e6
topk = os.environ.get("TOPK", "0")
print(f"| {r['rows_in']:,} | {topk} | {mb:,.0f} | {wall:.1f} | {rss_mb:.0f} | {r['rows_in'] / wall:,.0f} | {r['rows_out']:,} |")
PY
done
