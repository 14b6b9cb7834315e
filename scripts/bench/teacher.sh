#!/usr/bin/env bash
# Local teacher speed: kdpipe's two local engines next to llama.cpp (llama-cpp-python) on
# the same GGUF, the same rendered few-shot chats, the same machine, in one run. All decode
# greedily and reuse the previous prompt's cached prefix:
# - kdpipe with mistralrs and llama.cpp answer one request at a time;
# - kdpipe's batched engine (what `engine = "auto"` picks for llama/qwen2 models that fit)
#   decodes BATCH sequences together, so its figure is throughput, the one a batch job sees.
# The last column, generated tokens per second of wall time, compares them end to end.
#
#   scripts/bench/teacher.sh [MODEL] [N] [MAX_TOKENS] [CONFIG] [BATCH]
#   default: the quickstart teacher (Qwen2.5-Coder-0.5B Q4_K_M), 48 inputs of the numeric
#   example task (configs/arith.toml: longer rationales than the label task), 128 tokens,
#   batch 32
#
# Prints one table and writes it to bench-results/teacher.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:-models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf}"
n="${2:-48}"
max_tokens="${3:-128}"
config="${4:-configs/arith.toml}"
batch="${5:-32}"
threads="$(nproc)"
./scripts/fetch-models.sh
py="$(./scripts/setup-llama-server.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kdpipe/target}"
cargo build --release --locked --example teacher_bench >&2

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
bench="$CARGO_TARGET_DIR/release/examples/teacher_bench"
echo "teacher bench: kdpipe (mistralrs) on $n chats of $config ($model, max_tokens $max_tokens)" >&2
"$bench" mistralrs "$config" "$model" "$n" "$max_tokens" "$tmp/chats.jsonl" >"$tmp/kdpipe.json"
echo "teacher bench: kdpipe (batched engine, batch $batch) on the same chats" >&2
"$bench" batched "$config" "$model" "$n" "$max_tokens" "$tmp/chats.jsonl" "$batch" >"$tmp/batched.json"
echo "teacher bench: llama.cpp on the same chats ($threads threads)" >&2
"$py" scripts/bench/llama_cpp_bench.py "$model" "$tmp/chats.jsonl" "$max_tokens" "$threads" >"$tmp/llama.json"

mkdir -p bench-results
python3 - "$tmp/kdpipe.json" "$tmp/batched.json" "$tmp/llama.json" "$model" "$(nproc)" <<'PY' | tee bench-results/teacher.md
import json, sys, platform
rows = [json.load(open(p)) for p in sys.argv[1:4]]
print(f"Teacher speed, {sys.argv[4]}, {rows[0]['requests']} few-shot chats, greedy, {sys.argv[5]} cores ({platform.machine()})\n")
print("Wall time includes loading the model. Batched decode tok/s is the whole batch's.\n")
print("| engine | prompt tokens | prompt tok/s | decode tokens | decode tok/s | wall s | generated tok/s of wall |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['engine']} | {r['prompt_tokens']} | {r['prompt_tok_s']} | {r['decode_tokens']} | {r['decode_tok_s']} | {r['wall_s']} | {r['generated_tok_s_wall']} |")
m, b, l = rows
for name, r in (("mistralrs", m), ("batched", b)):
    print(f"\nkdpipe {name} / llama.cpp: decode {r['decode_tok_s'] / l['decode_tok_s']:.2f}×, prompt {r['prompt_tok_s'] / l['prompt_tok_s']:.2f}×, end to end {r['generated_tok_s_wall'] / l['generated_tok_s_wall']:.2f}×")
PY
