#!/usr/bin/env bash
# Quality benchmark: does the distilled student beat its teacher? ("Distilling step-by-step",
# Hsieh et al., 2023, at laptop scale.) Teacher Qwen2.5-Coder-0.5B-Instruct (GGUF, local;
# TEACHER=1.5b for Qwen2.5-Coder-1.5B-Instruct), student SmolLM2-135M-Instruct (STUDENT=0.5b
# for Qwen2.5-Coder-0.5B-Instruct, the 1.5B's tokenizer), two tasks from KDPIPE_DATA (default
# ../shared/data): SVAMP (numeric; its training pool continues with GSM8K's training
# problems) and TweetEval emotion (4 labels). Every row of the table is scored on the same held-back rows:
#
#   teacher few-shot (step-by-step prompt, greedy)   student before training (same prompt,
#     SVAMP: also with the calculator               and the student's own zero-shot prompt)
#   student label_only (gold labels, all rows)       student distill (teacher labels, all rows:
#                                                       [curate] gold = "flag")
#   student step_by_step (rationales + labels)       step_by_step + KD term
#   step_by_step + token-level KD (TOKEN_TOPK > 0: the teacher's top-k at every token)
#   step_by_step, one row a step (the control of token-level KD: its third example a row
#     leaves room for one row in a batch of 4, so it takes twice step_by_step's steps)
#   step_by_step_gold (+ _token_kd): as step_by_step (+ token-level KD) on the rows whose
#     teacher label agrees with gold ([curate] gold = "filter"), run when named in VARIANTS
#   step_by_step_gold_labels: every row's label view on gold, the rationale view only where
#     the teacher's answer agrees with gold ([finetune] labels = "gold", gold = "flag"), run
#     when named in VARIANTS
#
# step_by_step trains on the rows curate keeps by default: for SVAMP only those whose answer
# agrees with gold (gold = "auto" filters numeric tasks), and the table says so; for emotion
# every row, the teacher's wrong labels included (gold = "auto" flags label tasks), which
# the _gold variants leave out (on SVAMP they train on the same rows as their plain twins).
# Students answer as `kdpipe eval` does by default ([eval] student_view = "auto"): in the
# label view, except SVAMP's step-by-step students, which write a rationale first. SVAMP's
# step-by-step students and its teacher are also scored with [eval] calculator = true
# (kdpipe writes the value of each equation they leave open), in extra rows.
#
# The held-back rows never reach generate: SVAMP keeps every 7th row of dev.jsonl back
# (the rest is the training pool, 579 rows, then GSM8K's 7,473 training problems); emotion trains on train.jsonl and holds back val.jsonl.
# SVAMP's problems are templated, so curate also drops every training row sharing a
# 13-word window with an eval file ([curate] decontaminate). Emotion is scored twice: on
# held-back rows balanced across the labels, and on val.jsonl as it comes (its natural
# label distribution: anger 160, joy 97, sadness 89, optimism 28 of its 374 rows).
# Prints the tables and writes them to OUT (default bench-results/quality.md).
#
#   scripts/bench/quality.sh [SVAMP_EVAL_FILE] [EMOTION_EVAL_FILE]
#
# Pass other eval files (same fields: question/answer for SVAMP, text/label for emotion) to
# score the same students on them unchanged; "-" keeps the default held-back rows.
#
# Sized for under two hours on 2 CPU cores. The knobs that scale it up (environment):
#   TRAIN_ROWS   teacher rows generated per task from the training pool   (default 160)
#   EVAL_ROWS    held-back rows scored per task (SVAMP holds back 97)     (default 100)
#   NATURAL_ROWS emotion's rows of val.jsonl as it comes (default all 374: at 100 rows an
#                interval is ±9 points, and a 5-point win there was a tie at 374)
#   EPOCHS       student epochs                                            (default 2)
#   SAMPLES      SVAMP teacher samples per input; > 1 gives vote-share
#                soft labels for the KD term                               (default 2)
#   TASKS        which tasks                                     (default "svamp emotion")
#   VARIANTS     which students train  (default "label_only distill step_by_step step_by_step_kd",
#                and step_by_step_token_kd step_by_step_one_row when TOKEN_TOPK > 0; also
#                step_by_step_gold, step_by_step_gold_token_kd, step_by_step_gold_labels)
#   TOKEN_TOPK   the teacher keeps its top-k alternatives at every token it writes ([generate]
#                token_topk; at most 20), for the *_token_kd variants: kd_token_weight 1.0, on
#                the teacher's own token ids when the student shares its tokenizer
#                (STUDENT=0.5b with TEACHER=1.5b), else aligned across tokenizers
#                (token_kd = "cross")                                            (default 0)
#   CURVE        teacher input counts for a data-size curve of CURVE_VARIANT, each trained
#                on the curated rows of the first N inputs (their teacher rows are reused
#                from the TRAIN_ROWS run); the TRAIN_ROWS student is its last point (default none)
#   CURVE_VARIANT the recipe the curve trains                          (default step_by_step)
#   TEACHER      0.5b or 1.5b (Qwen2.5-Coder-*-Instruct Q4_K_M)             (default 0.5b)
#   STUDENT      135m (SmolLM2-135M-Instruct) or 0.5b, which trains LoRA adapters
#                (r 16, alpha 32, lr 2e-4, as live_teacher.sh: a full fine-tune of the
#                0.5B on a few hundred rows lost its arithmetic)     (default 135m)
#   WORK         where runs go                        (default ~/.cache/kdpipe/quality)
#   OUT          the table's file                     (default bench-results/quality.md)
#   REUSE_REFERENCE 1: keep the teacher's and the untrained student's reports already in
#                WORK (a curve or more students added to a finished run)
#   REPORT_ONLY  1: run nothing, print the tables from WORK's reports (after rescoring a row
#                by hand, say)
# The paper's students see thousands of rows for many epochs; raise TRAIN_ROWS and EPOCHS
# (and run on a GPU box) to get closer to its setting.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$(pwd)"
. scripts/bench/data-dir.sh svamp/dev.jsonl gsm8k/train.jsonl tweeteval-emotion/train.jsonl tweeteval-emotion/val.jsonl
svamp_eval="${1:--}"
emotion_eval="${2:--}"
train_rows="${TRAIN_ROWS:-160}"
eval_rows="${EVAL_ROWS:-100}"
natural_rows="${NATURAL_ROWS:-374}"
epochs="${EPOCHS:-2}"
samples="${SAMPLES:-2}"
tasks="${TASKS:-svamp emotion}"
token_topk="${TOKEN_TOPK:-0}"
default_variants="label_only distill step_by_step step_by_step_kd"
[ "$token_topk" -gt 0 ] && default_variants+=" step_by_step_token_kd step_by_step_one_row"
variants="${VARIANTS-$default_variants}"
case " $variants " in
  *"_token_kd "*)
    if [ "$token_topk" -eq 0 ]; then
      echo "quality: the *_token_kd variants need the teacher's token top-k: set TOKEN_TOPK (e.g. 20)" >&2
      exit 2
    fi ;;
