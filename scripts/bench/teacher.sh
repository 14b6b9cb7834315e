#!/usr/bin/env bash
# Local teacher speed: kdpipe's batched and mistralrs engines next to llama.cpp at its best
# (llama-server with --parallel and continuous batching, llama-batched-bench; built from
# the newest llama-cpp-python sdist's vendored source by scripts/setup-llama-cpp.sh), on
# the same GGUFs and the same rendered few-shot chats, every side 3 times interleaved
# (scripts/bench/teacher.py, scripts/bench/harness.py). Writes bench-results/teacher.md.
# Default models: SmolLM2-135M, Qwen2.5-Coder-0.5B and -1.5B (fetched with --large);
# one repetition of SmolLM2-135M with every row took 11 minutes on 2 cores, so all three
# models take hours: split the run with --models (the table is rewritten after every
# model) and leave the slow one-stream rows out of big models with --no-one-stream-for.
# Run it on a quiet machine (it refuses to write otherwise).
#
#   scripts/bench/teacher.sh [--models A.gguf,B.gguf] [--n 48] [--max-tokens 128]
#                            [--batch 32] [--reps 3] [--no-one-stream]
#                            [--no-one-stream-for 1.5B] [--allow-load]
#                            [--raw-only --out bench-results/teacher-raw.md]  (raw rows only)
set -euo pipefail
cd "$(dirname "$0")/../.."
./scripts/fetch-models.sh --large
llama_bin="$(./scripts/setup-llama-cpp.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kdpipe/target}"
# The one-stream rows need the mistralrs engine; without them the build is ~10 minutes shorter.
features=(--features mistralrs)
for arg in "$@"; do case "$arg" in --no-one-stream | --raw-only) features=() ;; esac; done
cargo build --release --locked "${features[@]}" --example teacher_bench >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
models="models/SmolLM2-135M-Instruct.Q4_1.gguf,models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf,models/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
mkdir -p bench-results
KDPIPE_BENCH_ARGS="$*" python3 scripts/bench/teacher.py --bin "$CARGO_TARGET_DIR/release/examples/teacher_bench" \
  --llama-bin "$llama_bin" --llama-version "${KDPIPE_LLAMA_CPP_VERSION:-0.3.36}" --work "$work" \
  --models "$models" "$@"
