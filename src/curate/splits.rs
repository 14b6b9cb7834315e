//! Writing the kept rows to the split files without holding them whole. The rules read
//! only the columns they judge by (`RULE_COLUMNS`); a teacher row's other columns (its raw
//! text and token top-k: most of its bytes) are read again here, for the kept rows only,
//! by Polars' streaming engine a batch at a time, put beside the kept rows' rule columns
//! (both in teacher-file order) and appended to the split they belong to.

use crate::records::topk_store::stored_tokens;
use crate::records::CURATED_COLUMNS;
use anyhow::{anyhow, Result};
use polars::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The columns of a teacher row the rules read (with the row's index, `ROW`).
pub const RULE_COLUMNS: [&str; 13] = [
    "id",
    "sample",
    "input",
    "gold",
    "rationale",
    "answer",
    "status",
    "soft_kind",
    "soft_labels",
    "soft_probs",
    "soft_coverage",
    "completion_tokens",
    "teacher",
];

/// The index of a row among all teacher rows, in file order.
pub const ROW: &str = "_row";

/// Rows a streamed batch holds at most.
const BATCH_ROWS: usize = 50_000;

/// What one split file got.
pub struct SplitFile {
    pub split: &'static str,
    pub path: PathBuf,
    pub rows: usize,
    pub topk_tokens: usize,
}

struct Writer {
    split: &'static str,
    path: PathBuf,
    inner: polars::io::parquet::write::BatchedWriter<std::fs::File>,
    rows: usize,
    topk_tokens: usize,
}

/// The curated columns that come from the teacher files rather than the rules' output.
fn carried_columns(kept: &DataFrame) -> Vec<&'static str> {
    CURATED_COLUMNS
        .iter()
        .copied()
        .filter(|c| kept.column(c).is_err())
        .collect()
}

/// All teacher rows, in file order, with their row index.
fn teacher_scan(files: &[PathBuf]) -> Result<LazyFrame> {
    let scans = files
        .iter()
        .map(|f| crate::io::parquet::scan(f))
        .collect::<PolarsResult<Vec<_>>>()?;
    Ok(concat(scans, UnionArgs::default())?.with_row_index(ROW, None))
}

/// Write `kept` (the rules' output: rule columns, `ROW`, `split`, in row order) with the
/// rest of each row's curated columns to `<dir>/<split>.parquet`, one file per split
/// (empty when no row went there).
pub fn write(
    files: &[PathBuf],
    kept: &DataFrame,
    dir: &Path,
    splits: [&'static str; 3],
) -> Result<Vec<SplitFile>> {
    let carried = carried_columns(kept);
    let source = teacher_scan(files)?.select(
        std::iter::once(col(ROW))
            .chain(carried.iter().map(|c| col(*c)))
            .collect::<Vec<_>>(),
    );
    let mut schema = Schema::default();
    let carried_schema = source.clone().collect_schema()?;
    for name in CURATED_COLUMNS {
        let dtype = match kept.schema().get(name) {
            Some(t) => t.clone(),
            None => carried_schema
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow!("the teacher rows have no column {name:?}\nhint: they were written by another kdpipe version; re-run kdpipe generate"))?,
        };
        schema.insert(name.into(), dtype);
    }
    let mut writers = Vec::new();
    for split in splits {
        let path = dir.join(format!("{split}.parquet"));
        let file = std::fs::File::create(&path)?;
        let inner = ParquetWriter::new(file)
            .with_compression(ParquetCompression::Zstd(None))
            .with_row_group_size(Some(crate::io::parquet::ROW_GROUP_ROWS))
            .batched(&schema)?;
        writers.push(Writer {
            split,
            path,
            inner,
            rows: 0,
            topk_tokens: 0,
        });
    }

    let rows = kept.column(ROW)?.as_materialized_series().clone();
    let state = Arc::new(Mutex::new((writers, 0usize)));
    let sink_state = Arc::clone(&state);
    let kept_rules = kept.clone();
    let sink = move |batch: DataFrame| -> PolarsResult<bool> {
        let mut guard = sink_state
            .lock()
            .map_err(|_| polars_err!(ComputeError: "a split writer panicked"))?;
        let (writers, at) = &mut *guard;
        let rules = kept_rules.slice(*at as i64, batch.height());
        *at += batch.height();
        // Both sides are the kept rows in file order: the same row at each position.
        if !rules.column(ROW)?.equals(batch.column(ROW)?) {
            polars_bail!(ComputeError: "the kept rows and the teacher rows read again are not in the same order");
        }
        let mut whole = rules;
        for c in batch.columns().iter().filter(|c| c.name().as_str() != ROW) {
            whole.with_column(c.clone())?;
        }
        for w in writers.iter_mut() {
            let mut part = whole
                .clone()
                .lazy()
                .filter(col("split").eq(lit(w.split)))
                .select(CURATED_COLUMNS.iter().map(|c| col(*c)).collect::<Vec<_>>())
                .collect()?;
            if part.height() > 0 {
                // The rule columns and the streamed ones come chunked differently; a
                // Parquet row group needs them aligned.
                part.align_chunks();
                w.topk_tokens += stored_tokens(&part);
                w.rows += part.height();
                w.inner.write_batch(&part)?;
            }
        }
        Ok(false)
    };
    source
        .filter(col(ROW).is_in(lit(rows), false))
        .sink_batches(
            PlanCallback::new(sink),
            true,
            std::num::NonZeroUsize::new(BATCH_ROWS),
        )?
        .collect_with_engine(Engine::Streaming)?;

    let (writers, written) = std::mem::take(
        &mut *state
            .lock()
            .map_err(|_| anyhow!("a split writer panicked"))?,
    );
    anyhow::ensure!(
        written == kept.height(),
        "{written} of the {} kept rows were found again in the teacher files (were they changed during curate?)",
        kept.height()
    );
    writers
        .into_iter()
        .map(|w| {
            w.inner.finish()?;
            Ok(SplitFile {
                split: w.split,
                path: w.path,
                rows: w.rows,
                topk_tokens: w.topk_tokens,
            })
        })
        .collect()
}