esac
curve="${CURVE:-}"
curve_variant="${CURVE_VARIANT:-step_by_step}"
work="${WORK:-$HOME/.cache/kdpipe/quality}"
out="${OUT:-bench-results/quality.md}"
model_file() { # 0.5b | 1.5b | 135m
  case "$1" in
    0.5b) echo "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf" ;;
    1.5b) echo "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf" ;;
    135m) echo "SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    *) echo "quality: unknown model $1 (known: 0.5b, 1.5b, 135m)" >&2; exit 2 ;;
  esac
}
teacher_model="$root/models/$(model_file "${TEACHER:-0.5b}")"
student_model="$root/models/$(model_file "${STUDENT:-135m}")"
[ "${TEACHER:-0.5b}" = 1.5b ] && large_models=1
# Token-level KD reads the teacher's own token ids where the two share a tokenizer (the
# Qwen2.5-Coder pair), and aligns the teacher's tokens to the student's by bytes otherwise.
token_kd=cross
case "${TEACHER:-0.5b}:${STUDENT:-135m}" in 1.5b:0.5b | 0.5b:0.5b) token_kd=same_vocab ;; esac
# The student's training knobs: the 135M trains whole, the 0.5B its LoRA adapters.
student_training="learning_rate = 1e-4"
student_title="$(basename "$student_model" .gguf)"
if [ "${STUDENT:-135m}" = 0.5b ]; then
  student_training="learning_rate = 2e-4
