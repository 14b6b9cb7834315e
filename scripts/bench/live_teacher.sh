#!/usr/bin/env bash
# Distillation recipes (issues 20 and 21): the same teacher rows and the same optimizer
# steps, several ways to train the student, each scored on the same held-back rows:
#
#   sft        step-by-step: CE on the teacher's rationales and labels
#   stored     sft + token-level KD on the teacher's top-k stored at generate time
#   on_policy  stored + on-policy distillation, λ = 0.5 (the student's own samples scored
#              by the live teacher, reverse KL over its top-k + tail)
#   online     sft + on-policy λ = 0.5 + the rationales' token KD from the live teacher
#              (nothing stored)
#   mutual     sft + deep mutual learning: a second 0.5B student (its own LoRA init and
#              dropout) trains on the same batches, each learning from the other's live
#              distribution and from the labels; no teacher in the loop
#   feature    sft + feature KD (issue 21): the teacher's hidden states at 4 evenly spaced
#              layer pairs, MSE through learned maps (weight 1)
#   relation   sft + relation KD: RKD (distance + 2 × angle) between the micro-batch's
#              pooled final states of teacher and student (weight $RELATION_WEIGHT)
#   smol_sft   sft with SmolLM2-135M-Instruct as the student (another tokenizer)
#   smol_cross smol_sft + cross-tokenizer token KD from the same stored Qwen top-k
#              (token_kd = "cross": byte-offset alignment, ULD where tokens differ)
#   smol_relation  smol_sft + relation KD across tokenizers: the Qwen teacher reads each
#              example as text in its own tokens (weight $RELATION_WEIGHT)
#
# plus the teacher's own few-shot accuracy. Teacher Qwen2.5-Coder-1.5B-Instruct Q4_K_M,
# student Qwen2.5-Coder-0.5B-Instruct (LoRA r = 16 on every linear layer): one tokenizer.
# SVAMP holds back every 7th row of dev.jsonl (the rest is the pool the teacher sees);
# emotion trains on train.jsonl and holds back val.jsonl, as scripts/bench/quality.sh;
# curate drops training rows that share a 13-word window with any held-back row.
# Wall time of each variant (training, then its eval) is measured on its own, nothing
# else running. Prints a table and writes bench-results/live-teacher.md.
#
# Knobs (environment):
#   TRAIN_ROWS  teacher rows per task              (default 64)
#   EVAL_ROWS   held-back rows scored per task     (default 50)
#   STEPS       optimizer steps of every variant   (default 16)
#   TASKS       "svamp emotion"                    (default svamp)
#   VARIANTS    which rows to (re)run
#               (default "teacher sft stored on_policy online mutual feature relation
#               smol_sft smol_cross smol_relation")
#   RELATION_WEIGHT  λ_rel of the relation variant    (default 10)
#
# The report covers every task and variant whose results in WORK were measured with the
# same TRAIN_ROWS, EVAL_ROWS and STEPS, so one variant can be rerun alone.
#   WORK        where runs go     (default ~/.cache/kdpipe/live-teacher)
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$(pwd)"
. scripts/bench/data-dir.sh svamp/dev.jsonl gsm8k/train.jsonl tweeteval-emotion/train.jsonl tweeteval-emotion/val.jsonl
train_rows="${TRAIN_ROWS:-64}"
eval_rows="${EVAL_ROWS:-50}"
steps="${STEPS:-16}"
tasks="${TASKS:-svamp}"
variants="${VARIANTS:-teacher sft stored on_policy online mutual feature relation smol_sft smol_cross smol_relation}"
relation_weight="${RELATION_WEIGHT:-10}"
params="$train_rows $eval_rows $steps"
work="${WORK:-$HOME/.cache/kdpipe/live-teacher}"
teacher_model="$root/models/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
student_model="$root/models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
smol_model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
started=$(date +%s)

large_models=1
. scripts/bench/binary.sh

python3 scripts/bench/heldout.py "$data" "$work"

