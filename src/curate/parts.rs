//! Curate's rows in parts that each fit in memory. First the rule columns of all teacher
//! rows are streamed once from the teacher files and spread over part files by a hash of
//! each row's normalized input, so every group the head rules judge (an input's samples,
//! exact duplicates) lies whole in one part. After the head rules, each part's kept rows
//! are read back a slice at a time and merged in row order for the split files, the late
//! rules (`rules::LateRules`) judging them on the way.

use super::rules::{LateRules, KEPT_COLUMNS};
use super::splits::{KeptRows, ROW, RULE_COLUMNS};
use crate::dedup::{hash64, normalize};
use crate::io::parquet::{read_frame, scan, ROW_GROUP_ROWS};
use crate::records::TeacherRow;
use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Rows buffered at most over all parts before they are written, and the kept rows held
/// at most over all parts while they are merged (rule columns: about a kilobyte a row).
pub const HELD_ROWS: usize = 1 << 19;

/// A writer of curate's own temporary files: fast compression (LZ4) and no statistics;
/// they are read once, in full or by row slices.
fn temp_writer(file: std::fs::File) -> ParquetWriter<std::fs::File> {
    ParquetWriter::new(file)
        .with_compression(ParquetCompression::Lz4Raw)
        .with_statistics(StatisticsOptions::empty())
}

/// The rule columns of all teacher files, in file order with their row index (`ROW`);
/// each file's columns checked, naming the file.
pub fn rule_scan(files: &[PathBuf]) -> Result<LazyFrame> {
    let mut scans = vec![];
    for f in files {
        let unreadable = || format!("{} is not a readable Parquet file", f.display());
        let s = anyhow::Context::with_context(scan(f), unreadable)?;
        let schema = anyhow::Context::with_context(s.clone().collect_schema(), unreadable)?;
        let present: Vec<Expr> = RULE_COLUMNS
            .iter()
            .filter(|c| schema.contains(c))
            .map(|c| col(*c))
            .collect();
        let s = s.select(present);
        TeacherRow::check_columns(&s.clone().limit(0).collect()?, f)?;
        scans.push(s);
    }
    Ok(concat(scans, UnionArgs::default())?.with_row_index(ROW, None))
}