lora = { rank = 16, alpha = 32 }"
  student_title+=" (LoRA r 16)"
fi
mkdir -p "$work"
started=$(date +%s)
run_tasks="$tasks"
if [ -n "${REPORT_ONLY:-}" ]; then
  run_tasks=""
else
  . scripts/bench/binary.sh
  # Training pool and held-back rows, chosen by a fixed rule (no randomness to reproduce).
  python3 scripts/bench/heldout.py "$data" "$work"
fi

# One config per task; variants differ only in [finetune] and the run name.
# $decontaminate: the eval files of the task, as a TOML list (set per task below).
write_config() { # task name objective kd_weight [calculator] [teacher model] [student view] [gold] [token kd weight] [batch size] [labels]
  local task=$1 name=$2 objective=$3 kd=$4 calculator=${5:-false}
  local teacher_model=${6:-$teacher_model}
  local view=${7:-auto} gold=${8:-auto} token_kd_weight=${9:-0} batch_size=${10:-4} labels=${11:-teacher}
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
limit = ${limit:-$train_rows}
[task]
$taskdef
prompt = "$root/prompts/$([ "$task" = svamp ] && echo numeric || echo labels).md"
[teacher]
model = "$teacher_model"
$teacher
[generate]
$gen
token_topk = $token_topk
[curate]
split = [0.9, 0.1, 0.0]
gold = "$gold"
decontaminate = $decontaminate
[student]
model = "$student_model"
[finetune]
objective = "$objective"
labels = "$labels"
kd_weight = $kd
# Always written: left unset, a numeric task with a same-tokenizer pair would take
# token-level KD by default (src/config/recipe.rs), and the controls would not be controls.
kd_token_weight = $token_kd_weight
$([ "$token_kd_weight" = 0 ] || printf 'token_kd = "%s"' "$token_kd")
epochs = $epochs
$student_training
batch_size = $batch_size
max_seq_len = 192
# No resumable checkpoints: each is the weights and the optimizer state (~1.6 GB for
# SmolLM2), and a benchmark's variants are rerun whole.
checkpoint_every = 0
[eval]
calculator = $calculator
student_view = "$view"
EOF
}

# Score a run's models on the task's eval file, and emotion's also on the natural
# distribution; keep the reports as $work/<tag>.json and <tag>-natural.json, and each
# one's predictions next to it (<tag>.predictions.parquet: for paired comparisons; the
# run's own eval folder keeps only its last scoring).
score() { # config tag eval-args...
  local config=$1 tag=$2 name
  shift 2
  name=$(basename "$config" .toml)
  "$kdpipe" eval --config "$config" --file "$eval_file" "$@" >&2
  keep_eval "$name" "$tag"
  if [ -n "$natural_file" ]; then
    "$kdpipe" eval --config "$config" --file "$natural_file" "$@" >&2
    keep_eval "$name" "$tag-natural"
  fi
}

# Keep run $name's last scoring as $work/<tag>.json and <tag>.predictions.parquet.
keep_eval() { # name tag
  cp "$work/runs/$1/eval/report.json" "$work/$2.json"
  cp "$work/runs/$1/eval/predictions.parquet" "$work/$2.predictions.parquet"
}

