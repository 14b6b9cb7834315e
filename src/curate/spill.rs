//! Curate's temporary files: frames appended to one file as segments (each a small Parquet
//! file: LZ4, no statistics) and read back a segment at a time or whole.
//!
//! The spread appends a part's share of every flush to that part's one file, where it
//! created a new Parquet file each time: 100M rows in 200 parts made 38,000 files, and the
//! partition took 1.44–1.55× the time a row of 10M (bench-results/curate-scale.md,
//! 2026-12-06 and 2026-12-06b; 1.09× with segments). A segment is written with one
//! write() from memory, to a file opened to append and closed again, so the open files
//! do not grow with the parts. Segments stay
//! Parquet: an input's samples repeat its text, which Parquet's dictionary encoding
//! stores once; Arrow IPC segments (LZ4 frames, tried first) took 1.8× the bytes at 10M
//! rows and were slower (65.2 against 62.9 s).

use anyhow::{Context, Result};
use polars::prelude::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where one segment lies in its file.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    bytes: u64,
    rows: usize,
}

/// A file of segments of one schema, in the order they were appended.
#[derive(Clone, Debug)]
pub struct SpillFile {
    path: PathBuf,
    schema: Schema,
    segments: Vec<Segment>,
}

impl SpillFile {
    /// A new, empty file at `path` for frames of `schema` (an earlier file there is
    /// replaced).
    pub fn create(path: &Path, schema: Schema) -> Result<SpillFile> {
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(SpillFile {
            path: path.to_path_buf(),
            schema,
            segments: vec![],
        })
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Bytes written: where the next segment goes.
    fn len(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.offset + s.bytes)
    }

    /// Append `df` as one segment (nothing for an empty frame).
    pub fn append(&mut self, df: &DataFrame) -> Result<()> {
        if df.height() == 0 {
            return Ok(());
        }
        let bytes = Context::with_context(encode(df), || {
            format!("cannot encode rows for {}", self.path.display())
        })?;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        file.write_all(&bytes)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.segments.push(Segment {
            offset: self.len(),
            bytes: bytes.len() as u64,
            rows: df.height(),
        });
        Ok(())
    }

    /// Append `df` in segments of `segment_rows` rows, each read back by `read_segment`.
    pub fn append_in_segments(&mut self, df: &DataFrame, segment_rows: usize) -> Result<()> {
        let mut at = 0;
        while at < df.height() {
            let mut segment = df.slice(at as i64, segment_rows.max(1));
            segment.align_chunks();
            at += segment.height();
            self.append(&segment)?;
        }
        Ok(())
    }

    /// Segment `k`, decoded.
    pub fn read_segment(&self, k: usize) -> Result<DataFrame> {
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        let segment = self.segments[k];
        file.seek(SeekFrom::Start(segment.offset))?;
        let mut bytes = vec![0; segment.bytes as usize];
        file.read_exact(&mut bytes)
            .with_context(|| format!("{} is shorter than written", self.path.display()))?;
        self.decode(&bytes, segment)
    }

    /// All segments stacked in order; the schema's empty frame when none was appended.
    /// Segments are decoded across the cores.
    pub fn read_all(&self) -> Result<DataFrame> {
        use rayon::prelude::*;
        let mut whole = vec![];
        std::fs::File::open(&self.path)
            .and_then(|mut f| f.read_to_end(&mut whole))
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        if whole.len() as u64 != self.len() {
            anyhow::bail!(
                "{} holds {} bytes where {} were written",
                self.path.display(),
                whole.len(),
                self.len()
            );
        }
        let frames = self
            .segments
            .par_iter()
            .map(|s| self.decode(&whole[s.offset as usize..(s.offset + s.bytes) as usize], *s))
            .collect::<Result<Vec<_>>>()?;
        if frames.is_empty() {
            return Ok(DataFrame::empty_with_schema(&self.schema));
        }
        let mut out = stack(&frames)?;
        out.align_chunks();
        Ok(out)
    }

    /// One segment on one thread (by row groups, of which it has one): segments are
    /// small, and `read_all` decodes several at once.
    fn decode(&self, bytes: &[u8], segment: Segment) -> Result<DataFrame> {
        let decoded = ParquetReader::new(std::io::Cursor::new(bytes))
            .read_parallel(ParallelStrategy::RowGroups)
            .finish();
        let df = Context::with_context(decoded, || {
            format!("cannot decode a segment of {}", self.path.display())
        })?;
        if df.height() != segment.rows {
            anyhow::bail!(
                "a segment of {} holds {} rows where {} were written",
                self.path.display(),
                df.height(),
                segment.rows
            );
        }
        Ok(df)
    }

