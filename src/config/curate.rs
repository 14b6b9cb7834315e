//! `[curate]`: the rules that turn teacher rows into training data, each one on/off or
//! tuned, and the split shares.

use super::TaskKind;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    #[serde(default = "super::d_true")]
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
    #[serde(default = "super::d_true")]
    pub require_answer_in_rationale: bool,
    /// Numeric tasks: every equation written in the rationale (`12 + 7 = 19`) must hold.
    #[serde(default = "super::d_true")]
    pub check_arithmetic: bool,
    /// The same input (after normalizing case, punctuation and spacing) under two ids is
    /// kept once: it would be trained twice and could leak across splits.
    #[serde(default = "super::d_true")]
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
    /// Teacher rows a part holds: curate judges the rows a part at a time (each part holds
    /// whole inputs), so its memory follows this, not the number of rows. The result does
    /// not depend on it.
    #[serde(default = "d_part_rows")]
    pub part_rows: usize,
}

impl Default for CurateConfig {
    fn default() -> Self {
        toml::from_str("").expect("every curate field has a default")
    }
}

fn d_part_rows() -> usize {
    500_000
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

fn d_split() -> [f64; 3] {
    [0.8, 0.1, 0.1]
}
