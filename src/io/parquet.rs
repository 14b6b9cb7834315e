//! Parquet files between stages: written atomically, read with a clear error naming the
//! file and the missing or mistyped column.

use super::atomic::write_with;
use anyhow::{bail, Context, Result};
use polars::io::parquet::write::KeyValueMetadata;
use polars::prelude::*;
use std::path::Path;

/// Rows in a Parquet row group: readers that stream (curate's second pass) hold a row
/// group's columns decoded at once, and a teacher row with token top-k is a few KB.
pub const ROW_GROUP_ROWS: usize = 16_384;

/// The `ARROW:schema` metadata that Parquet readers restore each column's Arrow type from,
/// in Arrow's long-standing types (`large_string`, `large_binary`, `large_list`) rather than
/// the string and binary views Polars declares by default: pandas (with pyarrow 26) cannot
/// turn a list of string views into its default NumPy columns, so `pd.read_parquet` on a
/// file with `soft_labels` or `topk_texts` failed. The pages are the same either way
/// (Parquet stores both as BYTE_ARRAY), and Polars reads either back as its String and
/// Binary (docs/STACK.md).
fn portable_schema(schema: &Schema) -> KeyValueMetadata {
    let arrow = schema.to_arrow(CompatLevel::oldest());
    KeyValueMetadata::Static(vec![polars_parquet::write::schema_to_metadata_key(&arrow)])
}

/// A writer of a file other stages and tools read, rows of `schema`: Zstd pages and the
/// portable schema (`portable_schema`). Curate's temporary files are not written this way.
pub fn output_writer<W: std::io::Write>(file: W, schema: &Schema) -> ParquetWriter<W> {
    ParquetWriter::new(file)
        .with_compression(ParquetCompression::Zstd(None))
        .with_key_value_metadata(Some(portable_schema(schema)))
}

pub fn write_frame(path: &Path, df: &mut DataFrame) -> Result<()> {
    write_with(path, |file| {
        let written = output_writer(file, df.schema())
            .with_row_group_size(Some(ROW_GROUP_ROWS))
            .finish(df);
        anyhow::Context::with_context(written, || {
            format!("cannot write Parquet {}", path.display())
        })?;
        Ok(())
    })
}

pub fn read_frame(path: &Path) -> Result<DataFrame> {
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    anyhow::Context::with_context(ParquetReader::new(file).finish(), || {
        format!("{} is not a readable Parquet file", path.display())
    })
}

/// A lazy scan of a Parquet file (reads only what the plan selects).
pub fn scan(path: &Path) -> PolarsResult<LazyFrame> {
    LazyFrame::scan_parquet(
        PlRefPath::new(path.to_string_lossy().as_ref()),
        ScanArgsParquet::default(),
    )
}

/// Rows as JSON objects, for `kdpipe show`.
pub fn rows_as_json(df: &DataFrame, limit: usize) -> Result<Vec<serde_json::Value>> {
    let n = df.height().min(limit);
    let mut rows = vec![serde_json::Map::new(); n];
    for col in df.columns() {
        let s = col.as_materialized_series();
        for (i, row) in rows.iter_mut().enumerate() {
            let v = any_to_json(s.get(i)?);
            row.insert(col.name().to_string(), v);
        }
    }
    Ok(rows.into_iter().map(serde_json::Value::Object).collect())
}

fn any_to_json(v: AnyValue) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        AnyValue::Null => J::Null,
        AnyValue::Boolean(b) => J::Bool(b),
        AnyValue::String(s) => J::String(s.to_string()),
        AnyValue::StringOwned(s) => J::String(s.to_string()),
        AnyValue::UInt32(x) => J::from(x),
        AnyValue::UInt64(x) => J::from(x),
        AnyValue::Int32(x) => J::from(x),
        AnyValue::Int64(x) => J::from(x),
        AnyValue::Float32(x) => J::from(x as f64),
        AnyValue::Float64(x) => J::from(x),
        AnyValue::List(s) => J::Array(s.iter().map(any_to_json).collect()),
        other => J::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{tests_support::row, TeacherRow, TokenTopk};

    #[test]
    fn teacher_rows_round_trip_through_parquet() {
        let mut with_tokens = row("c", &[]);
        with_tokens.tokens = TokenTopk {
            ids: vec![5, 9],
            logprobs: vec![-0.1, -0.2],
            top_ids: vec![vec![5, 6], vec![9, 1]],
            top_logprobs: vec![vec![-0.1, -3.0], vec![-0.2, -3.0]],
            ..TokenTopk::default()
        };
        with_tokens.seed = Some(42);
        let rows = vec![row("a", &["joy", "anger"]), row("b", &[]), with_tokens];
        let mut df = TeacherRow::to_frame(&rows).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        write_frame(&path, &mut df).unwrap();
        let mut back = TeacherRow::from_frame(&read_frame(&path).unwrap(), &path).unwrap();
        // The top-k log-probabilities come back through 16-bit codes (records::topk_store).
        let (stored, exact) = (&back[2].tokens.top_logprobs, &rows[2].tokens.top_logprobs);
        for (a, b) in stored.iter().flatten().zip(exact.iter().flatten()) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
        back[2].tokens.top_logprobs = exact.clone();
        assert_eq!(back, rows);
    }
}
