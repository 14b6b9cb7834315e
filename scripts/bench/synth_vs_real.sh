#!/usr/bin/env bash
# Synthesized inputs against real ones: two SmolLM2-135M students trained step-by-step on
# the same number of teacher-labelled rows (teacher Qwen2.5-Coder-0.5B), one on real SVAMP
# inputs, one on inputs the teacher synthesized from 8 SVAMP seeds, scored on the same
# held-back SVAMP rows (every 7th row of $KDPIPE_DATA/svamp/dev.jsonl, as in
# quality.sh). Prints one table and writes it to bench-results/synth-vs-real.md.
#
#   scripts/bench/synth_vs_real.sh
#
# Knobs (environment): ROWS inputs per student (default 32), EVAL_ROWS (default 50),
# EPOCHS (default 2), WORK (default ~/.cache/kdpipe/synth-vs-real).
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$(pwd)"
rows="${ROWS:-32}"
eval_rows="${EVAL_ROWS:-50}"
epochs="${EPOCHS:-2}"
work="${WORK:-$HOME/.cache/kdpipe/synth-vs-real}"
started=$(date +%s)

. scripts/bench/binary.sh

# Seeds: the first 8 training-pool rows; real inputs: the next ROWS; eval: held back.
. scripts/bench/data-dir.sh svamp/dev.jsonl
python3 - "$data/svamp/dev.jsonl" "$work" "$rows" "$eval_rows" <<'PY'
import json, sys
src, work, rows, eval_rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = [json.loads(l) for l in open(src) if l.strip()]
pool = [r for i, r in enumerate(data) if i % 7 != 0]
held = [r for i, r in enumerate(data) if i % 7 == 0][:eval_rows]
def write(name, rs):
    with open(f"{work}/{name}", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rs)
write("seeds.jsonl", pool[:8])
write("real.jsonl", pool[8:8 + rows])
write("eval.jsonl", held)
PY

config() { # name inputs-line synthesize-section
  cat >"$work/$1.toml" <<EOF
name = "$1"
runs_dir = "$work/runs"
seed = 0
[data]
$2
id_field = "id"
input_field = "question"
gold_field = "answer"
[task]
kind = "numeric"
description = "Solve the arithmetic word problem."
prompt = "$root/prompts/numeric.md"
[teacher]
model = "$root/models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
max_tokens = 128
[curate]
split = [0.9, 0.1, 0.0]
decontaminate = ["$work/eval.jsonl"]
[student]
model = "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[finetune]
objective = "step_by_step"
epochs = $epochs
learning_rate = 1e-4
batch_size = 4
max_seq_len = 192
[eval]
max_new_tokens = 12
$3
EOF
}
config real "inputs = [\"$work/real.jsonl\"]" ""
config synth "" "[synthesize]
seeds = [\"$work/seeds.jsonl\"]
target = $rows
decontaminate = [\"$work/eval.jsonl\"]"

for name in real synth; do
  echo "synth-vs-real: $name" >&2
  [ "$name" = synth ] && "$kdpipe" synthesize --config "$work/$name.toml" >&2
  "$kdpipe" generate --config "$work/$name.toml" >&2
  "$kdpipe" curate --config "$work/$name.toml" >&2
  "$kdpipe" finetune --config "$work/$name.toml" >&2
  "$kdpipe" eval --config "$work/$name.toml" --file "$work/eval.jsonl" --models student >&2
done
"$kdpipe" eval --config "$work/real.toml" --file "$work/eval.jsonl" --models teacher,base --teacher run --name reference >&2 || true

mkdir -p bench-results
elapsed=$(($(date +%s) - started))
python3 - "$work" "$elapsed" "$rows" "$epochs" <<'PY' | tee bench-results/synth-vs-real.md
import json, sys
work, elapsed, rows, epochs = sys.argv[1:5]
def load(p):
    return json.load(open(p))
print("# Students on synthesized vs real SVAMP inputs\n")
print(f"`scripts/bench/synth_vs_real.sh`: {rows} inputs each, teacher Qwen2.5-Coder-0.5B labels them, "
      f"SmolLM2-135M trained step_by_step for {epochs} epochs, scored on held-back SVAMP rows; "
      f"wall time {int(elapsed) // 60} min.\n")
syn = load(f"{work}/runs/synth/synthesize/manifest.json")["summary"]
print(f"Synthesis from 8 seeds: {syn['accepted']} accepted of {syn['requests']} requests; rejected {syn['rejected']}.\n")
print("| student trained on | teacher rows | curated train rows | accuracy | no answer |")
print("|---|---:|---:|---:|---:|")
for name, label in [("real", "real SVAMP inputs"), ("synth", "synthesized inputs")]:
    cur = load(f"{work}/runs/{name}/curate/report.json")
    m = load(f"{work}/runs/{name}/eval/report.json")["models"][0]
    print(f"| {label} | {cur['rows_in']} | {cur['splits']['train']} | {100 * m['accuracy']:.1f} % | {100 * m['parse_failure_rate']:.1f} % |")
try:
    ref = load(f"{work}/runs/reference/eval/report.json")
    for m in ref["models"]:
        print(f"| ({m['name']}, for reference) | | | {100 * m['accuracy']:.1f} % | {100 * m['parse_failure_rate']:.1f} % |")
except FileNotFoundError:
    pass
PY