# Train and score one student of a task. With `own`, the run curates its own copy of the
# task's teacher rows (the curve: generate keeps those of the first $limit inputs);
# otherwise it borrows the task's curated rows: gold and teacher labels on every row for
# label_only and distill, the rows agreeing with gold for the _gold variants, rationales
# on the rows curate keeps by default for the others.
train_variant() { # task variant name [own]
  local task=$1 variant=$2 name=$3 own=${4:-}
  local objective=$variant gold=auto kd=0 token_kd_weight=0 batch_size=4 labels=teacher
  case "$variant" in
    label_only | distill) gold=flag ;;
    step_by_step_kd) objective=step_by_step kd=0.5 ;;
    # live_teacher.sh's weight for stored token KD.
    step_by_step_token_kd) objective=step_by_step token_kd_weight=1.0 ;;
    # A row's two views fill a batch of 2: step_by_step_token_kd's optimizer steps
    # (its rows' three examples leave room for one row in a batch of 4).
    step_by_step_one_row) objective=step_by_step batch_size=2 ;;
    step_by_step_gold) objective=step_by_step gold=filter ;;
    step_by_step_gold_token_kd) objective=step_by_step gold=filter token_kd_weight=1.0 ;;
    # Gold labels on every row, the teacher's rationale where it reached gold.
    step_by_step_gold_labels) objective=step_by_step gold=flag labels=gold ;;
  esac
  write_config "$task" "$name" "$objective" "$kd" false "" auto "$gold" "$token_kd_weight" "$batch_size" "$labels"
  if [ -n "$own" ]; then
    borrow_generate "$task" "$name"
    "$kdpipe" generate --config "$work/$name.toml" >&2
    "$kdpipe" curate --config "$work/$name.toml" >&2
  elif [ "$gold" != auto ]; then
    borrow_curate "$task-$gold" "$name"
  else
    borrow_curate "$task" "$name"
  fi
  echo "quality: $task: training $name" >&2
  "$kdpipe" finetune --config "$work/$name.toml" >&2
  score "$work/$name.toml" "$name" --models student
  if [ "$task" = svamp ] && [ "$objective" = step_by_step ]; then
    write_config "$task" "$name" "$objective" "$kd" true "" auto "$gold" "$token_kd_weight" "$batch_size" "$labels"
    score "$work/$name.toml" "$name-calculator" --models student
  fi
}

# A fresh run holding the teacher rows of run $from.
borrow_generate() { # from to
  rm -rf "$work/runs/$2"
  mkdir -p "$work/runs/$2"
  cp -r "$work/runs/$1/generate" "$work/runs/$2/generate"
}

# A run that trains on the curated rows of run $from (same teacher rows and curate).
borrow_curate() { # from to
  rm -rf "$work/runs/$2/curate"
  mkdir -p "$work/runs/$2"
  cp -r "$work/runs/$1/curate" "$work/runs/$2/curate"
}

for task in $run_tasks; do
  heldout="$work/$task-heldout.jsonl"
  [ "$task" = svamp ] && [ "$svamp_eval" != - ] && heldout="$(realpath "$svamp_eval")"
  [ "$task" = emotion ] && [ "$emotion_eval" != - ] && heldout="$(realpath "$emotion_eval")"
  # Score EVAL_ROWS of them; the same rows for every model.
  head -n "$eval_rows" "$heldout" >"$work/$task-eval.jsonl"
  eval_file="$work/$task-eval.jsonl"
  natural_file=""
  decontaminate="[\"$eval_file\"]"
  if [ "$task" = emotion ] && [ "$emotion_eval" = - ]; then
    head -n "$natural_rows" "$work/emotion-heldout-natural.jsonl" >"$work/emotion-eval-natural.jsonl"
    natural_file="$work/emotion-eval-natural.jsonl"
    decontaminate="[\"$eval_file\", \"$natural_file\"]"
  fi
  calculator=$([ "$task" = svamp ] && echo true || echo false)

  echo "quality: $task: teacher rows, curation (default gold rule, gold = flag, gold = filter)" >&2
  # The untrained student never learned the rationale view: it answers in the label view
  # here, and reasons with the few-shot prompt in the next row.
  write_config "$task" "$task" step_by_step 0 "$calculator" "" label
  "$kdpipe" generate --config "$work/$task.toml" >&2
  "$kdpipe" curate --config "$work/$task.toml" >&2
  # The same teacher rows curated under the other gold rules, for the variants that train
  # on them (train_variant borrows $task-flag and $task-filter).
  for gold in flag filter; do
    write_config "$task" "$task-$gold" step_by_step 0 false "" label "$gold"
    borrow_generate "$task" "$task-$gold"
    "$kdpipe" curate --config "$work/$task-$gold.toml" >&2
  done
  if [ -n "${REUSE_REFERENCE:-}" ] && [ -f "$work/$task-reference.json" ] && [ -f "$work/$task-base-fewshot.json" ]; then
    echo "quality: $task: teacher and student before training: reports kept (REUSE_REFERENCE)" >&2
  else
    echo "quality: $task: teacher (SVAMP: also with the calculator) and student before training" >&2
    score "$work/$task.toml" "$task-reference" --models teacher,base --teacher run
    # The student before training, asked exactly as the teacher is: the few-shot prompt.
    write_config "$task" "$task-base-fewshot" step_by_step 0 false "$student_model"
    score "$work/$task-base-fewshot.toml" "$task-base-fewshot" --models teacher --teacher run
  fi

  for variant in $variants; do
    train_variant "$task" "$variant" "$task-$variant"
  done
  # The data-size curve: the same recipe on the first N inputs' teacher rows, curated anew
  # (generate finds every row of the first N inputs already written and reuses it).
  for n in $curve; do
    limit=$n train_variant "$task" "$curve_variant" "$task-$curve_variant-n$n" own
  done
