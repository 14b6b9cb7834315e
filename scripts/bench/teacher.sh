#!/usr/bin/env bash
# Local teacher speed: kdpipe (mistralrs) next to llama.cpp (llama-cpp-python) on the same
# GGUF, the same rendered few-shot chats, the same machine, in one run. Both decode
# greedily, one request at a time, and reuse the previous prompt's cached prefix.
#
#   scripts/bench/teacher.sh [MODEL] [N] [MAX_TOKENS] [CONFIG]
#   default: the quickstart teacher (Qwen2.5-Coder-0.5B Q4_K_M), 12 inputs of the numeric
#   example task (configs/arith.toml: longer rationales than the label task), 128 tokens
#
# Prints one table and writes it to bench-results/teacher.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:-models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf}"
n="${2:-12}"
max_tokens="${3:-128}"
config="${4:-configs/arith.toml}"
threads="$(nproc)"
./scripts/fetch-models.sh
py="$(./scripts/setup-llama-server.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kdpipe/target}"
cargo build --release --locked --example teacher_bench >&2

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "teacher bench: kdpipe on $n chats of $config ($model, max_tokens $max_tokens)" >&2
"$CARGO_TARGET_DIR/release/examples/teacher_bench" "$config" "$model" "$n" "$max_tokens" "$tmp/chats.jsonl" >"$tmp/kdpipe.json"
echo "teacher bench: llama.cpp on the same chats ($threads threads)" >&2
"$py" scripts/bench/llama_cpp_bench.py "$model" "$tmp/chats.jsonl" "$max_tokens" "$threads" >"$tmp/llama.json"

mkdir -p bench-results
python3 - "$tmp/kdpipe.json" "$tmp/llama.json" "$model" "$(nproc)" <<'PY' | tee bench-results/teacher.md
import json, sys, platform
rows = [json.load(open(p)) for p in sys.argv[1:3]]
print(f"Teacher speed, {sys.argv[3]}, {rows[0]['requests']} few-shot chats, greedy, one request at a time, {sys.argv[4]} cores ({platform.machine()})\n")
print("| engine | prompt tokens | prompt tok/s | decode tokens | decode tok/s | wall s |")
print("|---|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['engine']} | {r['prompt_tokens']} | {r['prompt_tok_s']} | {r['decode_tokens']} | {r['decode_tok_s']} | {r['wall_s']} |")
k, l = rows
print(f"\nkdpipe / llama.cpp: decode {k['decode_tok_s'] / l['decode_tok_s']:.2f}×, prompt {k['prompt_tok_s'] / l['prompt_tok_s']:.2f}×")
PY
