#!/usr/bin/env bash
# Student training speed: kdpipe next to PyTorch + transformers at its best (newest torch,
# PEFT LoRA, fused AdamW, the fastest of glibc malloc / jemalloc / tcmalloc, torch.compile
# as its own column) on the same SmolLM2-135M weights, in full fine-tuning and LoRA, each
# in f32 and bf16 mixed precision; every side 3 times, interleaved, 3 warm-up and 20 timed
# steps a run (scripts/bench/train.py, scripts/bench/harness.py). Writes
# bench-results/train.md. The bf16 rows need a CPU with AVX512-BF16. Takes about 90
# minutes on 2 cores; run it on a quiet machine (it refuses to write its table otherwise).
#
#   scripts/bench/train.sh [--steps 20] [--warmup 3] [--batch 4] [--seq 256] [--reps 3]
#                          [--modes full,lora] [--precisions f32,bf16] [--no-compile]
#                          [--allow-load]
set -euo pipefail
cd "$(dirname "$0")/../.."
./scripts/fetch-models.sh
py="$(./scripts/setup-hf.sh)"
for lib in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4; do
  [ -f "$lib" ] || echo "train bench: $lib missing; install libjemalloc2 and libtcmalloc-minimal4 (apt-get) so PyTorch can use them" >&2
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kdpipe/target}"
cargo build --release --locked --example train_bench >&2
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p bench-results
KDPIPE_BENCH_ARGS="$*" python3 scripts/bench/train.py --bin "$CARGO_TARGET_DIR/release/examples/train_bench" --py "$py" \
  --model-dir "$tmp/hf" "$@"