done

mkdir -p "$(dirname "$out")"
elapsed=$(($(date +%s) - started))
[ -n "${REPORT_ONLY:-}" ] && elapsed=-1
python3 - "$work" "$elapsed" "$train_rows" "$eval_rows" "$epochs" "$samples" \
  "$(basename "$teacher_model" .gguf)" "$student_title" "$curve_variant" "$curve" $tasks <<'PY' | tee "$out"
import json, math, os, sys
work, elapsed, train_rows, eval_rows, epochs, samples, teacher, student, curve_variant, curve, *tasks = sys.argv[1:]

def wilson(p, n, z=1.96):
    """95 % Wilson score interval of an accuracy p over n rows, in percent."""
    if n == 0:
        return ""
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{100 * max(0, c - h):.0f}–{100 * min(1, c + h):.0f}"

def load(tag, suffix):
    path = f"{work}/{tag}{suffix}.json"
    return json.load(open(path)) if os.path.exists(path) else None

def train_seconds_of(run):
    """The student's training time, from its finetune manifest."""
    path = f"{work}/runs/{run}/finetune/manifest.json"
    return f"{json.load(open(path))['summary']['seconds']:.0f}" if os.path.exists(path) else ""

def train_rows_of(run):
    cur = json.load(open(f"{work}/runs/{run}/curate/report.json"))
    return cur.get("splits", {}).get("train", "")

pick = lambda rep, key: next((m for m in rep["models"] if m["key"] == key), None)
variants = [("label_only", "student label_only (gold labels, all rows)"),
            ("distill", "student distill (teacher labels, all rows)"),
            ("step_by_step", "student step_by_step"),
            ("step_by_step_kd", "student step_by_step + KD on soft labels"),
            ("step_by_step_token_kd", "student step_by_step + token-level KD"),
            ("step_by_step_one_row", "student step_by_step, one row a step (token KD's steps)"),
            ("step_by_step_gold", "student step_by_step on the rows agreeing with gold"),
            ("step_by_step_gold_token_kd", "student step_by_step + token-level KD on the rows agreeing with gold"),
            ("step_by_step_gold_labels", "student step_by_step, gold labels on all rows, rationales where the teacher agrees")]

print(f"# Quality: teacher {teacher}, student {student}\n")
print(f"`scripts/bench/quality.sh`: {train_rows} teacher inputs per task, up to {eval_rows} held-back rows scored, "
      f"{epochs} epoch{'' if epochs == '1' else 's'}, SVAMP samples {samples}; training rows decontaminated against the eval files; "
      + (f"wall time {int(elapsed) // 60} min on this machine.\n" if int(elapsed) >= 0
         else "tables printed from the work folder's reports (REPORT_ONLY).\n"))
