//! The teacher: a large model that writes a rationale and an answer for each input, with
//! whatever soft labels its backend can give. `generate` hands a teacher all its jobs and
//! receives one result per job; each backend lives in its own file: engine.rs (kdpipe's
//! own engine over `llama`), mistralrs.rs (the only file that imports mistralrs),
//! openai.rs (HTTP, the only file that imports reqwest), batch_api.rs (OpenAI Batch API
//! files), wire.rs (the OpenAI chat JSON, shared by both). scoring.rs reads a teacher's
//! distribution over sequences it did not write (locally; through an API with
//! `ApiTeacher::score` and echo.rs, the completions JSON for it). A new backend is a file
//! here implementing `Teacher`, and a branch in `open`.

pub mod batch_api;
pub mod echo;
pub mod engine;
pub mod labels;
#[cfg(feature = "mistralrs")]
pub mod mistralrs;
pub mod openai;
pub mod scoring;
pub mod wire;

use crate::chat::ChatMessage;
use crate::config::{LocalEngine, TaskConfig, TaskKind, TeacherConfig, TeacherKind};
use anyhow::Result;
use std::collections::BTreeMap;

/// One request: a row key and its chat.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub sample: u32,
    pub messages: Vec<ChatMessage>,
    /// Sampling seed sent to backends that take one (None: the backend has none).
    pub seed: Option<u64>,
}

/// What every job of a run asks for.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_tokens: usize,
    pub temperature: f64,
    /// Alternatives kept for every generated token (0: none).
    pub token_topk: usize,
    /// Label tasks: the label set, scored at the answer position after the rationale.
    pub labels: Vec<String>,
}

/// The labels a teacher scores after its rationale (`label_scores`, label tasks; generate
/// and eval's live teacher alike); none otherwise.
pub fn scored_labels(task: &TaskConfig, teacher: &TeacherConfig) -> Vec<String> {
    if task.kind == TaskKind::Labels && teacher.label_scores {
        task.labels.clone()
    } else {
        vec![]
    }
}

/// A generated token, by id where the backend gives ids (local) or by text (APIs).
#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    Id(u32),
    Text(String),
}

/// One generated token with its natural-log probability and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChoice {
    pub token: Token,
    pub logprob: f32,
    pub top: Vec<(Token, f32)>,
}

/// A teacher's answer to one job, before task parsing.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub text: String,
    /// "stop", "length", ... as the backend reports it.
    pub finish_reason: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: f64,
    /// Probability of each label of `Settings::labels` at the answer position (same
    /// order), not renormalized: their sum is the mass the teacher put on the label set.
    pub label_probs: Option<Vec<f64>>,
    /// Per generated token, when `Settings::token_topk` > 0.
    pub tokens: Vec<TokenChoice>,
    /// The seed the backend used, when it takes one.
    pub seed: Option<u64>,
    /// Engine-reported time on the prompt and on decoding (local engine; 0 when unknown).
    pub prompt_seconds: f64,
    pub decode_seconds: f64,
}

/// How one job ended. A row failure (a prompt longer than the context) is written as a
/// failed row; anything that stops the run is an `Err` from `answer_all`.
pub type JobResult = std::result::Result<Reply, String>;

/// Where the caller learns the answer's position in a reply: the byte offset just after
/// the answer marker, where label scoring looks.
pub type AnswerLocator<'a> = &'a (dyn Fn(&str) -> Option<usize> + Sync);

/// Retries by cause, for the report: "rate_limited", "server_error", "timeout", ...
pub type RetryCounts = BTreeMap<String, u64>;

/// Errors a caller branches on: retry the request, fail only this row, or stop the run.
#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    #[error("teacher request failed (retryable): {0}")]
    Retryable(String),
    #[error("teacher request failed for this row: {0}")]
    Row(String),
    #[error("teacher request failed: {0}")]
    Fatal(String),
}

pub trait Teacher {
    /// A stable name for the rows' `teacher` column (model path or id).
    fn id(&self) -> &str;

    /// "local" or "openai", for the rows' `backend` column.
    fn backend(&self) -> &'static str;

    /// Answer every job, handing each result to `sink` as soon as it is complete (in any
    /// order). A fatal error stops the run after `sink` has received every job finished
    /// before it. Returns the retries made, by cause.
    fn answer_all(
        &self,
        jobs: Vec<Job>,
        settings: &Settings,
        locate_answer: AnswerLocator,
        sink: &mut dyn FnMut(Job, JobResult) -> Result<()>,
    ) -> Result<RetryCounts>;

    /// Prompt tokens of a chat, without generating (dry runs). `None` when the backend has
    /// no tokenizer at hand (APIs): the caller estimates.
    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Option<usize>>;
}

/// Open the configured teacher; `will_score_labels` / `token_topk` say what the backend
/// must keep of each reply's distributions.
pub fn open(
    cfg: &TeacherConfig,
    will_score_labels: bool,
    token_topk: usize,
) -> Result<Box<dyn Teacher>> {
    let ours = match cfg.engine {
        LocalEngine::Kdpipe => true,
        LocalEngine::Mistralrs => false,
        LocalEngine::Auto => engine::fits_in_memory(&cfg.model),
    };
    match cfg.kind {
        TeacherKind::Local if ours => {
            tracing::info!(
                "local teacher: kdpipe's engine, {} sequences in parallel",
                cfg.parallel
            );
            Ok(Box::new(engine::EngineTeacher::open(
                &cfg.model,
                cfg.parallel,
            )?))
        }
        #[cfg(feature = "mistralrs")]
        TeacherKind::Local => Ok(Box::new(mistralrs::MistralrsTeacher::open(
            &cfg.model,
            will_score_labels || token_topk > 0,
        )?)),
        #[cfg(not(feature = "mistralrs"))]
        TeacherKind::Local => {
            let _ = (will_score_labels, token_topk);
            let why = if matches!(cfg.engine, LocalEngine::Mistralrs) {
                "[teacher] engine = \"mistralrs\" asks for mistralrs".to_string()
            } else {
                format!(
                    "{} is not a llama or qwen2 model that fits in memory for kdpipe's own engine",
                    cfg.model
                )
            };
            anyhow::bail!(
                "{why}, and this kdpipe was built without mistralrs\nhint: build with `cargo build --release --features mistralrs` for other architectures, or set [teacher] engine = \"kdpipe\""
            )
        }
        TeacherKind::Openai => Ok(Box::new(openai::ApiTeacher::open(cfg)?)),
    }
}

/// The k largest entries of a distribution, largest first.
pub(crate) fn top_k(dist: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..dist.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(k - 1, |a, b| {
        dist[*b as usize].total_cmp(&dist[*a as usize])
    });
    idx.truncate(k);
    idx.sort_by(|a, b| dist[*b as usize].total_cmp(&dist[*a as usize]));
    idx.into_iter().map(|i| (i, dist[i as usize])).collect()
}
