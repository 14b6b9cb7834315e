//! `[teacher]` (and each `[[ensemble]]` member): which model answers, on which backend,
//! and how fast it may be asked.

use serde::{Deserialize, Serialize};

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
    /// `kdpipe` when the model is llama or qwen2 and its weights, as the engine holds them
    /// (a GGUF's block formats at their size, a Hugging Face folder in f32), take at most
    /// half the memory available; `mistralrs` otherwise.
    #[default]
    Auto,
    /// kdpipe's own engine: its decoder on the GGUF's block formats (`kernels::quant`) or
    /// in f32, `parallel` sequences decoded together.
    /// (Formerly `batched`, still read.)
    #[serde(alias = "batched")]
    Kdpipe,
    /// mistralrs, one request at a time, quantized weights as stored.
    Mistralrs,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    /// `local`: a model in this process (GGUF file or Hugging Face model directory).
    #[serde(default = "d_teacher_kind")]
    pub kind: TeacherKind,
    /// `local`: "auto", "kdpipe" (kdpipe's own engine) or "mistralrs".
    #[serde(default)]
    pub engine: LocalEngine,
    /// `local`, kdpipe's engine: sequences decoded together (continuous batching). More
    /// keeps the CPU's matrix units busier and holds more key/value caches in memory.
    /// (Formerly `batch`, still read.)
    #[serde(default = "d_parallel", alias = "batch")]
    pub parallel: usize,
    /// This teacher's vote in curate's self-consistency when several teachers answer
    /// (`[[ensemble]]`), and its weight in their averaged label-set soft labels.
    #[serde(default = "super::d_one_f")]
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
    #[serde(default = "super::d_true")]
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

fn d_teacher_kind() -> TeacherKind {
    TeacherKind::Local
}

fn d_max_tokens() -> usize {
    256
}

fn d_max_in_flight() -> usize {
    8
}

fn d_timeout() -> f64 {
    120.0
}

fn d_max_retries() -> u32 {
    8
}

fn d_retry_base() -> f64 {
    1.0
}

fn d_parallel() -> usize {
    PARALLEL_DEFAULT
}
/// Chosen by `scripts/bench/teacher.sh` (see bench-results/teacher.md).
const PARALLEL_DEFAULT: usize = 32;
