//! The TOML job config: sections [data] [task] [teacher] [generate] [curate] [student]
//! [finetune] [eval]. Every field has its default here, with a one-line why; unknown keys
//! are errors. `resolve` applies CLI overrides once, then every stage reads the result.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of the run: outputs go to `<runs_dir>/<name>/<stage>/`.
    #[serde(default = "d_name")]
    pub name: String,
    /// Where runs are written, relative to the working directory.
    #[serde(default = "d_runs_dir")]
    pub runs_dir: PathBuf,
    /// One seed for splits, shuffling and sampling, so a run can be repeated exactly.
    #[serde(default)]
    pub seed: u64,
    pub data: DataConfig,
    pub task: TaskConfig,
    pub teacher: TeacherConfig,
    /// More teachers (`[[ensemble]]`, each a full teacher section, local and API mixed):
    /// every input is answered by each; curate votes across them, weighted by `weight`.
    #[serde(default)]
    pub ensemble: Vec<TeacherConfig>,
    #[serde(default)]
    pub generate: GenerateConfig,
    #[serde(default)]
    pub curate: CurateConfig,
    pub student: StudentConfig,
    #[serde(default)]
    pub finetune: FinetuneConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    /// Optional: write the inputs with the teacher from a few seed examples first.
    #[serde(default)]
    pub synthesize: Option<SynthesizeConfig>,
}

/// Input synthesis, Self-Instruct style (Wang et al., 2023): the teacher writes new task
/// inputs from a few seeds, shown a rotating subset of the seeds and of its own accepted
/// inputs; filters keep well-formed, new, uncontaminated ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthesizeConfig {
    /// Seed examples (JSONL, Parquet or CSV with the [data] field names), 5 to 20 rows.
    pub seeds: Vec<PathBuf>,
    /// Accepted inputs wanted.
    #[serde(default = "d_synth_target")]
    pub target: usize,
    /// Seeds shown in each request (a different random subset each time).
    #[serde(default = "d_synth_seed_examples")]
    pub seed_examples: usize,
    /// Accepted inputs shown too, once there are some: new topics beget new topics.
    #[serde(default = "d_one")]
    pub accepted_examples: usize,
    /// High enough for variety; the filters catch what goes wrong.
    #[serde(default = "d_synth_temperature")]
    pub temperature: f64,
    #[serde(default = "d_synth_tokens")]
    pub max_tokens: usize,
    /// Bounds on an input's length, in characters.
    #[serde(default = "d_synth_min_chars")]
    pub min_chars: usize,
    #[serde(default = "d_synth_max_chars")]
    pub max_chars: usize,
    /// Jaccard similarity of word 3-shingles at which a new input is a near duplicate of a
    /// seed or of an accepted input. 0.5 here is stricter than Self-Instruct's ROUGE-L 0.7:
    /// one changed number in a short word problem scores about 0.6.
    #[serde(default = "d_synth_near")]
    pub near_dup_threshold: f64,
    /// Evaluation files (with the [data] input field) no synthesized input may share a
    /// 13-word sequence with.
    #[serde(default)]
    pub decontaminate: Vec<PathBuf>,
    /// Requests sent together; accepted inputs are saved after each round (resume point).
    #[serde(default = "d_synth_round")]
    pub requests_per_round: usize,
    /// Give up after this many requests (default 5 × target).
    #[serde(default)]
    pub max_requests: Option<usize>,
}

fn d_synth_target() -> usize {
    100
}
fn d_synth_seed_examples() -> usize {
    3
}
fn d_synth_temperature() -> f64 {
    0.9
}
fn d_synth_tokens() -> usize {
    160
}
fn d_synth_min_chars() -> usize {
    20
}
fn d_synth_max_chars() -> usize {
    1000
}
fn d_synth_near() -> f64 {
    0.5
}
fn d_synth_round() -> usize {
    8
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Input files: JSONL, Parquet or CSV, told apart by extension. May be left out with
    /// [synthesize]: the synthesized inputs are read then.
    #[serde(default)]
    pub inputs: Vec<PathBuf>,
    /// Field holding a unique row id; when absent, ids are `<file stem>-<line>`.
    #[serde(default)]
    pub id_field: Option<String>,
    /// Field holding the text the model answers (question, tweet, ...).
    pub input_field: String,
    /// Field holding the gold answer, if the data has one (used by curate and eval).
    #[serde(default)]
    pub gold_field: Option<String>,
    /// Use only the first N rows: quick trials before a full run.
    #[serde(default)]
    pub limit: Option<usize>,
    /// An input longer than this (characters) is an error naming its row, caught before
    /// any teacher call.
    #[serde(default = "d_max_input_chars")]
    pub max_input_chars: usize,
}

