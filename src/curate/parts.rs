//! Curate's rows in parts that each fit in memory. First the rule columns of all teacher
//! rows are streamed once from the teacher files and spread over part files by a hash of
//! each row's normalized input, so every group the head rules judge (an input's samples,
//! exact duplicates) lies whole in one part. After the head rules, each part's kept rows
//! are read back a slice at a time and merged in row order for the split files, the late
//! rules (`rules::LateRules`) judging them on the way.

use super::rules::{LateRules, ENSEMBLE_COLUMNS, KEPT_COLUMNS};
use super::spill::{stack, SpillFile};
use super::splits::{KeptRows, ROW, RULE_COLUMNS};
use crate::dedup::{hash64, normalize};
use crate::io::parquet::scan;
use crate::records::TeacherRow;
use anyhow::{anyhow, bail, Result};
use polars::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Rows buffered at most over all parts before they are written, and the kept rows held
/// at most over all parts while they are merged (rule columns: about a kilobyte a row).
pub const HELD_ROWS: usize = 1 << 19;

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

/// One part's rule columns: its file (a segment a flush of the spread, in row order), or,
/// when one part holds every row, the scan of the teacher files itself (nothing to spread).
pub enum Part {
    Spilled(SpillFile),
    Whole(Box<LazyFrame>),
}

