//! The teacher: a large model that writes a rationale and an answer for each input, and
//! scores label continuations. `Teacher` is what `generate` calls; each backend lives in
//! its own file (local.rs: mistralrs, the only file that imports it).

#[cfg(feature = "local")]
pub mod local;

use crate::config::{TeacherConfig, TeacherKind};
use anyhow::Result;

/// One chat message sent to a teacher.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// The token limit cut the text short.
    pub truncated: bool,
}

/// Errors a caller branches on: retry the row, or stop the run.
#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    #[error("teacher request failed (retryable): {0}")]
    Retryable(String),
    #[error("teacher request failed: {0}")]
    Fatal(String),
}

pub trait Teacher {
    /// A stable name for the rows' `teacher` column (model path or id).
    fn id(&self) -> &str;

    /// Write a reply to the chat.
    fn generate(
        &self,
        messages: &[ChatMessage],
        max_tokens: usize,
        temperature: f64,
    ) -> Result<Generation, TeacherError>;

    /// Natural-log probability of each continuation after the chat's assistant turn has
    /// begun with `assistant_prefix`: log p(continuation | chat, prefix), summed over its
    /// tokens.
    fn score_continuations(
        &self,
        messages: &[ChatMessage],
        assistant_prefix: &str,
        continuations: &[String],
    ) -> Result<Vec<f64>, TeacherError>;

    /// Prompt tokens of a chat, without generating (dry runs, context checks).
    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<usize, TeacherError>;
}

/// Open the configured teacher; `will_score_labels` says label scoring follows each
/// reply (the local backend then keeps the reply's per-step distributions).
pub fn open(cfg: &TeacherConfig, will_score_labels: bool) -> Result<Box<dyn Teacher>> {
    match cfg.kind {
        #[cfg(feature = "local")]
        TeacherKind::Local => Ok(Box::new(local::LocalTeacher::open(
            &cfg.model,
            will_score_labels,
        )?)),
        #[cfg(not(feature = "local"))]
        TeacherKind::Local => {
            let _ = will_score_labels;
            anyhow::bail!(
            "this kdpipe was built without the local teacher\nhint: build with --features local"
            )
        }
    }
}

/// Turn per-label log-probabilities into a distribution (softmax over the label set).
pub fn normalize_logprobs(logprobs: &[f64]) -> Vec<f64> {
    let max = logprobs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return vec![1.0 / logprobs.len() as f64; logprobs.len()];
    }
    let exps: Vec<f64> = logprobs.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_logprobs_renormalize() {
        // ln 0.2 and ln 0.6: renormalized over the two labels gives 0.25 / 0.75.
        let p = normalize_logprobs(&[0.2f64.ln(), 0.6f64.ln()]);
        assert!((p[0] - 0.25).abs() < 1e-12 && (p[1] - 0.75).abs() < 1e-12);
    }
}
