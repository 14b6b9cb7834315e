//! The schemas of every stage file, in one place. Each row type converts to and from a
//! Polars frame; readers check columns and types and name the file when one is wrong.
//! `SCHEMA_VERSION` (in io::manifest) changes whenever a column here changes.

pub mod topk_store;

use crate::config::{LabelSource, Objective};
use anyhow::{bail, Context, Result};
use polars::prelude::*;
use std::path::Path;
use topk_store::{FlatTopk, TopkColumns};

/// One user input after the field mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRow {
    pub id: String,
    pub input: String,
    pub gold: Option<String>,
}

/// How a row's soft label was obtained, best first (DESIGN.md).
pub const SOFT_LABEL_SCORES: &str = "label_scores";
pub const SOFT_VOTE_SHARE: &str = "vote_share";
/// The teachers' label-set scores averaged (weighted) over an ensemble.
pub const SOFT_ENSEMBLE_LABEL_SCORES: &str = "ensemble_label_scores";
pub const SOFT_TOKEN_TOPK: &str = "token_topk";
pub const SOFT_NONE: &str = "none";

/// Token-level soft labels of one row: every generated token with its natural-log
/// probability and its top-k alternatives. Local teachers give token ids (`ids`,
/// `top_ids`), APIs give token text (`texts`, `top_texts`); the other pair stays empty.
/// On disk the alternatives take the compact layout of `records::topk_store` (16-bit
/// log-probability codes and each token's tail mass: read back within 6e-4 nats, the
/// tail kept).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenTopk {
    pub ids: Vec<u32>,
    pub texts: Vec<String>,
    pub logprobs: Vec<f32>,
    pub top_ids: Vec<Vec<u32>>,
    pub top_texts: Vec<Vec<String>>,
    pub top_logprobs: Vec<Vec<f32>>,
    /// The temperature of the distribution `top_logprobs` come from (None: no
    /// alternatives).
    pub temperature: Option<f32>,
    /// The fingerprint of the vocabulary `ids` and `top_ids` index
    /// (`llama::vocab::fingerprint`; "" without ids).
    pub vocab: String,
}

/// One teacher answer: what `generate` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherRow {
    pub id: String,
    /// Sample index among the k rationales of one input (0 with one sample).
    pub sample: u32,
    pub input: String,
    pub gold: Option<String>,
    /// The teacher's text, always kept: a parse failure is a status, never a blank.
    pub raw: String,
    pub rationale: Option<String>,
    pub answer: Option<String>,
    pub status: String,
    pub soft_kind: String,
    /// Soft label: answers and their probabilities (same length; empty when none).
    /// `label_scores` are the teacher's probabilities, not renormalized (sum ≤ 1).
    pub soft_labels: Vec<String>,
    pub soft_probs: Vec<f64>,
    /// Probability mass the soft label covers (sum of `soft_probs` for label scores;
    /// null when there is none).
    pub soft_coverage: Option<f64>,
    pub tokens: TokenTopk,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// "stop", "length", ... as the teacher reported it; "error" for a failed request.
    pub finish_reason: String,
    pub latency_ms: f64,
    /// Provenance: backend ("local", "openai", "batch"), model, prompt, sampling.
    pub backend: String,
    pub teacher: String,
    pub prompt_name: String,
    pub prompt_hash: String,
    pub temperature: f64,
    pub max_tokens: u32,
    pub seed: Option<u64>,
    /// When the row was written, milliseconds since the Unix epoch.
    pub created_unix_ms: i64,
}

impl TokenTopk {
    /// The alternatives in the stored layout.
    fn flatten(&self) -> FlatTopk {
        FlatTopk {
            temperature: self.temperature,
            vocab: self.vocab.clone(),
            ..topk_store::flatten(&self.top_ids, &self.top_texts, &self.top_logprobs)
        }
    }
}

fn list_column(name: &str, items: impl Iterator<Item = Series>) -> Column {
    let series: Vec<Series> = items.collect();
    Column::new(name.into(), series)
}