    pub fn remove(self) -> Result<()> {
        std::fs::remove_file(&self.path)
            .with_context(|| format!("cannot remove {}", self.path.display()))
    }
}

/// `df` as one Parquet file in memory: LZ4 pages, no statistics (the file is read once, by
/// segments).
///
/// A list column sliced from a larger frame (each part's share of the spread's batch, each
/// segment of a part's kept rows) keeps all of that frame's values, and polars' writer
/// sizes a list's leaf from all of them: a cost a segment that grows with the segments cut
/// from one frame, so with the number of parts (bench-results/curate-scale.md,
/// 2026-12-06f). Trimmed, each list column holds only its own values (a slice, no copy).
fn encode(df: &DataFrame) -> PolarsResult<Vec<u8>> {
    let columns = df
        .columns()
        .iter()
        .map(|c| {
            c.trim_lists_to_normalized_offsets()
                .unwrap_or_else(|| c.clone())
        })
        .collect();
    let mut df = DataFrame::new(df.height(), columns)?;
    let mut bytes = vec![];
    ParquetWriter::new(&mut bytes)
        .with_compression(ParquetCompression::Lz4Raw)
        .with_statistics(StatisticsOptions::empty())
        .set_parallel(false)
        .finish(&mut df)?;
    Ok(bytes)
}

/// Frames of one schema, one after another.
pub fn stack(frames: &[DataFrame]) -> PolarsResult<DataFrame> {
    let mut out = frames.first().cloned().unwrap_or_default();
    for f in frames.iter().skip(1) {
        out.vstack_mut(f)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(from: u32, n: u32) -> DataFrame {
        let labels: Vec<Series> = (from..from + n)
            .map(|i| {
                let words: Vec<String> = (0..i % 3).map(|k| format!("label {i}.{k}")).collect();
                Series::new("".into(), words)
            })
            .collect();
        df!(
            "row" => (from..from + n).collect::<Vec<u32>>(),
            "input" => (from..from + n).map(|i| format!("input {i}")).collect::<Vec<_>>(),
            "score" => (from..from + n).map(|i| (i % 3 == 0).then_some(i as f64 / 7.0)).collect::<Vec<_>>(),
            "labels" => labels,
        )
        .unwrap()
    }

    #[test]
    fn segments_come_back_in_order_whole_or_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = frame(0, 10);
        let mut file =
            SpillFile::create(&dir.path().join("s.seg"), first.schema().as_ref().clone()).unwrap();
        file.append(&first).unwrap();
        file.append(&frame(10, 0)).unwrap();
        // A slice of a larger frame, as the spread writes: its lists hold the larger frame's
        // values until encode trims them.
        file.append(&frame(0, 60).slice(10, 15)).unwrap();
        file.append_in_segments(&frame(25, 25), 10).unwrap();
        assert_eq!(
            file.segments(),
            5,
            "an empty frame adds no segment; 25 rows make 3"
        );
        let all = file.read_all().unwrap();
        assert!(all.equals_missing(&frame(0, 50)), "{all}");
        let last = file.read_segment(4).unwrap();
        assert!(last.equals_missing(&frame(45, 5)), "{last}");
        file.remove().unwrap();
    }

    #[test]
    fn an_empty_file_reads_as_its_schema() {
        let dir = tempfile::tempdir().unwrap();
        let schema = frame(0, 1).schema().as_ref().clone();
        let file = SpillFile::create(&dir.path().join("e.seg"), schema.clone()).unwrap();
        let all = file.read_all().unwrap();
        assert_eq!(all.height(), 0);
        assert_eq!(all.schema().as_ref(), &schema);
    }

    #[test]
    fn a_truncated_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.seg");
        let mut file = SpillFile::create(&path, frame(0, 1).schema().as_ref().clone()).unwrap();
        file.append(&frame(0, 100)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        for err in [
            file.read_all().unwrap_err(),
            file.read_segment(0).unwrap_err(),
        ] {
            assert!(format!("{err:#}").contains("t.seg"), "{err:#}");
        }
    }
}