fn no_rows(files: &[PathBuf]) -> anyhow::Error {
    anyhow!(
        "{} hold no teacher rows\nhint: check [data] inputs and --limit, then re-run kdpipe generate",
        files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// The rule columns of all teacher rows in memory at once (at least one row), for the
/// rules on all rows (`kdpipe curate --explain`).
pub fn all_rows(files: &[PathBuf]) -> Result<DataFrame> {
    let all = rule_scan(files)?.collect()?;
    if all.height() == 0 {
        return Err(no_rows(files));
    }
    Ok(all)
}

/// The rows of a scan (from the Parquet footers).
fn row_count(scan: LazyFrame) -> Result<usize> {
    let counted = scan.select([len()]).collect()?;
    let n = counted.column("len")?.cast(&DataType::UInt64)?;
    Ok(n.u64()?.get(0).unwrap_or(0) as usize)
}

/// The parts the teacher rows were spread over.
pub struct Partition {
    pub parts: Vec<Part>,
    pub rows_in: usize,
}

/// One part's rule columns: a part file, or, when one part holds every row, the scan of
/// the teacher files itself (nothing to spread).
pub enum Part {
    File(PathBuf),
    Whole(Box<LazyFrame>),
}

impl Part {
    /// The part's rows, in row order (a part file is removed once read).
    pub fn take(self) -> Result<DataFrame> {
        match self {
            Part::File(path) => {
                let df = read_frame(&path)?;
                std::fs::remove_file(&path)?;
                Ok(df)
            }
            Part::Whole(scan) => Ok(scan.collect()?),
        }
    }
}

/// Spread the rule columns of all teacher rows over ⌈rows / part_rows⌉ part files in
/// `dir`, each in row order.
pub fn partition(files: &[PathBuf], dir: &Path, part_rows: usize) -> Result<Partition> {
    let source = rule_scan(files)?;
    let rows_in = row_count(source.clone())?;
    if rows_in == 0 {
        return Err(no_rows(files));
    }
    if rows_in > u32::MAX as usize {
        bail!("{rows_in} teacher rows: curate takes at most {} in one run\nhint: curate the shards in groups", u32::MAX);
    }
    let parts = rows_in.div_ceil(part_rows.max(1)).max(1);
    if parts == 1 {
        return Ok(Partition {
            parts: vec![Part::Whole(Box::new(source))],
            rows_in,
        });
    }
    std::fs::create_dir_all(dir)?;
    let schema = source.clone().collect_schema()?;
    let mut writers = vec![];
    let mut paths = vec![];
    for p in 0..parts {
        let path = dir.join(format!("part-{p:05}.parquet"));
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        writers.push(temp_writer(file).batched(&schema)?);
        paths.push(path);
    }
    let flush_rows = (HELD_ROWS / parts).clamp(1024, ROW_GROUP_ROWS * 4);
    let state = Arc::new(Mutex::new(Spread {
        writers,
        buffered: (0..parts).map(|_| vec![]).collect(),
        flush_rows,
        next_row: 0,
    }));
    let sink_state = Arc::clone(&state);
    let sink = move |batch: DataFrame| -> PolarsResult<bool> {
        let mut spread = sink_state
            .lock()
            .map_err(|_| polars_err!(ComputeError: "a part writer panicked"))?;
        spread.add(batch)?;
        Ok(false)
    };
    source
        .sink_batches(
            PlanCallback::new(sink),
            true,
            std::num::NonZeroUsize::new(65_536),
        )?
        .collect_with_engine(Engine::Streaming)?;
    let mut spread = std::mem::take(
        &mut *state
            .lock()
            .map_err(|_| anyhow!("a part writer panicked"))?,
    );
    for p in 0..parts {
        spread.flush(p)?;
    }
    for w in spread.writers {
        w.finish()?;
    }
    Ok(Partition {
        parts: paths.into_iter().map(Part::File).collect(),
        rows_in,
    })
}

#[derive(Default)]
struct Spread {
    writers: Vec<polars::io::parquet::write::BatchedWriter<std::fs::File>>,
    buffered: Vec<Vec<DataFrame>>,
    flush_rows: usize,
    /// The row the next batch must start at: parts are written in row order.
    next_row: u64,
}

impl Spread {
    fn add(&mut self, batch: DataFrame) -> PolarsResult<()> {
        use rayon::prelude::*;
        let rows = batch.column(ROW)?.cast(&DataType::UInt64)?;
        if let Some(first) = rows.u64()?.first() {
            if first != self.next_row {
                polars_bail!(ComputeError: "the teacher rows came out of order (row {first}, expected {})", self.next_row);
            }
            self.next_row += batch.height() as u64;
        }
        let parts = self.writers.len();
        let inputs: Vec<&str> = batch
            .column("input")?
            .str()?
            .iter()
            .map(|t| t.unwrap_or(""))
            .collect();
        // An input's samples come one after another: hash each run of equal inputs once,
        // the runs across the cores.
        let starts: Vec<usize> = (0..inputs.len())
            .filter(|&i| i == 0 || inputs[i] != inputs[i - 1])
            .collect();
        let part_of_run: Vec<usize> = starts
            .par_iter()
            .map(|&i| (hash64(&normalize(inputs[i])) % parts as u64) as usize)
            .collect();
        let mut rows_of: Vec<Vec<IdxSize>> = vec![vec![]; parts];
        for (run, &start) in starts.iter().enumerate() {
            let end = starts.get(run + 1).copied().unwrap_or(inputs.len());
            rows_of[part_of_run[run]].extend((start..end).map(|i| i as IdxSize));
        }
        for (p, rows) in rows_of.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let idx = IdxCa::from_vec("".into(), rows);
            self.buffered[p].push(batch.take(&idx)?);
            if self.buffered[p]
                .iter()
                .map(DataFrame::height)
                .sum::<usize>()
                >= self.flush_rows
            {
                self.flush(p)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, p: usize) -> PolarsResult<()> {
        let frames = std::mem::take(&mut self.buffered[p]);
        if frames.is_empty() {
            return Ok(());
        }
        let mut df = stack(&frames)?;
        df.align_chunks();
        self.writers[p].write_batch(&df)
    }
}

/// Frames of one schema, one after another.
fn stack(frames: &[DataFrame]) -> PolarsResult<DataFrame> {
    let mut out = frames.first().cloned().unwrap_or_default();
    for f in frames.iter().skip(1) {
        out.vstack_mut(f)?;
    }
    Ok(out)
}

/// Write a part's kept rows for `PartsKept`, in row groups of the rows it reads at once.
pub fn write_kept(path: &Path, df: &mut DataFrame, group_rows: usize) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let written = temp_writer(file)
        .with_row_group_size(Some(group_rows))
        .finish(df);
    anyhow::Context::with_context(written, || format!("cannot write {}", path.display()))?;
    Ok(())
}

/// One part's kept rows (a Parquet file in row order), read a slice at a time.
struct Cursor {
    path: PathBuf,
    rows: usize,
    read: usize,
    slice_rows: usize,
    current: DataFrame,
    current_rows: Vec<u32>,
    at: usize,
}

impl Cursor {
    fn open(path: PathBuf, slice_rows: usize) -> Result<Cursor> {
        let rows = row_count(scan(&path)?)?;
        Ok(Cursor {
            path,
            rows,
            read: 0,
            slice_rows,
            current: DataFrame::empty(),
            current_rows: vec![],
            at: 0,
        })
    }

    /// The rows not taken before whose `ROW` is below `below`.
    fn take_below(&mut self, below: u32, out: &mut Vec<DataFrame>) -> Result<()> {
        loop {
            if self.at == self.current_rows.len() {
                if self.read == self.rows {
                    return Ok(());
                }
                self.current = scan(&self.path)?
                    .slice(self.read as i64, self.slice_rows as IdxSize)
                    .collect()?;
                self.read += self.current.height();
                self.current_rows = self
                    .current
                    .column(ROW)?
                    .cast(&DataType::UInt32)?
                    .u32()?
                    .into_no_null_iter()
                    .collect();
                self.at = 0;
                if self.current_rows.is_empty() {
                    bail!(
                        "{} ended before its {} rows",
                        self.path.display(),
                        self.rows
                    );
                }
            }
            let n = self.current_rows[self.at..].partition_point(|&r| r < below);
            if n > 0 {
                out.push(self.current.slice(self.at as i64, n));
                self.at += n;
            }
            if self.at < self.current_rows.len() {
                return Ok(());
            }
        }
    }
}

/// The head-kept rows of all parts, merged in row order and judged by the late rules.
pub struct PartsKept {
    cursors: Vec<Cursor>,
    schema: Schema,
    pub late: LateRules,
}

impl PartsKept {
    /// Over the parts' kept-row files (each in row order, with `_gid`), reading
    /// `slice_rows` rows of a file at a time.
    pub fn new(files: Vec<PathBuf>, slice_rows: usize, late: LateRules) -> Result<PartsKept> {
        let first = files
            .first()
            .ok_or_else(|| anyhow!("curate has no parts"))?;
        let schema = scan(first)?.collect_schema()?.as_ref().clone();
        Ok(PartsKept {
            cursors: files
                .into_iter()
                .map(|f| Cursor::open(f, slice_rows))
                .collect::<Result<_>>()?,
            schema,
            late,
        })
    }
}

impl KeptRows for PartsKept {
    fn schema(&self) -> Schema {
        let mut schema: Schema = KEPT_COLUMNS
            .iter()
            .filter_map(|c| self.schema.get_field(c))
            .collect();
        schema.insert("split".into(), DataType::String);
        schema
    }

    fn take_below(&mut self, below: u32) -> Result<DataFrame> {
        let mut slices = vec![];
        for c in &mut self.cursors {
            c.take_below(below, &mut slices)?;
        }
        if slices.is_empty() {
            let mut schema = self.schema.clone();
            schema.insert("split".into(), DataType::String);
            return Ok(DataFrame::empty_with_schema(&schema));
        }
        let rows = stack(&slices)?.sort([ROW], SortMultipleOptions::default())?;
        let (keep, split) = self.late.judge(&rows)?;
        let mut rows = rows;
        rows.with_column(Column::new("split".into(), split))?;
        Ok(rows.filter(&BooleanChunked::from_slice("".into(), &keep))?)
    }
}