impl Part {
    /// The part's rows, in row order (its file is removed once read).
    pub fn take(self) -> Result<DataFrame> {
        match self {
            Part::Spilled(file) => {
                let df = file.read_all()?;
                file.remove()?;
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
    let held_rows = spread_rows(parts, part_rows);
    let state = Arc::new(Mutex::new(Spread {
        dir: dir.to_path_buf(),
        files: (0..parts).map(|_| None).collect(),
        buffered: (0..parts).map(|_| vec![]).collect(),
        buffered_rows: 0,
        held_rows,
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
            std::num::NonZeroUsize::new(held_rows.min(65_536)),
        )?
        .collect_with_engine(Engine::Streaming)?;
    let mut spread = std::mem::take(
        &mut *state
            .lock()
            .map_err(|_| anyhow!("a part writer panicked"))?,
    );
    spread.flush_all()?;
    Ok(Partition {
        // A part no input hashed to has no file and nothing to judge.
        parts: spread
            .files
            .into_iter()
            .flatten()
            .map(Part::Spilled)
            .collect(),
        rows_in,
    })
}

/// Rows a part's segment holds at least when the spread flushes, where memory allows.
const SEGMENT_ROWS: usize = 10_000;

/// Rows the spread buffers before it writes: a segment of `SEGMENT_ROWS` for every part,
/// within one to four parts' worth (a part's worth is `part_rows`, at most `HELD_ROWS`),
/// so this pass's memory follows part_rows like the others'.
///
/// Each segment costs the Parquet writer and reader a fixed amount, and with one part's
/// worth buffered the segments grow with the square of the rows (~39,000 of ~2,600 rows
/// at 100M, 400 at 10M): the partition took ×1.14–1.23 the time a row of 10M at 100M.
/// With this, 2M rows buffered at 100M (~10,000 segments), ×1.03–1.05. The buffer's
/// ~2 GB is given back when the pass ends (`alloc::giving_back_after`, in `curate`).
fn spread_rows(parts: usize, part_rows: usize) -> usize {
    let part = part_rows.clamp(1, HELD_ROWS);
    parts.saturating_mul(SEGMENT_ROWS).clamp(part, 4 * part)
}

#[derive(Default)]
struct Spread {
    dir: PathBuf,
    /// Each part's file, once a flush has rows for it; a flush appends a segment to it.
    files: Vec<Option<SpillFile>>,
    /// Each part's rows not yet written: slices of the batches they came in, so all are
    /// written together (a batch is freed once no slice of it is left).
    buffered: Vec<Vec<DataFrame>>,
    buffered_rows: usize,
    /// Rows buffered before all are written.
    held_rows: usize,
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
        let parts = self.files.len();
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
        let mut part_of_row = vec![0usize; inputs.len()];
        for (run, &start) in starts.iter().enumerate() {
            let end = starts.get(run + 1).copied().unwrap_or(inputs.len());
            part_of_row[start..end].fill(part_of_run[run]);
        }
        // One gather puts each part's rows together (a stable sort: row order kept within
        // a part); the parts' shares are slices of it. A gather a part would cost
        // parts × batches calls, which grows with the square of the rows.
        let mut part_rows = vec![0usize; parts];
        for &p in &part_of_row {
            part_rows[p] += 1;
        }
        let order = grouped_order(&part_of_row, &part_rows);
        let grouped = batch.take(&IdxCa::from_vec("".into(), order))?;
        let mut at = 0;
        for (p, &n) in part_rows.iter().enumerate() {
            if n > 0 {
                self.buffered[p].push(grouped.slice(at as i64, n));
            }
            at += n;
        }
        self.buffered_rows += grouped.height();
        if self.buffered_rows >= self.held_rows {
            self.flush_all()?;
        }
        Ok(())
    }

    /// Each part's buffered rows appended to that part's file, the parts across the cores.
    fn flush_all(&mut self) -> PolarsResult<()> {
        use rayon::prelude::*;
        let dir = &self.dir;
        self.buffered
            .par_iter_mut()
            .zip(self.files.par_iter_mut())
            .enumerate()
            .try_for_each(|(p, (buffered, file))| -> PolarsResult<()> {
                let frames = std::mem::take(buffered);
                if frames.is_empty() {
                    return Ok(());
                }
                let mut df = stack(&frames)?;
                df.align_chunks();
                let to_polars = |e: anyhow::Error| polars_err!(ComputeError: "{e:#}");
                let file = match file {
                    Some(file) => file,
                    None => file.insert(
                        SpillFile::create(
                            &dir.join(format!("part-{p:05}.segments")),
                            df.schema().as_ref().clone(),
                        )
                        .map_err(to_polars)?,
                    ),
                };
                file.append(&df).map_err(to_polars)
            })?;
        self.buffered_rows = 0;
        Ok(())
    }
}

/// The rows' indices grouped by part, parts in order and rows in order within a part: a
/// counting sort (`part_rows[p]` rows have part `p`): one write a row, where a comparison
/// sort of a 65,536-row batch makes about 16 comparisons a row.
fn grouped_order(part_of_row: &[usize], part_rows: &[usize]) -> Vec<IdxSize> {
    let mut next: Vec<usize> = part_rows
        .iter()
        .scan(0, |start, &n| {
            let at = *start;
            *start += n;
            Some(at)
        })
        .collect();
    let mut order = vec![0 as IdxSize; part_of_row.len()];
    for (row, &p) in part_of_row.iter().enumerate() {
        order[next[p]] = row as IdxSize;
        next[p] += 1;
    }
    order
}

/// Write a part's kept rows for `PartsKept`, in segments of the rows it reads at once.
pub fn write_kept(path: &Path, df: &DataFrame, segment_rows: usize) -> Result<SpillFile> {
    let mut file = SpillFile::create(path, df.schema().as_ref().clone())?;
    file.append_in_segments(df, segment_rows)?;
    Ok(file)
}

/// One part's kept rows (a file in row order), read a segment at a time.
struct Cursor {
    file: SpillFile,
    next_segment: usize,
    current: DataFrame,
    current_rows: Vec<u32>,
    at: usize,
}

impl Cursor {
    fn open(file: SpillFile) -> Cursor {
        Cursor {
            file,
            next_segment: 0,
            current: DataFrame::empty(),
            current_rows: vec![],
            at: 0,
        }
    }

    /// The rows not taken before whose `ROW` is below `below`.
    fn take_below(&mut self, below: u32, out: &mut Vec<DataFrame>) -> Result<()> {
        loop {
            if self.at == self.current_rows.len() {
                if self.next_segment == self.file.segments() {
                    return Ok(());
                }
                self.current = self.file.read_segment(self.next_segment)?;
                self.next_segment += 1;
                self.current_rows = self
                    .current
                    .column(ROW)?
                    .cast(&DataType::UInt32)?
                    .u32()?
                    .into_no_null_iter()
                    .collect();
                self.at = 0;
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
    /// Over the parts' kept-row files (each in row order, with `_gid`), read a segment of
    /// a file at a time.
    pub fn new(files: Vec<SpillFile>, late: LateRules) -> Result<PartsKept> {
        let first = files
            .first()
            .ok_or_else(|| anyhow!("curate has no parts"))?;
        let schema = first.schema().clone();
        Ok(PartsKept {
            cursors: files.into_iter().map(Cursor::open).collect(),
            schema,
            late,
        })
    }
}

impl KeptRows for PartsKept {
    fn schema(&self) -> Schema {
        let mut schema: Schema = KEPT_COLUMNS
            .iter()
            .chain(&ENSEMBLE_COLUMNS)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_order_puts_parts_in_order_and_keeps_row_order_within_each() {
        let part_of_row = [2, 0, 2, 1, 0, 2, 4];
        let part_rows = [2, 1, 3, 0, 1];
        assert_eq!(
            grouped_order(&part_of_row, &part_rows),
            vec![1, 4, 3, 0, 2, 5, 6]
        );
        assert!(grouped_order(&[], &[0, 0]).is_empty());
    }

    #[test]
    fn the_spread_buffers_a_segment_a_part_within_one_to_four_parts_worth() {
        // 10M rows at the default part_rows: 20 parts, one part's worth.
        assert_eq!(spread_rows(20, 500_000), 500_000);
        // 100M: 200 parts of 10,000 rows a flush.
        assert_eq!(spread_rows(200, 500_000), 2_000_000);
        // 1B: capped at four parts' worth, so memory stays flat.
        assert_eq!(spread_rows(2_000, 500_000), 2_000_000);
        // A part's worth is at most HELD_ROWS, however large part_rows is, or small.
        assert_eq!(spread_rows(1_000, 10_000_000), 4 * HELD_ROWS);
        assert_eq!(spread_rows(3, 1), 4);
    }
}
