//! Writing the kept rows to the split files without holding them whole. The rules read
//! only the columns they judge by (`RULE_COLUMNS`) and hand on only what they compute
//! (`rules::KEPT_COLUMNS`); a teacher row's other curated columns (its input, rationale,
//! raw text and token top-k: most of its bytes) are read again here by Polars' streaming
//! engine, all rows in order a batch at a time; the kept rows among a batch (from a
//! `KeptRows` source, also in row order) get them and are appended to their split's file.

use super::report::KeptStats;
use super::rules::teacher_column;
use super::spill::stack;
use crate::io::parquet::ROW_GROUP_ROWS;
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

/// Bytes of teacher batches streamed between two returns of the freed heap to the OS
/// (`alloc::give_back_freed_so_far`): every few dozen batches of rows without token top-k,
/// every ~3 with top-20 (~6.5 KB a row in memory).
const GIVE_BACK_BYTES: usize = 1 << 30;

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
    /// Rows not written yet: fewer than a row group's.
    pending: Vec<DataFrame>,
    rows: usize,
    topk_tokens: usize,
}

impl Writer {
    /// A writer of `<dir>/<split>.parquet`, rows of `schema`.
    fn create(split: &'static str, dir: &Path, schema: &Schema) -> Result<Writer> {
        let path = dir.join(format!("{split}.parquet"));
        let file = std::fs::File::create(&path)?;
        let inner = crate::io::parquet::output_writer(file, schema).batched(schema)?;
        Ok(Writer {
            split,
            path,
            inner,
            pending: vec![],
            rows: 0,
            topk_tokens: 0,
        })
    }

    /// The rows still pending written, the file closed.
    fn finish(mut self) -> Result<SplitFile> {
        self.write_pending(true)?;
        self.inner.finish()?;
        Ok(SplitFile {
            split: self.split,
            path: self.path,
            rows: self.rows,
            topk_tokens: self.topk_tokens,
        })
    }

    /// Add `part`'s rows; write each full row group (`ROW_GROUP_ROWS`) they complete.
    ///
    /// The batched writer makes a row group of every frame it is given, and a teacher
    /// batch's kept rows of one split are a few thousand (val and test ~2,100 at 10M):
    /// hundreds of small row groups a file, each paying the writer's fixed costs (a
    /// cardinality estimate a column, a compression context a page).
    fn add(&mut self, part: DataFrame) -> Result<()> {
        self.rows += part.height();
        self.topk_tokens += stored_tokens(&part);
        let pending_rows: usize = self.pending.iter().map(DataFrame::height).sum();
        if pending_rows + part.height() < ROW_GROUP_ROWS {
            // Rows that wait for a later batch would keep the buffers their strings point
            // into, the whole teacher batch's and merged segments', alive until then.
            self.pending.push(own_strings(part)?);
            return Ok(());
        }
        self.pending.push(part);
        self.write_pending(false)
    }

    /// Write the pending rows in row groups of `ROW_GROUP_ROWS`, the last, shorter one
    /// too when `all`; the rest stay pending.
    fn write_pending(&mut self, all: bool) -> Result<()> {
        let mut rows = stack(&std::mem::take(&mut self.pending))?;
        // The rule columns and the streamed ones come chunked differently; a row group
        // needs them aligned.
        rows.rechunk_mut();
        let mut at = 0;
        while rows.height() - at >= ROW_GROUP_ROWS || (all && at < rows.height()) {
            let group = rows.slice(at as i64, ROW_GROUP_ROWS);
            self.inner.write_batch(&group)?;
            at += group.height();
        }
        if at < rows.height() {
            self.pending.push(rows.slice(at as i64, rows.height() - at));
        }
        Ok(())
    }
}

/// Kept rows, in row order, each with the rules' columns (`rules::KEPT_COLUMNS`, and
/// `rules::ENSEMBLE_COLUMNS` when an ensemble rewrote them), `ROW`, `completion_tokens`
/// and its `split`.
pub trait KeptRows: Send + 'static {
    /// The types of the rules' columns (and `split`).
    fn schema(&self) -> Schema;
    /// The kept rows not given before whose `ROW` is below `below`.
    fn take_below(&mut self, below: u32) -> Result<DataFrame>;
}

