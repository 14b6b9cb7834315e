#!/usr/bin/env bash
# Quality benchmark: does the distilled student beat its teacher? ("Distilling step-by-step",
# Hsieh et al., 2023, at laptop scale.) Teacher Qwen2.5-Coder-0.5B-Instruct (GGUF, local),
# student SmolLM2-135M-Instruct, two tasks from KDPIPE_DATA (default ../shared/data): SVAMP (numeric) and
# TweetEval emotion (4 labels). Every row of the table is scored on the same held-back rows:
#
#   teacher few-shot (step-by-step prompt, greedy)   student before training (same prompt,
#                                                     and the student's own zero-shot prompt)
#   student label_only (gold labels)                  student distill (teacher labels)
#   student step_by_step (rationales + labels)        step_by_step + KD term
#
# Students answer as `kdpipe eval` does by default ([eval] student_view = "auto"): in the
# label view, except SVAMP's step-by-step students, which write a rationale first. SVAMP's
# step-by-step students are also scored with [eval] calculator = true (kdpipe writes the
# value of each equation they leave open), in extra rows.
#
# The held-back rows never reach generate: SVAMP keeps every 7th row of dev.jsonl back
# (the rest is the training pool); emotion trains on train.jsonl and holds back val.jsonl.
# Prints one table and writes it to bench-results/quality.md.
#
#   scripts/bench/quality.sh [SVAMP_EVAL_FILE] [EMOTION_EVAL_FILE]
#
# Pass other eval files (same fields: question/answer for SVAMP, text/label for emotion) to
# score the same students on them unchanged; "-" keeps the default held-back rows.
#
# Sized for under two hours on 2 CPU cores. The knobs that scale it up (environment):
#   TRAIN_ROWS   teacher rows generated per task from the training pool   (default 160)
#   EVAL_ROWS    held-back rows scored per task (SVAMP holds back 97)     (default 100)
#   EPOCHS       student epochs                                            (default 2)
#   SAMPLES      SVAMP teacher samples per input; > 1 gives vote-share
#                soft labels for the KD term                               (default 2)
#   TASKS        which tasks                                     (default "svamp emotion")
#   WORK         where runs go                        (default ~/.cache/kdpipe/quality)
# The paper's students see thousands of rows for many epochs; raise TRAIN_ROWS and EPOCHS
# (and run on a GPU box) to get closer to its setting.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$(pwd)"
. scripts/bench/data-dir.sh svamp/dev.jsonl tweeteval-emotion/train.jsonl tweeteval-emotion/val.jsonl
svamp_eval="${1:--}"
emotion_eval="${2:--}"
train_rows="${TRAIN_ROWS:-160}"
eval_rows="${EVAL_ROWS:-100}"
epochs="${EPOCHS:-2}"
samples="${SAMPLES:-2}"
tasks="${TASKS:-svamp emotion}"
work="${WORK:-$HOME/.cache/kdpipe/quality}"
started=$(date +%s)

. scripts/bench/binary.sh

# Training pool and held-back rows, chosen by a fixed rule (no randomness to reproduce).
python3 scripts/bench/heldout.py "$data" "$work"

# One config per task; variants differ only in [finetune] and the run name.
write_config() { # task name objective kd_weight [calculator] [teacher model] [student view]
  local task=$1 name=$2 objective=$3 kd=$4 calculator=${5:-false}
  local teacher_model=${6:-$root/models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf}
  local view=${7:-auto}
  local inputs fields taskdef teacher
  if [ "$task" = svamp ]; then
    inputs="$work/svamp-pool.jsonl"
    fields='input_field = "question"
gold_field = "answer"'
    taskdef='kind = "numeric"
description = "Solve the arithmetic word problem."'
    teacher="max_tokens = 128
temperature = $([ "$samples" -gt 1 ] && echo 0.7 || echo 0.0)"
    gen="samples = $samples"
  else
    inputs="$work/emotion-pool.jsonl"
    fields='input_field = "text"
gold_field = "label"'
    taskdef='kind = "labels"
labels = ["anger", "joy", "optimism", "sadness"]
description = "What emotion does the tweet express?"'
    teacher="max_tokens = 64"
    gen="samples = 1"
  fi
  cat >"$work/$name.toml" <<EOF
name = "$name"
runs_dir = "$work/runs"
seed = 0
[data]
inputs = ["$inputs"]
id_field = "id"
$fields
limit = $train_rows
[task]
$taskdef
prompt = "$root/prompts/$([ "$task" = svamp ] && echo numeric || echo labels).md"
[teacher]
model = "$teacher_model"
$teacher
[generate]
$gen
[curate]
split = [0.9, 0.1, 0.0]
[student]
model = "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[finetune]
objective = "$objective"
kd_weight = $kd
epochs = $epochs
learning_rate = 1e-4
batch_size = 4
max_seq_len = 192
[eval]
calculator = $calculator
student_view = "$view"
EOF
}