fn strs(s: &Series) -> Vec<String> {
    s.str()
        .map(|c| c.iter().map(|v| v.unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

fn f64s(s: &Series) -> Vec<f64> {
    s.f64()
        .map(|c| c.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
        .unwrap_or_default()
}

/// A reader over a frame that checks each column once and names the file on errors.
struct Cols<'a> {
    df: &'a DataFrame,
    path: &'a Path,
}

impl<'a> Cols<'a> {
    fn str(&self, name: &str) -> Result<&'a StringChunked> {
        Ok(require(self.df, self.path, name, &DataType::String)?.str()?)
    }
    fn u32(&self, name: &str) -> Result<&'a UInt32Chunked> {
        Ok(require(self.df, self.path, name, &DataType::UInt32)?.u32()?)
    }
    fn f64(&self, name: &str) -> Result<&'a Float64Chunked> {
        Ok(require(self.df, self.path, name, &DataType::Float64)?.f64()?)
    }
    fn list(&self, name: &str, inner: DataType) -> Result<&'a ListChunked> {
        Ok(require(self.df, self.path, name, &DataType::List(Box::new(inner)))?.list()?)
    }
}

fn opt_str(c: &StringChunked, i: usize) -> Option<String> {
    c.get(i).map(str::to_string)
}

impl TeacherRow {
    pub fn to_frame(rows: &[TeacherRow]) -> Result<DataFrame> {
        let s = |f: fn(&TeacherRow) -> &str| rows.iter().map(f).collect::<Vec<_>>();
        let o = |f: fn(&TeacherRow) -> Option<&str>| rows.iter().map(f).collect::<Vec<_>>();
        let cols = vec![
            Column::new("id".into(), s(|r| &r.id)),
            Column::new(
                "sample".into(),
                rows.iter().map(|r| r.sample).collect::<Vec<_>>(),
            ),
            Column::new("input".into(), s(|r| &r.input)),
            Column::new("gold".into(), o(|r| r.gold.as_deref())),
            Column::new("raw".into(), s(|r| &r.raw)),
            Column::new("rationale".into(), o(|r| r.rationale.as_deref())),
            Column::new("answer".into(), o(|r| r.answer.as_deref())),
            Column::new("status".into(), s(|r| &r.status)),
            Column::new("soft_kind".into(), s(|r| &r.soft_kind)),
            list_column(
                "soft_labels",
                rows.iter().map(|r| Series::new("".into(), &r.soft_labels)),
            ),
            list_column(
                "soft_probs",
                rows.iter().map(|r| Series::new("".into(), &r.soft_probs)),
            ),
            Column::new(
                "soft_coverage".into(),
                rows.iter().map(|r| r.soft_coverage).collect::<Vec<_>>(),
            ),
            list_column(
                "token_ids",
                rows.iter().map(|r| Series::new("".into(), &r.tokens.ids)),
            ),
            list_column(
                "token_texts",
                rows.iter().map(|r| Series::new("".into(), &r.tokens.texts)),
            ),
            list_column(
                "token_logprobs",
                rows.iter()
                    .map(|r| Series::new("".into(), &r.tokens.logprobs)),
            ),
            Column::new(
                "prompt_tokens".into(),
                rows.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>(),
            ),
            Column::new(
                "completion_tokens".into(),
                rows.iter().map(|r| r.completion_tokens).collect::<Vec<_>>(),
            ),
            Column::new("finish_reason".into(), s(|r| &r.finish_reason)),
            Column::new(
                "latency_ms".into(),
                rows.iter().map(|r| r.latency_ms).collect::<Vec<_>>(),
            ),
            Column::new("backend".into(), s(|r| &r.backend)),
            Column::new("teacher".into(), s(|r| &r.teacher)),
            Column::new("prompt_name".into(), s(|r| &r.prompt_name)),
            Column::new("prompt_hash".into(), s(|r| &r.prompt_hash)),
            Column::new(
                "temperature".into(),
                rows.iter().map(|r| r.temperature).collect::<Vec<_>>(),
            ),
            Column::new(
                "max_tokens".into(),
                rows.iter().map(|r| r.max_tokens).collect::<Vec<_>>(),
            ),
            Column::new(
                "seed".into(),
                rows.iter().map(|r| r.seed).collect::<Vec<_>>(),
            ),
            Column::new(
                "created_unix_ms".into(),
                rows.iter().map(|r| r.created_unix_ms).collect::<Vec<_>>(),
            ),
        ];
        let mut cols = cols;
        let flat: Vec<FlatTopk> = rows.iter().map(|r| r.tokens.flatten()).collect();
        // After token_logprobs, as the nested columns of earlier versions were.
        let at = cols
            .iter()
            .position(|c| c.name().as_str() == "token_logprobs")
            .map_or(cols.len(), |i| i + 1);
        cols.splice(at..at, topk_store::columns(&flat));
        let mut df = DataFrame::new_infer_height(cols)?;
        cast_lists(&mut df)?;
        Ok(df)
    }