write_config() { # task name variant
  local task=$1 name=$2 variant=$3 inputs fields taskdef teacher kd="kd_token_weight = 0" live="" student="$student_model"
  if [ "$task" = svamp ]; then
    inputs="$work/svamp-pool.jsonl"
    fields='input_field = "question"
gold_field = "answer"'
    taskdef='kind = "numeric"
description = "Solve the arithmetic word problem."'
    teacher="max_tokens = 128"
  else
    inputs="$work/emotion-pool.jsonl"
    fields='input_field = "text"
gold_field = "label"'
    taskdef='kind = "labels"
labels = ["anger", "joy", "optimism", "sadness"]
description = "What emotion does the tweet express?"'
    teacher="max_tokens = 96"
  fi
  case $variant in
    stored|on_policy) kd="kd_token_weight = 1.0" ;;
    online) kd="kd_token_weight = 1.0" ;;
    smol_cross) kd="kd_token_weight = 1.0
token_kd = \"cross\"" ;;
  esac
  case $variant in smol_*) student="$smol_model" ;; esac
  case $variant in
    on_policy) live="[finetune.live_teacher]
model = \"$teacher_model\"
on_policy = 0.5
max_new_tokens = 128" ;;
    online) live="[finetune.live_teacher]
model = \"$teacher_model\"
on_policy = 0.5
online = true
max_new_tokens = 128" ;;
    mutual) live="[finetune.mutual]
weight = 1.0" ;;
    feature) live="[finetune.hidden_kd]
model = \"$teacher_model\"
feature_weight = 1.0" ;;
    relation|smol_relation) live="[finetune.hidden_kd]
model = \"$teacher_model\"
feature_weight = 0.0
relation_weight = $relation_weight" ;;
  esac
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
engine = "kdpipe"
$teacher
[generate]
token_topk = 20
[curate]
split = [0.9, 0.1, 0.0]
decontaminate = ["$work/$task-heldout.jsonl"]
[student]
model = "$student"
[finetune]
objective = "step_by_step"
max_steps = $steps
epochs = 100
learning_rate = 2e-4
batch_size = 4
max_seq_len = 320
checkpoint_every = 0
lora = { rank = 16, alpha = 32 }
$kd
$live
[eval]
student_view = "auto"
EOF
}

for task in $tasks; do
  head -n "$eval_rows" "$work/$task-heldout.jsonl" >"$work/$task-eval.jsonl"
  eval_file="$work/$task-eval.jsonl"
  echo "live-teacher: $task: teacher rows and curation" >&2
  write_config "$task" "$task" sft
  "$kdpipe" generate --config "$work/$task.toml" >&2
  "$kdpipe" curate --config "$work/$task.toml" >&2
  if [[ " $variants " == *" teacher "* ]]; then
    t0=$(date +%s)
    "$kdpipe" eval --config "$work/$task.toml" --file "$eval_file" --models teacher --teacher run >&2
    echo $(($(date +%s) - t0)) >"$work/$task-teacher.seconds"
    cp "$work/runs/$task/eval/report.json" "$work/$task-teacher.json"
    echo "$params" >"$work/$task-teacher.params"
  fi
  for variant in sft stored on_policy online mutual feature relation smol_sft smol_cross smol_relation; do
    [[ " $variants " == *" $variant "* ]] || continue
    name="$task-$variant"
    write_config "$task" "$name" "$variant"
    rm -rf "$work/runs/$name" "$work/$name.params"
    mkdir -p "$work/runs/$name"
    cp -r "$work/runs/$task/curate" "$work/runs/$name/curate"
    echo "live-teacher: $task: training $variant" >&2
    t0=$(date +%s)
    /usr/bin/time -v "$kdpipe" finetune --config "$work/$name.toml" 2> >(tee "$work/$name.finetune.log" >&2)
    echo $(($(date +%s) - t0)) >"$work/$name.train.seconds"
    t0=$(date +%s)
    "$kdpipe" eval --config "$work/$name.toml" --file "$eval_file" --models student >&2
    echo $(($(date +%s) - t0)) >"$work/$name.eval.seconds"
    cp "$work/runs/$name/eval/report.json" "$work/$name.json"
    echo "$params" >"$work/$name.params"
  done
done

mkdir -p bench-results
elapsed=$(($(date +%s) - started))
python3 - "$work" "$elapsed" "$train_rows" "$eval_rows" "$steps" "$tasks" "$variants" <<'PY' | tee bench-results/live-teacher.md
import json, math, os, re, sys
work, elapsed, train_rows, eval_rows, steps, ran_tasks, ran_variants = sys.argv[1:]
params = f"{train_rows} {eval_rows} {steps}"