for task in $tasks; do
  heldout="$work/$task-heldout.jsonl"
  [ "$task" = svamp ] && [ "$svamp_eval" != - ] && heldout="$(realpath "$svamp_eval")"
  [ "$task" = emotion ] && [ "$emotion_eval" != - ] && heldout="$(realpath "$emotion_eval")"
  # Score EVAL_ROWS of them; the same rows for every model.
  head -n "$eval_rows" "$heldout" >"$work/$task-eval.jsonl"
  eval_file="$work/$task-eval.jsonl"

  echo "quality: $task: teacher rows, curation" >&2
  # The untrained student never learned the rationale view: it answers in the label view
  # here, and reasons with the few-shot prompt in the next row.
  write_config "$task" "$task" step_by_step 0 false "" label
  "$kdpipe" generate --config "$work/$task.toml" >&2
  "$kdpipe" curate --config "$work/$task.toml" >&2
  echo "quality: $task: teacher and student before training on $eval_file" >&2
  "$kdpipe" eval --config "$work/$task.toml" --file "$eval_file" --models teacher,base --teacher run >&2
  cp "$work/runs/$task/eval/report.json" "$work/$task-reference.json"
  # The student before training, asked exactly as the teacher is: the few-shot prompt.
  write_config "$task" "$task-base-fewshot" step_by_step 0 false "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  "$kdpipe" eval --config "$work/$task-base-fewshot.toml" --file "$eval_file" --models teacher --teacher run >&2
  cp "$work/runs/$task-base-fewshot/eval/report.json" "$work/$task-base-fewshot.json"

  for variant in label_only distill step_by_step step_by_step_kd; do
    objective=${variant%_kd}
    kd=$([ "$variant" = step_by_step_kd ] && echo 0.5 || echo 0)
    name="$task-$variant"
    write_config "$task" "$name" "$objective" "$kd"
    # Every variant trains on the same curated rows.
    rm -rf "$work/runs/$name/curate"
    mkdir -p "$work/runs/$name"
    cp -r "$work/runs/$task/curate" "$work/runs/$name/curate"
    echo "quality: $task: training $variant" >&2
    "$kdpipe" finetune --config "$work/$name.toml" >&2
    "$kdpipe" eval --config "$work/$name.toml" --file "$eval_file" --models student >&2
    cp "$work/runs/$name/eval/report.json" "$work/$name.json"
    if [ "$task" = svamp ] && [ "$objective" = step_by_step ]; then
      write_config "$task" "$name" "$objective" "$kd" true
      "$kdpipe" eval --config "$work/$name.toml" --file "$eval_file" --models student >&2
      cp "$work/runs/$name/eval/report.json" "$work/$name-calculator.json"
    fi
  done
done

mkdir -p bench-results
elapsed=$(($(date +%s) - started))
python3 - "$work" "$elapsed" "$train_rows" "$eval_rows" "$epochs" "$samples" $tasks <<'PY' | tee bench-results/quality.md
import json, math, os, sys
work, elapsed, train_rows, eval_rows, epochs, samples, *tasks = sys.argv[1:]

def wilson(p, n, z=1.96):
    """95 % Wilson score interval of an accuracy p over n rows, in percent."""
    if n == 0:
        return ""
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{100 * max(0, c - h):.0f}–{100 * min(1, c + h):.0f}"

print("# Quality: teacher Qwen2.5-Coder-0.5B-Instruct Q4_K_M, student SmolLM2-135M-Instruct\n")
print(f"`scripts/bench/quality.sh`: {train_rows} teacher inputs per task, up to {eval_rows} held-back rows scored, "
      f"{epochs} epochs, SVAMP samples {samples}; wall time {int(elapsed) // 60} min on this machine.\n")
print("| task | model | answers in | accuracy | 95 % CI | macro-F1 | no answer | train rows | s / example |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for task in tasks:
    ref = json.load(open(f"{work}/{task}-reference.json"))
    fewshot = json.load(open(f"{work}/{task}-base-fewshot.json"))
    cur = json.load(open(f"{work}/runs/{task}/curate/report.json"))
    train = cur.get("splits", {}).get("train", "")
    pick = lambda rep, key: next(m for m in rep["models"] if m["key"] == key)
    rows = [("teacher few-shot", pick(ref, "teacher"), ""),
            ("student before training, few-shot prompt", pick(fewshot, "teacher"), ""),
            ("student before training, student prompt", pick(ref, "base"), "")]
    for v, label in [("label_only", "student label_only (gold)"), ("distill", "student distill (teacher labels)"),
                     ("step_by_step", "student step_by_step"), ("step_by_step_kd", "student step_by_step + KD")]:
        rep = json.load(open(f"{work}/{task}-{v}.json"))
        rows.append((label, rep["models"][0], train))
        calc = f"{work}/{task}-{v}-calculator.json"
        if os.path.exists(calc):
            rows.append((label + ", calculator", json.load(open(calc))["models"][0], train))
    for label, m, n in rows:
        f1 = m.get("labels") or {}
        f1 = f"{f1['macro_f1']:.3f}" if f1 else "—"
        how = "rationale" if ("rationale" in m["decode"] or m["key"] == "teacher") else "label"
        ci = wilson(m["accuracy"], ref["rows"])
        print(f"| {task} | {label} | {how} | {100 * m['accuracy']:.1f} % | {ci} | {f1} | {100 * m['parse_failure_rate']:.1f} % | {n} | {m['seconds_per_example']:.2f} |")
    print(f"| {task} | (rows scored: {ref['rows']}) | | | | | | | |")
PY
