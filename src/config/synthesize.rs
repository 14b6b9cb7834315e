//! `[synthesize]`: new task inputs written by the teacher from a few seeds.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    #[serde(default = "super::d_one")]
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