def current(name):
    """Whether WORK holds this row's results, measured with this run's sizes."""
    p = f"{work}/{name}.params"
    return os.path.exists(p) and open(p).read().strip() == params

def wilson(p, n, z=1.96):
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{100 * max(0, c - h):.0f}–{100 * min(1, c + h):.0f}"

def secs(path):
    return int(open(path).read())

def rates(name):
    """Mean over the steps that did each: sampling, scoring and training tokens/s, and the
    last step's loss (train tokens/s excludes the live teacher's time where it ran)."""
    m = [json.loads(l) for l in open(f"{work}/runs/{name}/finetune/metrics.jsonl")]
    def mean(key):
        xs = [s[key] for s in m if s.get(key)]
        return f"{sum(xs) / len(xs):.1f}" if xs else "—"
    train = "train_tokens_per_second" if "train_tokens_per_second" in m[0] else "tokens_per_second"
    return mean("sample_tokens_per_second"), mean("score_tokens_per_second"), mean(train), m[-1]["loss"]

def rss(name):
    text = open(f"{work}/{name}.finetune.log").read()
    kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return f"{int(kb.group(1)) / 1024 / 1024:.1f}" if kb else "—"

print("# Distillation recipes on one teacher: Qwen2.5-Coder-1.5B-Instruct Q4_K_M → Qwen2.5-Coder-0.5B-Instruct (LoRA r 16), and → SmolLM2-135M-Instruct\n")
print(f"`scripts/bench/live_teacher.sh`: {train_rows} teacher rows per task, {eval_rows} held-back rows scored, "
      f"{steps} optimizer steps of 4 sequences for every variant, on this machine (2 cores). "
      f"The last invocation ran {ran_variants} on {ran_tasks} in {int(elapsed) // 60} min; the other rows "
      f"come from earlier invocations with the same sizes (each row's wall times are its own).\n")
print("| task | model | accuracy | 95 % CI | no answer | train s | eval s | peak RSS GB | sample tok/s | score tok/s | train tok/s | last loss |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for task in ["svamp", "emotion"]:
    if not current(f"{task}-teacher"):
        continue
    t = json.load(open(f"{work}/{task}-teacher.json"))
    m = t["models"][0]
    n = t["rows"]
    print(f"| {task} | teacher few-shot | {100 * m['accuracy']:.1f} % | {wilson(m['accuracy'], n)} | {100 * m['parse_failure_rate']:.1f} % | | {secs(f'{work}/{task}-teacher.seconds')} | | | | | |")
    for v, label in [("sft", "SFT on rationales"), ("stored", "+ stored token KD"),
                     ("on_policy", "+ on-policy λ 0.5"), ("online", "online (live KD) + on-policy λ 0.5"),
                     ("mutual", "SFT + mutual learning (two students)"),
                     ("feature", "SFT + feature KD (4 layer pairs, MSE)"),
                     ("relation", "SFT + relation KD (RKD)"),
                     ("smol_sft", "SmolLM2-135M student: SFT on rationales"),
                     ("smol_cross", "SmolLM2-135M student: + cross-tokenizer token KD"),
                     ("smol_relation", "SmolLM2-135M student: + relation KD (RKD) across tokenizers")]:
        name = f"{task}-{v}"
        if not current(name):
            continue
        m = json.load(open(f"{work}/{name}.json"))["models"][0]
        s, sc, tr, loss = rates(name)
        print(f"| {task} | {label} | {100 * m['accuracy']:.1f} % | {wilson(m['accuracy'], n)} | {100 * m['parse_failure_rate']:.1f} % | "
              f"{secs(f'{work}/{name}.train.seconds')} | {secs(f'{work}/{name}.eval.seconds')} | {rss(name)} | {s} | {sc} | {tr} | {loss:.3f} |")
    funnel = json.load(open(f"{work}/runs/{task}/curate/report.json"))["funnel"]
    removed = {f["rule"]: f["removed"] for f in funnel}
    print(f"| {task} | (rows scored: {n}; curated teacher rows: {funnel[-1]['rows_after']} of {funnel[0]['rows_after'] + funnel[0]['removed']}, "
          f"{removed.get('contaminated', 0)} dropped as near-copies of held-back rows) | | | | | | | | | | |")
PY