    /// Check the columns curate reads and their types, without reading the rows.
    pub fn check_columns(df: &DataFrame, path: &Path) -> Result<()> {
        let list = |t: DataType| DataType::List(Box::new(t));
        for (name, dtype) in [
            ("id", DataType::String),
            ("sample", DataType::UInt32),
            ("input", DataType::String),
            ("gold", DataType::String),
            ("rationale", DataType::String),
            ("answer", DataType::String),
            ("status", DataType::String),
            ("soft_kind", DataType::String),
            ("soft_labels", list(DataType::String)),
            ("soft_probs", list(DataType::Float64)),
            ("completion_tokens", DataType::UInt32),
        ] {
            require(df, path, name, &dtype)?;
        }
        Ok(())
    }

    pub fn from_frame(df: &DataFrame, path: &Path) -> Result<Vec<TeacherRow>> {
        let c = Cols { df, path };
        let (id, sample, input, gold, raw) = (
            c.str("id")?,
            c.u32("sample")?,
            c.str("input")?,
            c.str("gold")?,
            c.str("raw")?,
        );
        let (rationale, answer, status, soft_kind) = (
            c.str("rationale")?,
            c.str("answer")?,
            c.str("status")?,
            c.str("soft_kind")?,
        );
        let soft_labels = c.list("soft_labels", DataType::String)?;
        let soft_probs = c.list("soft_probs", DataType::Float64)?;
        let coverage = c.f64("soft_coverage")?;
        let (token_ids, token_texts, token_logprobs) = (
            c.list("token_ids", DataType::UInt32)?,
            c.list("token_texts", DataType::String)?,
            c.list("token_logprobs", DataType::Float32)?,
        );
        let topk = TopkColumns::of(df, path)?.with_context(|| {
            format!("{}: missing the top-k columns {:?}\nhint: was this file written by this kdpipe version? re-run the stage that wrote it", path.display(), topk_store::COLUMNS)
        })?;
        let (pt, ct, finish, lat) = (
            c.u32("prompt_tokens")?,
            c.u32("completion_tokens")?,
            c.str("finish_reason")?,
            c.f64("latency_ms")?,
        );
        let (backend, teacher, prompt_name, prompt_hash) = (
            c.str("backend")?,
            c.str("teacher")?,
            c.str("prompt_name")?,
            c.str("prompt_hash")?,
        );
        let (temperature, max_tokens, seed, created) = (
            c.f64("temperature")?,
            c.u32("max_tokens")?,
            require(df, path, "seed", &DataType::UInt64)?.u64()?,
            require(df, path, "created_unix_ms", &DataType::Int64)?.i64()?,
        );
        let mut out = Vec::with_capacity(df.height());
        for i in 0..df.height() {
            let what = || {
                format!(
                    "{} row {:?}",
                    path.display(),
                    opt_str(id, i).unwrap_or_default()
                )
            };
            let stored = topk.row(i);
            let (top_ids, top_texts, top_logprobs) = topk_store::unflatten(&stored, &what)?;
            out.push(TeacherRow {
                id: opt_str(id, i).unwrap_or_default(),
                sample: sample.get(i).unwrap_or(0),
                input: opt_str(input, i).unwrap_or_default(),
                gold: opt_str(gold, i),
                raw: opt_str(raw, i).unwrap_or_default(),
                rationale: opt_str(rationale, i),
                answer: opt_str(answer, i),
                status: opt_str(status, i).unwrap_or_default(),
                soft_kind: opt_str(soft_kind, i).unwrap_or_default(),
                soft_labels: soft_labels
                    .get_as_series(i)
                    .map(|s| strs(&s))
                    .unwrap_or_default(),
                soft_probs: soft_probs
                    .get_as_series(i)
                    .map(|s| f64s(&s))
                    .unwrap_or_default(),
                soft_coverage: coverage.get(i),
                tokens: TokenTopk {
                    ids: flat(token_ids, i, |s| {
                        s.u32().map(|c| c.into_no_null_iter().collect())
                    }),
                    texts: flat(token_texts, i, |s| Ok(strs(s))),
                    logprobs: flat(token_logprobs, i, |s| {
                        s.f32().map(|c| c.into_no_null_iter().collect())
                    }),
                    top_ids,
                    top_texts,
                    top_logprobs,
                    temperature: stored.temperature,
                    vocab: stored.vocab,
                },
                prompt_tokens: pt.get(i).unwrap_or(0),
                completion_tokens: ct.get(i).unwrap_or(0),
                finish_reason: opt_str(finish, i).unwrap_or_default(),
                latency_ms: lat.get(i).unwrap_or(0.0),
                backend: opt_str(backend, i).unwrap_or_default(),
                teacher: opt_str(teacher, i).unwrap_or_default(),
                prompt_name: opt_str(prompt_name, i).unwrap_or_default(),
                prompt_hash: opt_str(prompt_hash, i).unwrap_or_default(),
                temperature: temperature.get(i).unwrap_or(0.0),
                max_tokens: max_tokens.get(i).unwrap_or(0),
                seed: seed.get(i),
                created_unix_ms: created.get(i).unwrap_or(0),
            });
        }
        Ok(out)
    }
}

