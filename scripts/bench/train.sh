#!/usr/bin/env bash
# Student training speed: kdpipe next to PyTorch + transformers on CPU, in one run, on the
# same SmolLM2-135M weights, batch 4 × seq 256, the same number of steps, in full
# fine-tuning and in LoRA (rank 16, every linear layer of the blocks), each in f32 and in
# bf16 mixed precision (kdpipe `[finetune] precision = "bf16"`, PyTorch CPU autocast; both
# keep f32 master weights). Prints tokens/s and peak RSS of each process and writes the
# table to bench-results/train.md. The bf16 rows need a CPU with AVX512-BF16.
#
#   scripts/bench/train.sh [STEPS] [BATCH] [SEQ]     (default 3 4 256)
set -euo pipefail
cd "$(dirname "$0")/../.."
steps="${1:-3}"
batch="${2:-4}"
seq="${3:-256}"
threads="$(nproc)"
./scripts/fetch-models.sh
py="$(./scripts/setup-hf.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kdpipe/target}"
cargo build --release --locked --example train_bench >&2
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
bin="$CARGO_TARGET_DIR/release/examples/train_bench"
"$bin" full f32 1 8 0 "$tmp/hf" >/dev/null # export the same weights for PyTorch
precisions="f32"
if grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then
  precisions="f32 bf16"
else
  echo "train bench: this CPU lacks AVX512-BF16, so no bf16 rows" >&2
fi
: >"$tmp/rows"
for precision in $precisions; do
  for mode in full lora; do
    echo "train bench: $mode $precision, kdpipe" >&2
    /usr/bin/time -f "%M" -o "$tmp/k.rss" "$bin" "$mode" "$precision" "$batch" "$seq" "$steps" >"$tmp/k.json"
    echo "train bench: $mode $precision, PyTorch" >&2
    /usr/bin/time -f "%M" -o "$tmp/p.rss" "$py" scripts/bench/torch_train_bench.py "$tmp/hf" "$mode" "$precision" "$batch" "$seq" "$steps" "$threads" >"$tmp/p.json"
    echo "$mode $precision $(cat "$tmp/k.json") $(cat "$tmp/k.rss") $(cat "$tmp/p.json") $(cat "$tmp/p.rss")" >>"$tmp/rows"
  done
done
mkdir -p bench-results
python3 - "$tmp/rows" "$steps" "$batch" "$seq" "$threads" <<'PY' | tee bench-results/train.md
import json, re, sys
rows, steps, batch, seq, threads = sys.argv[1:6]
print(f"SmolLM2-135M training, batch {batch} × seq {seq}, {steps} timed steps after one warm-up, {threads} threads\n")
print("| mode | precision | kdpipe tokens/s | PyTorch tokens/s | kdpipe / PyTorch | kdpipe peak RSS MB | PyTorch peak RSS MB |")
print("|---|---|---:|---:|---:|---:|---:|")
for line in open(rows):
    mode, precision, rest = line.split(" ", 2)
    k_json, rest = rest.split("} ", 1)
    k = json.loads(k_json + "}")
    k_rss, rest = rest.split(" ", 1)
    p_json, p_rss = rest.rsplit(" ", 1)
    p = json.loads(p_json)
    print(f"| {mode} | {precision} | {k['tokens_per_s']} | {p['tokens_per_s']} | {k['tokens_per_s'] / p['tokens_per_s']:.2f}× | {int(k_rss) // 1024} | {int(p_rss) // 1024} |")
PY
