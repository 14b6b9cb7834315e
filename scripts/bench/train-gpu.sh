#!/usr/bin/env bash
# Student training on a GPU: builds kdpipe with `--features cuda` (its own target folder, so
# the CPU build is not rebuilt), trains SmolLM2-135M for a few steps on CUDA device 0 in
# full fine-tuning and in LoRA, f32 and bf16 mixed precision, batch × seq as in train.sh,
# and prints tokens/s (3 untimed warm-up steps first).
# Needs an NVIDIA GPU, its driver and the CUDA toolkit (nvcc); the CPU build never does.
#
#   scripts/bench/train-gpu.sh [STEPS] [BATCH] [SEQ]     (default 5 4 256)
set -euo pipefail
cd "$(dirname "$0")/../.."
steps="${1:-5}"
batch="${2:-4}"
seq="${3:-256}"
command -v nvidia-smi >/dev/null || { echo "train-gpu: no nvidia-smi: this machine has no NVIDIA driver" >&2; exit 2; }
command -v nvcc >/dev/null || { echo "train-gpu: no nvcc: install the CUDA toolkit (candle compiles its kernels with it)" >&2; exit 2; }
./scripts/fetch-models.sh >&2
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$HOME/.cache/kdpipe/target-cuda}"
cargo build --release --locked --features cuda --example train_bench >&2
bin="$CARGO_TARGET_DIR/release/examples/train_bench"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
echo "SmolLM2-135M training on $gpu, batch $batch × seq $seq, $steps timed steps after 3 warm-up steps"
echo
echo "| mode | precision | kdpipe tokens/s |"
echo "|---|---|---:|"
for mode in full lora; do
  for precision in f32 bf16; do
    out="$(KDPIPE_DEVICE=cuda "$bin" "$mode" "$precision" "$batch" "$seq" 3 "$steps")"
    echo "| $mode | $precision | $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["tokens_per_s"])' "$out") |"
  done
done