/// The curated columns that come from the teacher files rather than the rules' output.
fn carried_columns(kept: &Schema) -> Vec<&'static str> {
    CURATED_COLUMNS
        .iter()
        .copied()
        .filter(|c| !kept.contains(c))
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

struct Sink<K> {
    kept: K,
    writers: Vec<Writer>,
    stats: KeptStats,
    /// The row index the next teacher batch must start at.
    next_row: u64,
    progress: Progress,
    /// Bytes of the batches taken since the freed heap last went back.
    taken_bytes: usize,
}

/// A line on stderr each tenth of the teacher rows, when there are many.
struct Progress {
    rows_in: u64,
    started: std::time::Instant,
    shown: u64,
}

impl Progress {
    fn show(&mut self, done: u64) {
        let tenth = self.rows_in / 10;
        if self.rows_in < 1_000_000 || done < self.shown + tenth {
            return;
        }
        self.shown = done;
        let secs = self.started.elapsed().as_secs_f64();
        let rate = done as f64 / secs.max(1e-9);
        eprintln!(
            "curate: split files, {done}/{} rows read again, {rate:.0} rows/s, eta {:.0} s",
            self.rows_in,
            (self.rows_in - done) as f64 / rate
        );
    }
}

impl<K: KeptRows> Sink<K> {
    /// A batch of teacher rows (`ROW` and the carried columns), the next ones in order:
    /// the kept rows among them, completed with those columns, go to their split files.
    fn take(&mut self, batch: DataFrame) -> Result<()> {
        let rows = batch.column(ROW)?.cast(&DataType::UInt64)?;
        let rows = rows.u64()?;
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(());
        };
        anyhow::ensure!(
            first == self.next_row && last + 1 - first == batch.height() as u64,
            "the teacher rows were read again out of order (rows {first}–{last}, expected from {})",
            self.next_row
        );
        self.next_row = last + 1;
        self.progress.show(self.next_row);
        self.taken_bytes += batch.estimated_size();
        if self.taken_bytes >= GIVE_BACK_BYTES {
            // The earlier batches' copies are freed by now.
            crate::alloc::give_back_freed_so_far();
            self.taken_bytes = 0;
        }
        let kept = self.kept.take_below((last + 1) as u32)?;
        if kept.height() == 0 {
            return Ok(());
        }
        let at: Vec<IdxSize> = kept
            .column(ROW)?
            .cast(&DataType::UInt64)?
            .u64()?
            .into_no_null_iter()
            .map(|r| (r - first) as IdxSize)
            .collect();
        let carried = batch.take(&IdxCa::from_vec("".into(), at))?;
        let mut whole = kept;
        for c in carried
            .columns()
            .iter()
            .filter(|c| c.name().as_str() != ROW)
        {
            whole.with_column(c.clone())?;
        }
        self.stats.add(&whole)?;
        for w in self.writers.iter_mut() {
            let part = whole
                .clone()
                .lazy()
                .filter(col("split").eq(lit(w.split)))
                .select(CURATED_COLUMNS.iter().map(|c| col(*c)).collect::<Vec<_>>())
                .collect()?;
            if part.height() > 0 {
                w.add(part)?;
            }
        }
        Ok(())
    }
}

