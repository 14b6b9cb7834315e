#!/usr/bin/env bash
# curate speed: kdpipe next to the same rules in Python Polars at its best (newest Polars,
# lazy plans, streaming engine; scripts/bench/curate_polars.py), on the same 1,000,000
# synthetic teacher rows (250,000 inputs × 4 samples, realistic lengths, every rule with
# work to do), each side 3 times interleaved (scripts/bench/curate.py, harness.py).
# Writes bench-results/curate.md. Python Polars goes into ~/.cache/kdpipe/bench-venv.
#
#   scripts/bench/curate.sh [INPUTS] [SAMPLES] [--reps 3] [--allow-load]   (default 250000 4)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/curate-bench-config.sh
given="$*"
inputs=250000
samples=4
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then inputs="$1"; shift; fi
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then samples="$1"; shift; fi
root="$(pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kdpipe/target}"
cargo build --release --locked --bin kdpipe --example synth_teacher_rows >&2
venv="$HOME/.cache/kdpipe/bench-venv"
polars_version=2.1.0
if ! "$venv/bin/python" -c "import polars; assert polars.__version__ == '$polars_version'" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "polars==$polars_version" >&2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$CARGO_TARGET_DIR/release/examples/synth_teacher_rows" "$inputs" "$samples" "$work/runs/bench" "$work/eval.jsonl"
# Every setting spelled out (curate-bench-config.sh): curate_polars.py gets the same values.
write_curate_bench_config "$work/bench.toml"
mkdir -p bench-results
KDPIPE_BENCH_ARGS="$given" python3 scripts/bench/curate.py --kdpipe "$CARGO_TARGET_DIR/release/kdpipe" --py "$venv/bin/python" \
  --work "$work" "$@"