/// One row's list of values, read by `read` from the row's series.
fn flat<T>(c: &ListChunked, i: usize, read: impl Fn(&Series) -> PolarsResult<Vec<T>>) -> Vec<T> {
    c.get_as_series(i)
        .and_then(|s| read(&s).ok())
        .unwrap_or_default()
}

/// Empty lists infer as List(Null); give every list column its declared inner type.
fn cast_lists(df: &mut DataFrame) -> Result<()> {
    for (name, inner) in [
        ("soft_labels", DataType::String),
        ("soft_probs", DataType::Float64),
        ("token_ids", DataType::UInt32),
        ("token_texts", DataType::String),
        ("token_logprobs", DataType::Float32),
        ("topk_ids", DataType::UInt32),
        ("topk_texts", DataType::String),
    ] {
        if df.column(name).is_ok() {
            let cast = df.column(name)?.cast(&DataType::List(Box::new(inner)))?;
            df.with_column(cast)?;
        }
    }
    Ok(())
}

/// One curated training or evaluation example: what `curate` writes per split.
#[derive(Debug, Clone, PartialEq)]
pub struct CuratedRow {
    pub id: String,
    pub sample: u32,
    pub input: String,
    pub gold: Option<String>,
    pub rationale: String,
    /// The teacher's answer.
    pub answer: String,
    pub soft_kind: String,
    pub soft_labels: Vec<String>,
    pub soft_probs: Vec<f64>,
    /// Share of the input's samples that gave the majority answer (null with one sample).
    pub agreement: Option<f64>,
    /// Whether the teacher's answer matches gold (null without gold, or with the rule off).
    pub agrees_with_gold: Option<bool>,
    /// The teacher's text and, where generate kept them (`token_topk`), its tokens with
    /// their top-k alternatives: the targets of token-level KD. Empty in splits written
    /// before these columns existed.
    pub raw: String,
    pub tokens: TokenTopk,
}

/// The columns of a curated split file, in order.
pub const CURATED_COLUMNS: [&str; 20] = [
    "id",
    "sample",
    "input",
    "gold",
    "rationale",
    "answer",
    "soft_kind",
    "soft_labels",
    "soft_probs",
    "agreement",
    "agrees_with_gold",
    "raw",
    "token_ids",
    "topk_k",
    "topk_ids",
    "topk_texts",
    "topk_logprob_codes",
    "topk_tail_codes",
    "topk_temperature",
    "topk_vocab",
];

/// What one curated row teaches under `[finetune]`'s objective and label source: the
/// one place finetune and export-data decide it.
#[derive(Debug, Clone, PartialEq)]
pub struct RowTargets {
    /// The label view's reply (and the rationale view's answer line).
    pub label: String,
    /// A rationale view: step-by-step, a rationale, and the teacher's reasoning usable.
    pub rationale: bool,
    /// The teacher's own reply may be a token-level KD target (where it kept its tokens).
    pub teacher_tokens: bool,
    /// The teacher's soft label may be a KD target (every objective but label_only).
    pub soft_label: bool,
}