/// `df` with each string column's text copied into buffers of its own.
fn own_strings(df: DataFrame) -> Result<DataFrame> {
    let columns = df
        .columns()
        .iter()
        .map(|c| -> Result<Column> {
            if c.dtype() != &DataType::String {
                return Ok(c.clone());
            }
            let owned: StringChunked = c.str()?.iter().collect();
            Ok(owned.with_name(c.name().clone()).into_column())
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DataFrame::new(df.height(), columns)?)
}

/// Write the kept rows with the rest of each row's curated columns, read again from the
/// teacher files (all rows, in order, a batch at a time), to `<dir>/<split>.parquet`, one
/// file per split (empty when no row went there). Returns the files, the kept rows'
/// figures for the report and the source of kept rows, drained.
pub fn write<K: KeptRows>(
    files: &[PathBuf],
    rows_in: usize,
    kept: K,
    dir: &Path,
    splits: [&'static str; 3],
) -> Result<(Vec<SplitFile>, KeptStats, K)> {
    let kept_schema = kept.schema();
    let carried = carried_columns(&kept_schema);
    let source = teacher_scan(files)?.select(
        std::iter::once(col(ROW))
            .chain(carried.iter().map(|c| teacher_column(c)))
            .collect::<Vec<_>>(),
    );
    let mut schema = Schema::default();
    let carried_schema = source.clone().collect_schema()?;
    for name in CURATED_COLUMNS {
        let dtype = match kept_schema.get(name) {
            Some(t) => t.clone(),
            None => carried_schema
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow!("the teacher rows have no column {name:?}\nhint: they were written by another kdpipe version; re-run kdpipe generate"))?,
        };
        schema.insert(name.into(), dtype);
    }
    let writers = splits
        .into_iter()
        .map(|split| Writer::create(split, dir, &schema))
        .collect::<Result<_>>()?;

    let state = Arc::new(Mutex::new(Some(Sink {
        kept,
        writers,
        stats: KeptStats::default(),
        next_row: 0,
        taken_bytes: 0,
        progress: Progress {
            rows_in: rows_in as u64,
            started: std::time::Instant::now(),
            shown: 0,
        },
    })));
    let sink_state = Arc::clone(&state);
    let sink = move |batch: DataFrame| -> PolarsResult<bool> {
        let mut guard = sink_state
            .lock()
            .map_err(|_| polars_err!(ComputeError: "a split writer panicked"))?;
        let sink = guard
            .as_mut()
            .ok_or_else(|| polars_err!(ComputeError: "the split writers are closed"))?;
        sink.take(batch)
            .map_err(|e| polars_err!(ComputeError: "{e:#}"))?;
        Ok(false)
    };
    source
        .sink_batches(
            PlanCallback::new(sink),
            true,
            std::num::NonZeroUsize::new(BATCH_ROWS),
        )?
        .collect_with_engine(Engine::Streaming)?;

    let mut sink = state
        .lock()
        .map_err(|_| anyhow!("a split writer panicked"))?
        .take()
        .ok_or_else(|| anyhow!("the split writers are gone"))?;
    let left = sink.kept.take_below(u32::MAX)?.height();
    anyhow::ensure!(
        left == 0,
        "{left} kept rows were not found again in the teacher files (were they changed during curate?)"
    );
    let written = sink
        .writers
        .into_iter()
        .map(Writer::finish)
        .collect::<Result<_>>()?;
    Ok((written, sink.stats, sink.kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(from: i64, n: i64) -> DataFrame {
        df!(
            "n" => (from..from + n).collect::<Vec<i64>>(),
            "text" => (from..from + n).map(|i| format!("row {i}")).collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn a_split_file_is_written_in_full_row_groups_whatever_the_batches() {
        let dir = tempfile::tempdir().unwrap();
        let schema = rows(0, 1).schema().as_ref().clone();
        let mut writer = Writer::create("train", dir.path(), &schema).unwrap();
        // Batches of a few thousand rows, as a teacher batch's kept rows of one split.
        let sizes = [3_000, 7_001, 2_500, 9_999, 12_000, 1, 5_000];
        let mut from = 0;
        for n in sizes {
            writer.add(rows(from, n)).unwrap();
            from += n;
        }
        let written = writer.finish().unwrap();
        assert_eq!(written.rows, from as usize);

        let file = std::fs::File::open(&written.path).unwrap();
        let mut reader = ParquetReader::new(file);
        let groups: Vec<usize> = reader
            .get_metadata()
            .unwrap()
            .row_groups
            .iter()
            .map(|g| g.num_rows())
            .collect();
        // 39,501 rows: two full row groups and the rest.
        assert_eq!(
            groups,
            [ROW_GROUP_ROWS, ROW_GROUP_ROWS, 39_501 - 2 * ROW_GROUP_ROWS]
        );
        let back = reader.finish().unwrap();
        assert!(back.equals(&rows(0, from)), "{back}");
    }

    #[test]
    fn a_split_with_no_rows_is_an_empty_file_of_its_schema() {
        let dir = tempfile::tempdir().unwrap();
        let schema = rows(0, 1).schema().as_ref().clone();
        let written = Writer::create("val", dir.path(), &schema)
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(written.rows, 0);
        let back = crate::io::parquet::read_frame(&written.path).unwrap();
        assert_eq!(back.height(), 0);
        assert_eq!(back.schema().as_ref(), &schema);
    }
}
