//! `[data]`: where the inputs are and which fields hold what.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
