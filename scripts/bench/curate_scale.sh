#!/usr/bin/env bash
# How `kdpipe curate` grows with the number of teacher rows: synthetic rows
# (`examples/synth_teacher_rows.rs`, 4 samples an input, every rule with work to do, the
# settings of scripts/bench/curate.sh) at each size, `kdpipe curate` on them, its wall
# time and peak RSS (the whole process, from wait4's rusage). Prints one table.
#
# TOPK=20 gives every row token top-20 soft labels (a local teacher's rows; most of their
# bytes). BASELINE=/path/to/an/older/kdpipe runs that binary too, interleaved with this
# one on the same rows, REPS times each (default 1): the same-run comparison for a change
# to curate. Medians, with the range in brackets when REPS > 1.
#
#   [TOPK=20] [BASELINE=…] [REPS=3] scripts/bench/curate_scale.sh [MILLIONS...]  (default: 1 2 4)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/curate-bench-config.sh
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1 2 4)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kdpipe/target}"
cargo build --release --locked --bin kdpipe --example synth_teacher_rows >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "| binary | teacher rows | top-k | teacher files MB | curate s | peak RSS MB | rows / s | rows out |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for m in "${sizes[@]}"; do
  rm -rf "$work/runs"
  inputs=$(python3 -c "print(int($m * 1e6 / 4))")
  "$CARGO_TARGET_DIR/release/examples/synth_teacher_rows" "$inputs" 4 "$work/runs/bench" "$work/eval.jsonl" "${TOPK:-0}" >&2
  write_curate_bench_config "$work/bench.toml"
  python3 - "$CARGO_TARGET_DIR/release/kdpipe" "$work" "${BASELINE:-}" "${REPS:-1}" "${TOPK:-0}" <<'PY'
import json, os, resource, statistics, subprocess, sys, time
current, work, baseline, reps, topk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
sides = [("this", current)] + ([("baseline", baseline)] if baseline else [])
runs = {name: [] for name, _ in sides}
rows_out = set()


def curate(binary):
    """Wall seconds and peak RSS (MB, from wait4's rusage of this one child)."""
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "curate", "--config", "bench.toml"], cwd=work,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    if status != 0:
        sys.exit(err.decode())
    out = json.load(open(os.path.join(work, "runs/bench/curate/report.json")))
    rows_out.add((out["rows_out"], json.dumps(out["splits"], sort_keys=True)))
    if len(rows_out) > 1:
        sys.exit(f"the binaries kept different rows: {rows_out}")
    return wall, usage.ru_maxrss / 1024


for rep in range(reps):
    for name, binary in (sides if rep % 2 == 0 else sides[::-1]):
        runs[name].append(curate(binary))

r = json.load(open(os.path.join(work, "runs/bench/curate/report.json")))
gen = os.path.join(work, "runs/bench/generate")
mb = sum(os.path.getsize(os.path.join(gen, f)) for f in os.listdir(gen) if f.endswith(".parquet")) / 1e6


def shown(values, digits):
    med = statistics.median(values)
    spread = f" ({min(values):,.{digits}f}–{max(values):,.{digits}f})" if len(values) > 1 else ""
    return med, f"{med:,.{digits}f}{spread}"


for name, _ in sides:
    wall, wall_text = shown([w for w, _ in runs[name]], 1)
    _, rss_text = shown([m for _, m in runs[name]], 0)
    print(f"| {name} | {r['rows_in']:,} | {topk} | {mb:,.0f} | {wall_text} | {rss_text} | "
          f"{r['rows_in'] / wall:,.0f} | {r['rows_out']:,} |", flush=True)
PY
done