for suffix, title in [("", "held-back rows (emotion: balanced across labels)"),
                      ("-natural", "emotion, val.jsonl's natural label distribution")]:
    table = []
    for task in tasks:
        ref = load(f"{task}-reference", suffix)
        if ref is None:
            continue
        fewshot = load(f"{task}-base-fewshot", suffix)
        gold_filtered = task == "svamp"
        rows = [("teacher few-shot", pick(ref, "teacher"), "", ""),
                ("teacher few-shot, calculator", pick(ref, "teacher_calculator"), "", ""),
                ("student before training, few-shot prompt", pick(fewshot, "teacher"), "", ""),
                ("student before training, student prompt", pick(ref, "base"), "", "")]
        for v, label in variants:
            if v.startswith("step_by_step") and gold_filtered and "_gold" not in v:
                label += " (rows agreeing with gold)"
            rep = load(f"{task}-{v}", suffix)
            if rep is None:
                continue
            n = train_rows_of(f"{task}-{v}")
            secs = train_seconds_of(f"{task}-{v}")
            rows.append((label, rep["models"][0], n, secs))
            calc = load(f"{task}-{v}-calculator", suffix)
            if calc:
                rows.append((label + ", calculator", calc["models"][0], n, secs))
        for label, m, n, secs in rows:
            if m is None:
                continue
            if m.get("rescued"):
                # As generate does: its top-scored label replaced an answer outside the set.
                label += f" ({m['rescued']} off-label answers rescued by its label scores)"
            f1 = m.get("labels") or {}
            f1 = f"{f1['macro_f1']:.3f}" if f1 else "—"
            how = "rationale" if ("rationale" in m["decode"] or m["key"].startswith("teacher")) else "label"
            if m["rows"] != ref["rows"]:
                # A report from another scoring (REUSE_REFERENCE across a change of
                # EVAL_ROWS or NATURAL_ROWS): its interval is over its own rows.
                label += f" ({m['rows']} rows)"
            ci = wilson(m["accuracy"], m["rows"])
            table.append(f"| {task} | {label} | {how} | {100 * m['accuracy']:.1f} % | {ci} | {f1} | "
                         f"{100 * m['parse_failure_rate']:.1f} % | {n} | {secs} | {m['seconds_per_example']:.2f} |")
        table.append(f"| {task} | (rows scored: {ref['rows']}) | | | | | | | | |")
    if not table:
        continue
    print(f"## {title}\n")
    print("| task | model | answers in | accuracy | 95 % CI | macro-F1 | no answer | train rows | train s | s / example |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(table))
    print()

# The data-size curve: accuracy of one recipe against the teacher inputs it learned from.
for task in tasks:
    points = [(int(n), f"{task}-{curve_variant}-n{n}") for n in curve.split()]
    points.append((int(train_rows), f"{task}-{curve_variant}"))
    # A second column where the full run has one: emotion's natural distribution, SVAMP's
    # calculator (step-by-step recipes only).
    suffix, second = {"emotion": ("-natural", " natural distribution |"),
                      "svamp": ("-calculator", " with the calculator |")}.get(task, ("", ""))
    suffixes = ("", suffix) if suffix and load(f"{task}-{curve_variant}", suffix) else ("",)
    cells = []
    for inputs, tag in sorted(points):
        reps = [load(tag, s) for s in suffixes]
        if reps[0] is None:
            continue
        accs = [f"{100 * r['models'][0]['accuracy']:.1f} % ({wilson(r['models'][0]['accuracy'], r['rows'])})"
                if r else "—" for r in reps]
        cells.append(f"| {task} | {inputs} | {train_rows_of(tag)} | {train_seconds_of(tag)} | " + " | ".join(accs) + " |")
    if len(cells) < 2:
        continue
    second = second if len(suffixes) == 2 else ""
    print(f"## Data-size curve, {task}: student {curve_variant}\n")
    print("| task | teacher inputs | train rows | train s | accuracy (95 % CI) |" + second)
    print("|---|---:|---:|---:|---:|" + ("---:|" if second else ""))
    print("\n".join(cells))
    print()
PY