impl CuratedRow {
    /// Fails on a row with gold but no `agrees_with_gold` under gold labels (curated with
    /// `[curate] gold = "off"`): which of its reasoning to keep is unknown.
    pub fn targets(&self, objective: Objective, labels: LabelSource) -> Result<RowTargets> {
        if labels == LabelSource::Gold && self.gold.is_some() && self.agrees_with_gold.is_none() {
            bail!(
                "row {:?}: [finetune] labels = \"gold\" needs to know whether its answer agrees with gold, and its agrees_with_gold is empty (curated with [curate] gold = \"off\"?); curate again with gold = \"flag\"",
                self.id
            );
        }
        let gold_labels = objective == Objective::LabelOnly || labels == LabelSource::Gold;
        let label = match (&self.gold, gold_labels) {
            (Some(gold), true) => gold.clone(),
            _ => self.answer.clone(),
        };
        // With gold labels, the teacher's reasoning is kept only where it reached gold.
        let reasoning = labels == LabelSource::Teacher
            || self.gold.is_none()
            || self.agrees_with_gold == Some(true);
        Ok(RowTargets {
            label,
            rationale: objective == Objective::StepByStep
                && reasoning
                && !self.rationale.trim().is_empty(),
            teacher_tokens: objective != Objective::LabelOnly && reasoning,
            soft_label: objective != Objective::LabelOnly,
        })
    }

    pub fn from_frame(df: &DataFrame, path: &Path) -> Result<Vec<CuratedRow>> {
        let c = Cols { df, path };
        let (id, input, gold, rationale, answer, soft_kind) = (
            c.str("id")?,
            c.str("input")?,
            c.str("gold")?,
            c.str("rationale")?,
            c.str("answer")?,
            c.str("soft_kind")?,
        );
        let soft_labels = c.list("soft_labels", DataType::String)?;
        let soft_probs = c.list("soft_probs", DataType::Float64)?;
        let sample = c.u32("sample")?;
        let agreement = c.f64("agreement")?;
        let agrees = require(df, path, "agrees_with_gold", &DataType::Boolean)?.bool()?;
        // Optional columns (splits written by earlier versions lack them).
        let has = |name: &str| df.get_column_names().iter().any(|c| c.as_str() == name);
        let raw = if has("raw") {
            Some(c.str("raw")?)
        } else {
            None
        };
        let tokens = match (has("token_ids"), TopkColumns::of(df, path)?) {
            (true, Some(topk)) => Some((c.list("token_ids", DataType::UInt32)?, topk)),
            _ => None,
        };
        let mut out = Vec::with_capacity(df.height());
        for i in 0..df.height() {
            let tokens = match &tokens {
                Some((ids, topk)) => {
                    let what = || {
                        format!(
                            "{} row {:?}",
                            path.display(),
                            opt_str(id, i).unwrap_or_default()
                        )
                    };
                    let stored = topk.row(i);
                    let (top_ids, _, top_logprobs) = topk_store::unflatten(&stored, &what)?;
                    TokenTopk {
                        ids: flat(ids, i, |s| s.u32().map(|c| c.into_no_null_iter().collect())),
                        top_ids,
                        top_logprobs,
                        temperature: stored.temperature,
                        vocab: stored.vocab,
                        ..Default::default()
                    }
                }
                None => TokenTopk::default(),
            };
            out.push(CuratedRow {
                id: opt_str(id, i).unwrap_or_default(),
                sample: sample.get(i).unwrap_or(0),
                agreement: agreement.get(i),
                agrees_with_gold: agrees.get(i),
                input: opt_str(input, i).unwrap_or_default(),
                gold: opt_str(gold, i),
                rationale: opt_str(rationale, i).unwrap_or_default(),
                answer: opt_str(answer, i).unwrap_or_default(),
                soft_kind: opt_str(soft_kind, i).unwrap_or_default(),
                soft_labels: soft_labels
                    .get_as_series(i)
                    .map(|s| strs(&s))
                    .unwrap_or_default(),
                soft_probs: soft_probs
                    .get_as_series(i)
                    .map(|s| f64s(&s))
                    .unwrap_or_default(),
                raw: raw.and_then(|r| opt_str(r, i)).unwrap_or_default(),
                tokens,
            });
        }
        Ok(out)
    }
}

/// A column that must exist with the given type, or an error naming file and column.
pub fn require<'a>(
    df: &'a DataFrame,
    path: &Path,
    name: &str,
    dtype: &DataType,
) -> Result<&'a Column> {
    let col = anyhow::Context::with_context(df.column(name), || {
        format!("{}: missing column {name:?}\nhint: was this file written by this kdpipe version? re-run the stage that wrote it", path.display())
    })?;
    if col.dtype() != dtype {
        bail!(
            "{}: column {name:?} has type {}, expected {dtype}",
            path.display(),
            col.dtype()
        );
    }
    Ok(col)
}

