//! The schemas of every stage file, in one place. Each row type converts to and from a
//! Polars frame; readers check columns and types and name the file when one is wrong.
//! `SCHEMA_VERSION` (in io::manifest) changes whenever a column here changes.

use crate::io::parquet::require;
use anyhow::Result;
use polars::prelude::*;
use std::path::Path;

/// One user input after the field mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRow {
    pub id: String,
    pub input: String,
    pub gold: Option<String>,
}

/// How a row's soft label was obtained, best first (DESIGN.md).
pub const SOFT_LABEL_SCORES: &str = "label_scores";
pub const SOFT_NONE: &str = "none";

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
    pub soft_labels: Vec<String>,
    pub soft_probs: Vec<f64>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: f64,
    pub teacher: String,
    pub prompt_hash: String,
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
                "prompt_tokens".into(),
                rows.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>(),
            ),
            Column::new(
                "completion_tokens".into(),
                rows.iter().map(|r| r.completion_tokens).collect::<Vec<_>>(),
            ),
            Column::new(
                "latency_ms".into(),
                rows.iter().map(|r| r.latency_ms).collect::<Vec<_>>(),
            ),
            Column::new("teacher".into(), s(|r| &r.teacher)),
            Column::new("prompt_hash".into(), s(|r| &r.prompt_hash)),
        ];
        let mut df = DataFrame::new_infer_height(cols)?;
        cast_lists(&mut df)?;
        Ok(df)
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
        let (pt, ct, lat) = (
            c.u32("prompt_tokens")?,
            c.u32("completion_tokens")?,
            c.f64("latency_ms")?,
        );
        let (teacher, prompt_hash) = (c.str("teacher")?, c.str("prompt_hash")?);
        let mut out = Vec::with_capacity(df.height());
        for i in 0..df.height() {
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
                prompt_tokens: pt.get(i).unwrap_or(0),
                completion_tokens: ct.get(i).unwrap_or(0),
                latency_ms: lat.get(i).unwrap_or(0.0),
                teacher: opt_str(teacher, i).unwrap_or_default(),
                prompt_hash: opt_str(prompt_hash, i).unwrap_or_default(),
            });
        }
        Ok(out)
    }
}

/// Empty lists infer as List(Null); give every list column its declared inner type.
fn cast_lists(df: &mut DataFrame) -> Result<()> {
    for (name, inner) in [
        ("soft_labels", DataType::String),
        ("soft_probs", DataType::Float64),
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
    pub input: String,
    pub gold: Option<String>,
    pub rationale: String,
    /// The teacher's answer.
    pub answer: String,
    pub soft_kind: String,
    pub soft_labels: Vec<String>,
    pub soft_probs: Vec<f64>,
}

/// The columns of a curated split file, in order.
pub const CURATED_COLUMNS: [&str; 8] = [
    "id",
    "input",
    "gold",
    "rationale",
    "answer",
    "soft_kind",
    "soft_labels",
    "soft_probs",
];

impl CuratedRow {
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
        let mut out = Vec::with_capacity(df.height());
        for i in 0..df.height() {
            out.push(CuratedRow {
                id: opt_str(id, i).unwrap_or_default(),
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
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, labels: &[&str]) -> TeacherRow {
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
            prompt_tokens: 3,
            completion_tokens: 4,
            latency_ms: 1.5,
            teacher: "t".into(),
            prompt_hash: "h".into(),
        }
    }

    #[test]
    fn teacher_rows_round_trip_through_parquet() {
        let rows = vec![row("a", &["joy", "anger"]), row("b", &[])];
        let mut df = TeacherRow::to_frame(&rows).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        crate::io::parquet::write_frame(&path, &mut df).unwrap();
        let back =
            TeacherRow::from_frame(&crate::io::parquet::read_frame(&path).unwrap(), &path).unwrap();
        assert_eq!(back, rows);
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
