//! `[eval]`: which models are scored on which rows, how the student answers, and the
//! quality gate.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    /// "teacher", "exported" (every GGUF `kdpipe export` wrote, each on its own row).
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
    pub student_view: ViewChoice,
    /// Tokens the student may generate per example. Default: 12 in the label view (an
    /// answer is a few tokens; more only costs time), 160 in the rationale view.
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// Numeric tasks in the rationale view: kdpipe writes the result of each equation the
    /// student leaves open (`3 * 4 =`), so its accuracy measures the reasoning, not the
    /// digits. Off by default: the figure is then the model's alone. With a local teacher
    /// answering now (`teacher = "run"`), the report also scores the teacher with it (a
    /// "teacher, calculator" row beside the teacher's own).
    #[serde(default)]
    pub calculator: bool,
    /// Rows the student answers together (continuous batching, as the teacher engine):
    /// 32 keeps a CPU's matrix units busy; a reply does not depend on the others.
    #[serde(default = "d_parallel")]
    pub parallel: usize,
    /// A quality gate for batch jobs: when the trained student's accuracy (a share in
    /// [0, 1]) is below this, `kdpipe eval` and `kdpipe run` finish their outputs and exit
    /// with code 1 instead of 0. None: no gate.
    #[serde(default)]
    pub min_accuracy: Option<f64>,
}

impl EvalConfig {
    /// How many tokens the student may generate, reasoning first or answering alone.
    pub fn new_tokens(&self, reasons: bool) -> usize {
        self.max_new_tokens
            .unwrap_or(if reasons { 160 } else { 12 })
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ViewChoice {
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
    Exported,
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

fn d_eval_split() -> String {
    "test".into()
}

fn d_student_view() -> ViewChoice {
    ViewChoice::Auto
}
fn d_parallel() -> usize {
    32
}
