# Sourced by the curate benchmarks (curate.sh, curate_scale.sh): the settings of the
# curate benchmark, every rule with work to do on the synthetic rows of
# examples/synth_teacher_rows.rs (curate_polars.py's arguments in curate.py match them).
# Usage: `write_curate_bench_config FILE` (FILE's folder holds eval.jsonl and runs/).
write_curate_bench_config() {
  cat >"$1" <<TOML
name = "bench"
seed = 0
[data]
inputs = ["eval.jsonl"]
input_field = "question"
[task]
kind = "numeric"
[teacher]
model = "unused"
[curate]
min_agreement = 0.5
gold = "filter"
keep_rationales = "all"
min_confidence = 0.0
min_rationale_chars = 1
max_rationale_chars = 4000
near_dup_threshold = 0.8
shingle_words = 3
decontaminate = ["eval.jsonl"]
decontaminate_ngram = 13
split = [0.8, 0.1, 0.1]
[student]
model = "unused"
TOML
}