fn d_max_input_chars() -> usize {
    100_000
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Numeric,
    Labels,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub kind: TaskKind,
    /// The fixed answer set of a label task, as the model should write it.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Relative tolerance for numeric answers: 1e-6 accepts float noise, not rounding.
    #[serde(default = "d_tolerance")]
    pub tolerance: f64,
    /// One sentence saying what the task is; shown to teacher and student.
    #[serde(default)]
    pub description: String,
    /// Prompt template file; default `prompts/<kind>.md`.
    #[serde(default)]
    pub prompt: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TeacherKind {
    Local,
    /// Any OpenAI-compatible chat completions server: vLLM, llama.cpp, OpenAI, ...
    Openai,
}

/// Which engine serves a `local` teacher.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LocalEngine {
    /// `batched` when the model is llama or qwen2 and its f32 weights take at most half
    /// the memory available; `mistralrs` otherwise.
    #[default]
    Auto,
    /// kdpipe's own decoder, f32, `batch` sequences decoded together.
    Batched,
    /// mistralrs, one request at a time, quantized weights as stored.
    Mistralrs,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    /// `local`: a model in this process (GGUF file or Hugging Face model directory).
    #[serde(default = "d_teacher_kind")]
    pub kind: TeacherKind,
    /// `local`: "auto", "batched" (kdpipe's decoder) or "mistralrs".
    #[serde(default)]
    pub engine: LocalEngine,
    /// `local`, batched engine: sequences decoded together. More keeps the CPU's matrix
    /// units busier and holds more key/value caches in memory.
    #[serde(default = "d_local_batch")]
    pub batch: usize,
    /// This teacher's vote in curate's self-consistency when several teachers answer
    /// (`[[ensemble]]`), and its weight in their averaged label-set soft labels.
    #[serde(default = "d_one_f")]
    pub weight: f64,
    /// A GGUF file path, a Hugging Face model directory, or a hub id.
    pub model: String,
    /// Cap on generated tokens a row: a rationale plus an answer line fits in 256.
    #[serde(default = "d_max_tokens")]
    pub max_tokens: usize,
    /// 0 = greedy: one deterministic rationale per input.
    #[serde(default)]
    pub temperature: f64,
    /// Score every label after the rationale (label tasks): a soft label that works across
    /// tokenizers and rescues answers written outside the label set.
    #[serde(default = "d_true")]
    pub label_scores: bool,
    /// `openai`: the server's base URL, up to and including `/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// `openai`: the name of the environment variable holding the API key (never the key).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// `openai`: requests in flight at once; vLLM batches them, so 8–64 keep it busy.
    #[serde(default = "d_max_in_flight")]
    pub max_in_flight: usize,
    /// `openai`: requests-per-minute limit of the account (none: unlimited).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// `openai`: tokens-per-minute limit (prompt estimate + max_tokens counted a request).
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// `openai`: seconds before a request is abandoned and retried.
    #[serde(default = "d_timeout")]
    pub timeout_s: f64,
    /// `openai`: retries of one request (429, 5xx, timeouts, broken bodies) before the run stops.
    #[serde(default = "d_max_retries")]
    pub max_retries: u32,
    /// `openai`: first backoff in seconds; doubles each retry (jittered, capped at 60 s).
    #[serde(default = "d_retry_base")]
    pub retry_base_s: f64,
    /// Price in currency units per million tokens, for `generate --dry-run` cost estimates.
    #[serde(default)]
    pub price_per_mtok: Option<Price>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// Rationales per input (self-consistency); more than one needs `teacher.temperature` > 0.
    #[serde(default = "d_samples")]
    pub samples: usize,
    /// Keep the top-k alternatives of every generated token (token-level KD); 0 = off,
    /// at most 20 (the OpenAI API's limit). A million rows × 256 tokens × k adds up.
    #[serde(default)]
    pub token_topk: usize,
    /// Rows buffered before they are written to a part file: a kill loses at most these.
    #[serde(default = "d_flush_rows")]
    pub flush_rows: usize,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        toml::from_str("").expect("every generate field has a default")
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GoldRule {
    /// `filter` for numeric tasks, `flag` for label tasks: a number that disagrees with
    /// gold is wrong, and so is the rationale that reached it (on SVAMP, 54 % of the
    /// teacher's kept rows; training on them taught the student wrong steps), while a
    /// label task's gold is often one annotator's call, which the teacher may fairly
    /// dispute.
    Auto,
    /// Ignore gold.
    Off,
    /// Keep every row and record `agrees_with_gold` (null where there is no gold).
    Flag,
    /// Keep only rows whose answer matches gold (rows without gold are kept); applied
    /// before the vote, so a sample that reached gold is kept even when most missed it.
    Filter,
}

impl GoldRule {
    /// The rule for a task of `kind`, `auto` resolved.
    pub fn resolve(self, kind: TaskKind) -> GoldRule {
        match (self, kind) {
            (GoldRule::Auto, TaskKind::Numeric) => GoldRule::Filter,
            (GoldRule::Auto, TaskKind::Labels) => GoldRule::Flag,
            (rule, _) => rule,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeepRationales {
    /// One rationale an input: the first sample that gave the majority answer.
    One,
    /// Every sample that gave the majority answer (more rationales, same label).
    All,
}

/// Each rule can be switched off or tuned; the report counts what each one removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurateConfig {
    /// Parse failures carry no usable label: drop them (counted by reason in the report).
    #[serde(default = "d_true")]
    pub drop_parse_failures: bool,
    /// Self-consistency (k > 1 samples): keep inputs whose majority answer has at least
    /// this share of the samples. 0.5 keeps inputs where most samples agree.
    #[serde(default)]
    pub min_agreement: f64,
    /// Rationales kept an input once the majority answer is known: "all" (the default:
    /// distinct reasoning paths to one answer help a small student, Ho et al. 2023,
    /// "Large Language Models Are Reasoning Teachers") or "one".
    #[serde(default = "d_keep_rationales")]
    pub keep_rationales: KeepRationales,
    /// Agreement with gold (when the data has gold): "auto" (filter for numeric tasks,
    /// flag for label tasks), "off", "flag" (record it) or "filter" (keep the samples
    /// that reached the gold answer).
    #[serde(default = "d_gold")]
    pub gold: GoldRule,
    /// Drop rows whose soft-label probability of their own answer (renormalized over the
    /// soft labels) is below this; rows without a soft label are kept.
    #[serde(default)]
    pub min_confidence: f64,
    /// Rationale length bounds in characters: an empty or runaway rationale teaches nothing.
    #[serde(default = "d_min_chars")]
    pub min_rationale_chars: usize,
    #[serde(default = "d_max_chars")]
    pub max_rationale_chars: usize,
    /// Upper bound on the teacher's completion tokens (none: no bound).
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Numeric tasks: the rationale must state the final answer as a number.
    #[serde(default = "d_true")]
    pub require_answer_in_rationale: bool,
    /// Numeric tasks: every equation written in the rationale (`12 + 7 = 19`) must hold.
    #[serde(default = "d_true")]
    pub check_arithmetic: bool,
    /// The same input (after normalizing case, punctuation and spacing) under two ids is
    /// kept once: it would be trained twice and could leak across splits.
    #[serde(default = "d_true")]
    pub dedup_inputs: bool,
    /// Near-duplicate inputs (MinHash estimate of Jaccard similarity over word shingles at
    /// or above this) are kept once, and all of a cluster's rows get the same split; 0
    /// switches the rule off.
    #[serde(default = "d_near_dup")]
    pub near_dup_threshold: f64,
    /// Words a shingle for near-duplicate detection.
    #[serde(default = "d_shingle")]
    pub shingle_words: usize,
    /// Evaluation files (JSONL, Parquet, CSV) whose texts must not leak into the curated
    /// data: a row sharing an n-gram with any of them is dropped.
    #[serde(default)]
    pub decontaminate: Vec<PathBuf>,
    /// The text field of those files (default: [data] input_field).
    #[serde(default)]
    pub decontaminate_field: Option<String>,
    /// n-gram length for decontamination: 13 words, as NeMo Curator and GPT-3's study.
    #[serde(default = "d_ngram")]
    pub decontaminate_ngram: usize,
    /// Label tasks: keep at most this many rows of each answer label (class balance).
    #[serde(default)]
    pub max_per_label: Option<usize>,
    /// Shares of train / val / test, by a hash of the input's near-duplicate cluster.
    #[serde(default = "d_split")]
    pub split: [f64; 3],
}

impl Default for CurateConfig {
    fn default() -> Self {
        toml::from_str("").expect("every curate field has a default")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    /// A GGUF file (dequantized for training) or a Hugging Face model directory.
    pub model: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// α·CE(label view) + (1−α)·CE(rationale view), on teacher labels and rationales.
    StepByStep,
    /// CE on the teacher's label only.
    Distill,
    /// CE on gold labels only: the baseline every report compares against.
    LabelOnly,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    #[serde(default = "d_objective")]
    pub objective: Objective,
    /// Weight of the label view; the paper's default 0.5 weighs both views equally.
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// AdamW learning rate: 5e-5 moves a 135M model in a few dozen steps without wrecking it.
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_weight_decay")]
    pub weight_decay: f64,
    /// Passes over the training rows.
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Stop after this many optimizer steps even if epochs remain.
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Measure the val loss every N steps (0: only before and after training); the
    /// weights with the lowest val loss are the ones exported.
    #[serde(default)]
    pub eval_every: usize,
    /// Stop when this many evaluations in a row did not lower the val loss (none: never).
    #[serde(default)]
    pub early_stopping_patience: Option<usize>,
    /// Sequences a step (both views count): 4 fits a laptop's memory for a 135M model.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Longer examples are truncated from the left of the prompt.
    #[serde(default = "d_seq")]
    pub max_seq_len: usize,
    /// Freeze token embeddings (and a tied lm_head): a quarter of SmolLM2's weights, the
    /// part a few hundred rows cannot improve; halves optimizer time.
    #[serde(default = "d_true")]
    pub freeze_embeddings: bool,
    /// Micro-batches whose gradients are averaged into one optimizer step: a larger
    /// effective batch without the memory.
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    /// Clip the gradients' global L2 norm to this (0: no clipping): one odd batch cannot
    /// wreck the model.
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// Write a checkpoint every N optimizer steps (0: none); a killed run resumes from the
    /// latest one with the same loss curve.
    #[serde(default = "d_checkpoint")]
    pub checkpoint_every: usize,
    /// Weight λ of the knowledge-distillation term (0: off): the divergence between the
    /// teacher's soft label and the student's probabilities of the same answers (each
    /// answer's sequence log-probability, renormalized), on rows with ≥ 2 soft answers.
    #[serde(default)]
    pub kd_weight: f64,
    /// Weight of token-level KD (0: off): on rows whose teacher kept its tokens' top-k
    /// (`[generate] token_topk`), the forward KL from the teacher's top-k distribution at
    /// each generated token (renormalized over its k tokens: the mass outside them is
    /// dropped) to the student's, on the teacher's own text in the rationale view. Needs
    /// the teacher's tokenizer (checked at start): self-distillation, or one model family.
    #[serde(default)]
    pub kd_token_weight: f64,
    /// Temperature T of the KD term (both sides softened; the term is scaled by T²).
    #[serde(default = "d_one_f")]
    pub kd_temperature: f64,
    #[serde(default = "d_divergence")]
    pub kd_divergence: Divergence,
    /// β of the generalized Jensen–Shannon divergence (`kd_divergence = "jsd"`).
    #[serde(default = "d_half")]
    pub jsd_beta: f64,
    /// Train LoRA adapters instead of the full model (`lora = { rank = 16, alpha = 32 }`);
    /// they are merged into the weights on export.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Where the student trains: "cpu", or "cuda" / "cuda:N" (GPU N) in a build with
    /// `--features cuda`.
    #[serde(default = "d_device")]
    pub device: String,
    /// The arithmetic of the training step's matrix products: "f32", or "bf16" (mixed
    /// precision: bf16 operands, f32 sums, f32 master weights and everything else).
    #[serde(default)]
    pub precision: Precision,
}

/// The arithmetic of a training step's matrix products.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// The products of every linear layer, of attention (on the CPU) and of the vocabulary
    /// head, forward and backward, take operands rounded to bfloat16 and sum in f32 (as
    /// PyTorch's CPU autocast). Weights, optimizer moments, activations, the softmax, norms
    /// and losses stay f32. On a CPU it needs AVX512-BF16, where the products run about
    /// 1.5× faster.
    Bf16,
}

/// Where LoRA goes and how big it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r of the adapters.
    pub rank: usize,
    /// Scale numerator: the adapter's output is multiplied by alpha / r.
    pub alpha: f64,
    /// Linear layers that get adapters, by their last name part.
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// Dropout on the adapters' input during training (as PEFT's lora_dropout). Masks are
    /// drawn from the run seed and the step, so a resumed run draws the same ones.
    #[serde(default)]
    pub dropout: f64,
}

/// Every linear layer of a llama-family block.
pub fn default_targets() -> Vec<String> {
    [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Which divergence the KD term measures between the teacher's distribution p and the
/// student's q.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// KL(p ‖ q): the student covers every answer the teacher gives weight to.
    ForwardKl,
    /// KL(q ‖ p): the student concentrates on the teacher's main answers.
    ReverseKl,
    /// β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p + (1−β)·q (generalized JSD, as in GKD).
    Jsd,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        toml::from_str("").expect("every finetune field has a default")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// The curated split to score (when `files` is empty).
    #[serde(default = "d_eval_split")]
    pub split: String,
    /// Score these files instead of a curated split: JSONL, Parquet or CSV with the
    /// `[data]` field names (input and gold). `kdpipe eval --file` sets them too.
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// Score only the first N rows (quick checks, benchmarks). Eval files fall back on
    /// [data] limit when this is unset.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Which models to score: "student" (trained), "base" (the student before training),
    /// "teacher".
    #[serde(default = "d_eval_models")]
    pub models: Vec<EvalModel>,
    /// Where the teacher's answers come from: "generated" (the rows generate wrote; a
    /// curated split only, free) or "run" (the teacher answers the rows now, greedy, with
    /// the step-by-step prompt).
    #[serde(default = "d_eval_teacher")]
    pub teacher: TeacherSource,
    /// How the student answers: "greedy" (decode the label view) or "label_scores" (label
    /// tasks: the label whose tokens the student finds most likely; never a parse failure).
    #[serde(default = "d_student_decode")]
    pub student_decode: StudentDecode,
    /// Which view the student answers in: "label" (the answer alone, as the paper infers)
    /// or "rationale" (its reasoning, then `Answer: X`; a step_by_step student learned to
    /// write both). "auto": rationale for a step_by_step student of a numeric task, label
    /// otherwise.
    #[serde(default = "d_student_view")]
    pub student_view: StudentView,
    /// Tokens the student may generate per example. Default: 12 in the label view (an
    /// answer is a few tokens; more only costs time), 160 in the rationale view.
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// Numeric tasks in the rationale view: kdpipe writes the result of each equation the
    /// student leaves open (`3 * 4 =`), so its accuracy measures the reasoning, not the
    /// digits. Off by default: the figure is then the model's alone.
    #[serde(default)]
    pub calculator: bool,
}

impl EvalConfig {
    /// How many tokens the student may generate in `view`.
    pub fn new_tokens(&self, view: StudentView) -> usize {
        self.max_new_tokens.unwrap_or(match view {
            StudentView::Rationale => 160,
            _ => 12,
        })
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StudentView {
    Auto,
    Label,
    Rationale,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EvalModel {
    Student,
    Base,
    Teacher,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TeacherSource {
    Generated,
    Run,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StudentDecode {
    Greedy,
    LabelScores,
}

fn d_eval_models() -> Vec<EvalModel> {
    vec![EvalModel::Teacher, EvalModel::Base, EvalModel::Student]
}
fn d_eval_teacher() -> TeacherSource {
    TeacherSource::Generated
}
fn d_student_decode() -> StudentDecode {
    StudentDecode::Greedy
}

impl Default for EvalConfig {
    fn default() -> Self {
        toml::from_str("").expect("every eval field has a default")
    }
}

fn d_name() -> String {
    "default".into()
}
fn d_runs_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn d_tolerance() -> f64 {
    1e-6
}
fn d_teacher_kind() -> TeacherKind {
    TeacherKind::Local
}
fn d_max_tokens() -> usize {
    256
}
fn d_one() -> usize {
    1
}
fn d_one_f() -> f64 {
    1.0
}
fn d_half() -> f64 {
    0.5
}
fn d_clip() -> f64 {
    1.0
}
fn d_checkpoint() -> usize {
    20
}
fn d_divergence() -> Divergence {
    Divergence::ForwardKl
}
fn d_keep_rationales() -> KeepRationales {
    KeepRationales::All
}
fn d_gold() -> GoldRule {
    GoldRule::Auto
}
fn d_min_chars() -> usize {
    1
}
fn d_max_chars() -> usize {
    4000
}
fn d_near_dup() -> f64 {
    0.8
}
fn d_shingle() -> usize {
    3
}
fn d_ngram() -> usize {
    13
}
fn d_max_in_flight() -> usize {
    8
}
fn d_device() -> String {
    "cpu".into()
}
fn d_local_batch() -> usize {
    BATCH_DEFAULT
}
/// Chosen by `scripts/bench/teacher.sh` (see bench-results/teacher.md).
const BATCH_DEFAULT: usize = 32;
fn d_timeout() -> f64 {
    120.0
}
fn d_max_retries() -> u32 {
    8
}
fn d_retry_base() -> f64 {
    1.0
}
fn d_samples() -> usize {
    1
}
fn d_flush_rows() -> usize {
    16
}
fn d_true() -> bool {
    true
}
fn d_split() -> [f64; 3] {
    [0.8, 0.1, 0.1]
}
fn d_objective() -> Objective {
    Objective::StepByStep
}
fn d_alpha() -> f64 {
    0.5
}
fn d_lr() -> f64 {
    5e-5
}
fn d_weight_decay() -> f64 {
    0.0
}
fn d_epochs() -> usize {
    2
}
fn d_batch() -> usize {
    4
}
fn d_seq() -> usize {
    256
}
fn d_eval_split() -> String {
    "test".into()
}
fn d_student_view() -> StudentView {
    StudentView::Auto
}

/// Overrides from the command line; each `None` keeps the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub eval_files: Vec<PathBuf>,
    pub eval_teacher: Option<TeacherSource>,
    pub eval_models: Option<Vec<EvalModel>>,
    pub name: Option<String>,
    pub runs_dir: Option<PathBuf>,
    pub limit: Option<usize>,
    pub teacher_model: Option<String>,
    pub student_model: Option<String>,
    pub max_steps: Option<usize>,
}

impl Config {
    /// Read a config file, apply overrides and validate, naming the file in every error.
    pub fn resolve(path: &Path, overrides: &Overrides) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "invalid config {}: {}",
                path.display(),
                e.to_string().trim_end()
            )
        })?;
        if let Some(v) = &overrides.name {
            cfg.name = v.clone();
        }
        if let Some(v) = &overrides.runs_dir {
            cfg.runs_dir = v.clone();
        }
        if let Some(v) = overrides.limit {
            cfg.data.limit = Some(v);
        }
        if let Some(v) = &overrides.teacher_model {
            cfg.teacher.model = v.clone();
        }
        if let Some(v) = &overrides.student_model {
            cfg.student.model = v.clone();
        }
        if let Some(v) = overrides.max_steps {
            cfg.finetune.max_steps = Some(v);
        }
        if !overrides.eval_files.is_empty() {
            cfg.eval.files = overrides.eval_files.clone();
        }
        if let Some(v) = overrides.eval_teacher {
            cfg.eval.teacher = v;
        }
        if let Some(v) = &overrides.eval_models {
            cfg.eval.models = v.clone();
        }
        // With [synthesize] and no inputs of its own, generate reads the synthesized ones.
        if cfg.synthesize.is_some() && cfg.data.inputs.is_empty() {
            cfg.data.inputs = vec![cfg.synthesized_inputs()];
        }
        cfg.validate()
            .with_context(|| format!("invalid config {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.task.kind == TaskKind::Labels && self.task.labels.len() < 2 {
            bail!("[task] kind = \"labels\" needs `labels` with at least two labels");
        }
        self.validate_teacher()?;
        if self.data.inputs.is_empty() {
            bail!("[data] inputs is empty: name at least one JSONL, Parquet or CSV file (or add [synthesize] to have the teacher write them)");
        }
        if let Some(s) = &self.synthesize {
            if s.seeds.is_empty() || s.target == 0 || s.seed_examples == 0 {
                bail!("[synthesize] needs seeds, and target and seed_examples of at least 1");
            }
            if !(0.0..=1.0).contains(&s.near_dup_threshold) || s.min_chars > s.max_chars {
                bail!(
                    "[synthesize] near_dup_threshold must be in [0, 1] and min_chars ≤ max_chars"
                );
            }
        }
        let c = &self.curate;
        if !(0.0..=1.0).contains(&c.min_agreement) || !(0.0..=1.0).contains(&c.min_confidence) {
            bail!("[curate] min_agreement and min_confidence are shares in [0, 1]");
        }
        if !(0.0..=1.0).contains(&c.near_dup_threshold) || c.shingle_words == 0 {
            bail!("[curate] near_dup_threshold must be in [0, 1] and shingle_words at least 1");
        }
        if c.decontaminate_ngram == 0 {
            bail!("[curate] decontaminate_ngram must be at least 1");
        }
        let s = self.curate.split;
        if s.iter().any(|x| *x < 0.0) || (s.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
            bail!("[curate] split must be three non-negative shares summing to 1, got {s:?}");
        }
        if !(0.0..=1.0).contains(&self.finetune.alpha) {
            bail!(
                "[finetune] alpha must be in [0, 1], got {}",
                self.finetune.alpha
            );
        }
        let f = &self.finetune;
        crate::finetune::parse_device(&f.device)?;
        if f.grad_accum == 0 || f.batch_size == 0 {
            bail!("[finetune] batch_size and grad_accum must be at least 1");
        }
        if !(f.learning_rate > 0.0 && f.learning_rate.is_finite()) {
            bail!(
                "[finetune] learning_rate must be greater than 0, got {}",
                f.learning_rate
            );
        }
        if f.max_seq_len < 16 {
            bail!(
                "[finetune] max_seq_len must be at least 16 tokens (prompt and reply share it), got {}",
                f.max_seq_len
            );
        }
        if let Some(l) = &f.lora {
            if l.rank == 0 || l.alpha <= 0.0 || !(0.0..1.0).contains(&l.dropout) {
                bail!("[finetune.lora] rank must be at least 1, alpha greater than 0 and dropout in [0, 1)");
            }
        }
        if f.kd_token_weight < 0.0 {
            bail!("[finetune] kd_token_weight must be ≥ 0");
        }
        if f.kd_weight < 0.0 || f.kd_temperature <= 0.0 || !(0.0..=1.0).contains(&f.jsd_beta) {
            bail!("[finetune] kd_weight must be ≥ 0, kd_temperature > 0 and jsd_beta in [0, 1]");
        }
        if !["train", "val", "test"].contains(&self.eval.split.as_str()) {
            bail!(
                "[eval] split must be train, val or test, got {:?}",
                self.eval.split
            );
        }
        self.validate_eval()
    }

    fn validate_eval(&self) -> Result<()> {
        let e = &self.eval;
        if e.models.is_empty() {
            bail!(
                "[eval] models is empty: name at least one of \"student\", \"base\", \"teacher\""
            );
        }
        if e.student_decode == StudentDecode::LabelScores && self.task.kind != TaskKind::Labels {
            bail!("[eval] student_decode = \"label_scores\" needs a label task ([task] kind = \"labels\")");
        }
        if e.student_decode == StudentDecode::LabelScores
            && self.student_view() == StudentView::Rationale
        {
            bail!("[eval] student_decode = \"label_scores\" scores the labels right after the prompt, so it needs student_view = \"label\" (or \"auto\"), not \"rationale\"");
        }
        if !e.files.is_empty() && self.data.gold_field.is_none() {
            bail!("[eval] files need gold answers: set [data] gold_field to the field that holds them");
        }
        Ok(())
    }

    /// Every teacher, `[teacher]` first: teacher i writes samples i·k … i·k + k − 1 of an
    /// input (k = `[generate] samples`).
    pub fn teachers(&self) -> Vec<&TeacherConfig> {
        std::iter::once(&self.teacher)
            .chain(&self.ensemble)
            .collect()
    }

    fn validate_teacher(&self) -> Result<()> {
        let g = &self.generate;
        let mut models = std::collections::HashSet::new();
        for t in self.teachers() {
            if !models.insert(&t.model) {
                bail!("[[ensemble]] names the teacher {:?} twice: rows are told apart by the teacher's model", t.model);
            }
            if !(t.weight > 0.0 && t.weight.is_finite()) {
                bail!("teacher {:?}: weight must be greater than 0", t.model);
            }
            self.validate_one_teacher(t)?;
        }
        if g.samples == 0 {
            bail!("[generate] samples must be at least 1");
        }
        Ok(())
    }

    fn validate_one_teacher(&self, t: &TeacherConfig) -> Result<()> {
        let g = &self.generate;
        if g.samples == 0 {
            bail!("[generate] samples must be at least 1");
        }
        if g.samples > 1 && t.temperature <= 0.0 {
            bail!(
                "[generate] samples = {} needs [teacher] temperature > 0: greedy decoding writes the same rationale every time",
                g.samples
            );
        }
        if g.token_topk > 20 {
            bail!(
                "[generate] token_topk must be at most 20, got {}",
                g.token_topk
            );
        }
        if t.batch == 0 {
            bail!("[teacher] batch must be at least 1");
        }
        if t.kind == TeacherKind::Openai {
            if t.base_url.as_deref().unwrap_or("").is_empty() {
                bail!(
                    "[teacher] kind = \"openai\" needs base_url, e.g. \"http://127.0.0.1:8000/v1\""
                );
            }
            if t.max_in_flight == 0 {
                bail!("[teacher] max_in_flight must be at least 1");
            }
            if t.timeout_s.is_nan() || t.timeout_s <= 0.0 {
                bail!("[teacher] timeout_s must be positive");
            }
        }
        Ok(())
    }

    /// The view the student answers in at eval, "auto" resolved: a numeric task's
    /// step-by-step student reasons first (a small model cannot do the arithmetic in the
    /// answer tokens alone); everything else answers in the label view.
    pub fn student_view(&self) -> StudentView {
        match self.eval.student_view {
            StudentView::Auto
                if self.task.kind == TaskKind::Numeric
                    && self.finetune.objective == Objective::StepByStep =>
            {
                StudentView::Rationale
            }
            StudentView::Auto => StudentView::Label,
            view => view,
        }
    }

    pub fn run_dir(&self) -> PathBuf {
        self.runs_dir.join(&self.name)
    }

    pub fn stage_dir(&self, stage: &str) -> PathBuf {
        self.run_dir().join(stage)
    }

    /// Where synthesize writes the inputs it accepted.
    pub fn synthesized_inputs(&self) -> PathBuf {
        self.stage_dir("synthesize").join("inputs.jsonl")
    }

    /// The prompt template for this task.
    pub fn prompt_path(&self) -> PathBuf {
        self.task.prompt.clone().unwrap_or_else(|| {
            let kind = match self.task.kind {
                TaskKind::Numeric => "numeric",
                TaskKind::Labels => "labels",
            };
            PathBuf::from(format!("prompts/{kind}.md"))
        })
    }

    /// What decides the content of one teacher row: rows written under the same view can
    /// be reused by a resumed or extended run (more inputs, more samples, other limits).
    /// Operational settings (concurrency, rate limits, timeouts, URL) are left out.
    pub fn row_view(&self) -> serde_json::Value {
        let view = |t: &TeacherConfig| {
            serde_json::json!({"kind": t.kind, "model": t.model, "max_tokens": t.max_tokens,
                               "temperature": t.temperature, "label_scores": t.label_scores})
        };
        let mut v = serde_json::json!({
            "seed": self.seed, "task": self.task,
            "teacher": view(&self.teacher),
            "token_topk": self.generate.token_topk,
        });
        // Only with an ensemble: single-teacher runs keep their earlier hash (and rows).
        if !self.ensemble.is_empty() {
            v["ensemble"] = self.ensemble.iter().map(view).collect();
            v["samples"] = self.generate.samples.into();
        }
        v
    }

    /// The sections a stage depends on, as one JSON value: its hash decides whether a
    /// finished stage can be skipped.
    pub fn stage_view(&self, stage: &str) -> serde_json::Value {
        use serde_json::json;
        match stage {
            "generate" => {
                let ensemble: Vec<_> = self.ensemble.iter().map(what_answers).collect();
                json!({"seed": self.seed, "data": self.data, "task": self.task,
                       "teacher": what_answers(&self.teacher), "ensemble": ensemble,
                       "generate": self.generate})
            }
            "synthesize" => {
                json!({"seed": self.seed, "task": self.task, "teacher": what_answers(&self.teacher),
                       "synthesize": self.synthesize, "input_field": self.data.input_field})
            }
            "curate" => {
                let weights: Vec<_> = self
                    .teachers()
                    .iter()
                    .map(|t| (&t.model, t.weight))
                    .collect();
                json!({"seed": self.seed, "task": self.task, "curate": self.curate,
                       "input_field": self.data.input_field, "weights": weights})
            }
            "finetune" => {
                json!({"seed": self.seed, "task": self.task, "student": self.student, "finetune": self.finetune})
            }
            _ => {
                let fields = json!({"input": self.data.input_field, "id": self.data.id_field, "gold": self.data.gold_field});
                json!({"seed": self.seed, "task": self.task, "student": self.student, "eval": self.eval,
                       "teacher": what_answers(&self.teacher), "fields": fields})
            }
        }
    }
}

/// A teacher's settings that decide its answers, for stage hashes: the pacing and cost
/// knobs (batch size, concurrency, rate limits, timeouts, retries, prices) change how fast
/// rows come, not what they say, so changing them must not invalidate written rows.
fn what_answers(t: &TeacherConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    if let Some(fields) = v.as_object_mut() {
        for pacing in [
            "batch",
            "max_in_flight",
            "requests_per_minute",
            "tokens_per_minute",
            "timeout_s",
            "max_retries",
            "retry_base_s",
            "price_per_mtok",
        ] {
            fields.remove(pacing);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_knobs_do_not_change_the_generate_hash() {
        let base: Config = toml::from_str(MINIMAL).unwrap();
        let mut faster = base.clone();
        faster.teacher.batch = 64;
        faster.teacher.max_in_flight = 99;
        faster.teacher.timeout_s = 5.0;
        assert_eq!(base.stage_view("generate"), faster.stage_view("generate"));
        let mut other = base.clone();
        other.teacher.max_tokens += 1;
        assert_ne!(base.stage_view("generate"), other.stage_view("generate"));
        other = base.clone();
        other.teacher.engine = LocalEngine::Mistralrs;
        assert_ne!(base.stage_view("generate"), other.stage_view("generate"));
    }

    const MINIMAL: &str = r#"
[data]
inputs = ["x.jsonl"]
input_field = "q"
[task]
kind = "numeric"
[teacher]
model = "t.gguf"
[student]
model = "s.gguf"
"#;

    #[test]
    fn a_numeric_step_by_step_student_reasons_at_eval_unless_told_otherwise() {
        let mut cfg: Config = toml::from_str(MINIMAL).unwrap();
        assert_eq!(cfg.student_view(), StudentView::Rationale);
        assert_eq!(cfg.eval.new_tokens(StudentView::Rationale), 160);
        cfg.finetune.objective = Objective::Distill;
        assert_eq!(
            cfg.student_view(),
            StudentView::Label,
            "no rationale learned"
        );
        assert_eq!(cfg.eval.new_tokens(StudentView::Label), 12);
        cfg.finetune.objective = Objective::StepByStep;
        cfg.task.kind = TaskKind::Labels;
        cfg.task.labels = vec!["a".into(), "b".into()];
        assert_eq!(cfg.student_view(), StudentView::Label);
        cfg.eval.student_view = StudentView::Rationale;
        assert_eq!(cfg.student_view(), StudentView::Rationale);
        cfg.eval.student_decode = StudentDecode::LabelScores;
        let err = cfg.validate_eval().unwrap_err().to_string();
        assert!(err.contains("student_view"), "{err}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg: Config = toml::from_str(MINIMAL).unwrap();
        assert_eq!(cfg.finetune.alpha, 0.5);
        assert_eq!(cfg.curate.split, [0.8, 0.1, 0.1]);
        assert_eq!(cfg.eval.split, "test");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("[student]", "[student]\nmodle = 1");
        let err = toml::from_str::<Config>(&text).unwrap_err().to_string();
        assert!(err.contains("modle"), "{err}");
    }
}
