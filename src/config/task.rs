//! `[task]`: what an answer is (a number with a tolerance, or one of a label set) and
//! the prompt that asks for it.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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

fn d_tolerance() -> f64 {
    1e-6
}