#[cfg(test)]
pub mod tests_support {
    use super::*;

    /// A parsed label-task row with the given soft labels (probability 0.5 each).
    pub fn row(id: &str, labels: &[&str]) -> TeacherRow {
        TeacherRow {
            id: id.into(),
            sample: 0,
            input: "in".into(),
            gold: None,
            raw: "r".into(),
            rationale: Some("because".into()),
            answer: Some("joy".into()),
            status: "ok".into(),
            soft_kind: SOFT_LABEL_SCORES.into(),
            soft_labels: labels.iter().map(|s| s.to_string()).collect(),
            soft_probs: labels.iter().map(|_| 0.5).collect(),
            soft_coverage: (!labels.is_empty()).then_some(0.5 * labels.len() as f64),
            tokens: TokenTopk::default(),
            prompt_tokens: 3,
            completion_tokens: 4,
            finish_reason: "stop".into(),
            latency_ms: 1.5,
            backend: "local".into(),
            teacher: "t".into(),
            prompt_name: "labels".into(),
            prompt_hash: "h".into(),
            temperature: 0.0,
            max_tokens: 64,
            seed: None,
            created_unix_ms: 1_700_000_000_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::tests_support::row;

    fn curated(gold: Option<&str>, agrees: Option<bool>, rationale: &str) -> CuratedRow {
        CuratedRow {
            id: "a".into(),
            sample: 0,
            input: "in".into(),
            gold: gold.map(str::to_string),
            rationale: rationale.into(),
            answer: "joy".into(),
            soft_kind: SOFT_LABEL_SCORES.into(),
            soft_labels: vec![],
            soft_probs: vec![],
            agreement: None,
            agrees_with_gold: agrees,
            raw: "r".into(),
            tokens: TokenTopk::default(),
        }
    }

    #[test]
    fn gold_labels_train_gold_and_keep_only_the_reasoning_that_reached_it() {
        use crate::config::{LabelSource::*, Objective::*};
        let t = |row: &CuratedRow, objective, labels| {
            let t = row.targets(objective, labels).unwrap();
            (t.label, t.rationale, t.teacher_tokens)
        };
        let wrong = curated(Some("anger"), Some(false), "it is happy");
        let right = curated(Some("joy"), Some(true), "it is happy");
        let no_gold = curated(None, None, "it is happy");
        // The teacher's labels: its answer and its reasoning, right or wrong.
        assert_eq!(t(&wrong, StepByStep, Teacher), ("joy".into(), true, true));
        // Gold labels: the wrong row teaches gold, without the reasoning that missed it.
        assert_eq!(t(&wrong, StepByStep, Gold), ("anger".into(), false, false));
        assert_eq!(t(&right, StepByStep, Gold), ("joy".into(), true, true));
        assert_eq!(t(&no_gold, StepByStep, Gold), ("joy".into(), true, true));
        assert_eq!(t(&wrong, Distill, Gold), ("anger".into(), false, false));
        assert_eq!(t(&right, Distill, Gold), ("joy".into(), false, true));
        // Unknown agreement is refused under gold labels, naming the row.
        let unknown = curated(Some("joy"), None, "it is happy");
        let err = unknown.targets(StepByStep, Gold).unwrap_err().to_string();
        assert!(
            err.contains("\"a\"") && err.contains("gold = \"flag\""),
            "{err}"
        );
        assert!(unknown.targets(StepByStep, Teacher).is_ok());
        // label_only: gold, no rationale, no teacher tokens nor soft label, whatever the
        // label source.
        assert_eq!(
            t(&wrong, LabelOnly, Teacher),
            ("anger".into(), false, false)
        );
        assert!(!wrong.targets(LabelOnly, Gold).unwrap().soft_label);
        assert!(wrong.targets(Distill, Gold).unwrap().soft_label);
        // No rationale, no rationale view.
        assert!(!t(&curated(None, None, " "), StepByStep, Teacher).1);
    }

    #[test]
    fn missing_column_names_file_and_column() {
        let mut df = TeacherRow::to_frame(&[row("a", &[])]).unwrap();
        let _ = df.drop_in_place("status").unwrap();
        let err = TeacherRow::from_frame(&df, Path::new("x.parquet"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.parquet") && err.contains("status"), "{err}");
    }
}
