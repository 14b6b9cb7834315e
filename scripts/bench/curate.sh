#!/usr/bin/env bash
# curate speed: kdpipe next to the same rules written with Python Polars, on the same
# 1,000,000 synthetic teacher rows (250,000 inputs × 4 samples, realistic lengths, every
# rule with work to do), on this machine, in one run.
#
#   scripts/bench/curate.sh [INPUTS] [SAMPLES]      (default 250000 4)
#
# Prints one table (wall seconds, peak RSS, rows out, each rule's removals for both) and
# writes it to bench-results/curate.md. Python Polars goes into ~/.cache/kdpipe/bench-venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
inputs="${1:-250000}"
samples="${2:-4}"
root="$(pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kdpipe/target}"
cargo build --release --locked --bin kdpipe --example synth_teacher_rows >&2
venv="$HOME/.cache/kdpipe/bench-venv"
if ! "$venv/bin/python" -c "import polars, numpy" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet polars==1.35.2 numpy==2.3.5 >&2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
"$CARGO_TARGET_DIR/release/examples/synth_teacher_rows" "$inputs" "$samples" runs/bench eval.jsonl
cat > bench.toml <<TOML
name = "bench"
[data]
inputs = ["eval.jsonl"]
input_field = "question"
[task]
kind = "numeric"
[teacher]
model = "unused"
[curate]
min_agreement = 0.5
decontaminate = ["eval.jsonl"]
[student]
model = "unused"
TOML
teacher=runs/bench/generate/teacher-00000-of-00001.parquet
echo "curate bench: kdpipe on $(( inputs * samples )) rows" >&2
/usr/bin/time -f "%e %M" -o kdpipe.time "$CARGO_TARGET_DIR/release/kdpipe" curate --config bench.toml 2>kdpipe.log
echo "curate bench: Python Polars on the same rows" >&2
/usr/bin/time -f "%e %M" -o python.time "$venv/bin/python" "$root/scripts/bench/curate_polars.py" "$teacher" eval.jsonl py-out >python.json 2>python.log

mkdir -p "$root/bench-results"
python3 - <<'PY' | tee "$root/bench-results/curate.md"
import json, os
k = json.load(open("runs/bench/curate/report.json"))
p = json.loads(open("python.json").read())
kt, km = open("kdpipe.time").read().split()
pt, pm = open("python.time").read().split()
print(f"curate on {k['rows_in']:,} teacher rows, {os.cpu_count()} cores, wall time and peak RSS of each process\n")
print("| | kdpipe | Python Polars " + p["engine"].split()[-1] + " |\n|---|---:|---:|")
print(f"| wall seconds | {float(kt):.1f} | {float(pt):.1f} |")
print(f"| peak RSS MB | {int(km) // 1024} | {int(pm) // 1024} |")
print(f"| rows out | {k['rows_out']:,} | {p['rows_out']:,} |")
for rule, n in k["removed"].items():
    print(f"| removed: {rule} | {n:,} | {p['funnel'].get(rule, 0):,} |")
print(f"\nkdpipe is {float(pt) / float(kt):.1f}× faster (near-duplicate and decontamination counts differ slightly: different hash functions)")
PY
