//! `[generate]`: samples per input, token top-k, and how often rows reach disk.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// Rationales per input (self-consistency); more than one needs `teacher.temperature` > 0.
    #[serde(default = "d_samples")]
    pub samples: usize,
    /// Keep the top-k alternatives of every generated token (token-level KD); 0 = off,
    /// at most 20 (the OpenAI API's limit). A million rows × 256 tokens × k adds up.
    /// Unset: 20 where token-level KD is the measured default (a numeric task, one local
    /// teacher whose vocabulary is the student's: `config::recipe`), else 0. Read it with
    /// `token_topk()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_topk: Option<usize>,
    /// Rows buffered before they are written to a part file: a kill loses at most these.
    #[serde(default = "d_flush_rows")]
    pub flush_rows: usize,
}

impl GenerateConfig {
    /// Alternatives kept a token (0: none); unset counts as 0 until `Config::resolve`
    /// picks the default.
    pub fn token_topk(&self) -> usize {
        self.token_topk.unwrap_or(0)
    }
}

impl Default for GenerateConfig {
    fn default() -> Self {
        toml::from_str("").expect("every generate field has a default")
    }
}

fn d_samples() -> usize {
    1
}

fn d_flush_rows() -> usize {
    16
}
