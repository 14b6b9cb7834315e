//! Rows of a running shard, on disk as they arrive: `parts-IIIII-of-NNNNN/part-NNNNNN.parquet`,
//! each written to a temp name and renamed, every `flush_rows` rows or 30 seconds. A run
//! killed at any point loses at most the rows not yet flushed; the next run reads the parts
//! back and asks the teacher only for the (id, sample) keys still missing.
//!
//! `rows-config` in the folder holds the hash of everything that decides a row's content
//! (`Config::row_view` and the prompt): parts from another configuration are never mixed in.

use crate::io::atomic::write_bytes;
use crate::io::parquet::{read_frame, write_frame};
use crate::records::TeacherRow;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FLUSH_EVERY: Duration = Duration::from_secs(30);
const HASH_FILE: &str = "rows-config";

pub struct PartStore {
    dir: PathBuf,
    row_hash: String,
    next_index: usize,
    buffer: Vec<TeacherRow>,
    flush_rows: usize,
    last_flush: Instant,
}

impl PartStore {
    /// Open a shard's parts folder and read back the rows already there. `fresh` discards
    /// them first.
    pub fn open(
        dir: &Path,
        row_hash: &str,
        flush_rows: usize,
        fresh: bool,
    ) -> Result<(PartStore, Vec<TeacherRow>)> {
        if fresh && dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        let hash_path = dir.join(HASH_FILE);
        if hash_path.exists() {
            let found = std::fs::read_to_string(&hash_path)
                .with_context(|| format!("cannot read {}", hash_path.display()))?;
            if found.trim() != row_hash {
                bail!(
                    "{} holds rows written under a different teacher, task or prompt configuration\nhint: pass --fresh to discard them, or restore the configuration they were made with",
                    dir.display()
                );
            }
        }
        let mut rows = vec![];
        let mut next_index = 0;
        let existing = if dir.exists() {
            part_files(dir)?
        } else {
            vec![]
        };
        for (index, path) in existing {
            let df = read_frame(&path)?;
            rows.extend(TeacherRow::from_frame(&df, &path)?);
            next_index = next_index.max(index + 1);
        }
        let store = PartStore {
            dir: dir.to_path_buf(),
            row_hash: row_hash.to_string(),
            next_index,
            buffer: vec![],
            flush_rows: flush_rows.max(1),
            last_flush: Instant::now(),
        };
        Ok((store, rows))
    }

    pub fn push(&mut self, row: TeacherRow) -> Result<()> {
        self.buffer.push(row);
        if self.buffer.len() >= self.flush_rows || self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Write the buffered rows as the next part file.
    pub fn flush(&mut self) -> Result<()> {
        self.last_flush = Instant::now();
        if self.buffer.is_empty() {
            return Ok(());
        }
        if self.next_index == 0 {
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("cannot create {}", self.dir.display()))?;
            write_bytes(&self.dir.join(HASH_FILE), self.row_hash.as_bytes())?;
        }
        let path = self
            .dir
            .join(format!("part-{:06}.parquet", self.next_index));
        let mut df = TeacherRow::to_frame(&self.buffer)?;
        write_frame(&path, &mut df)?;
        self.next_index += 1;
        self.buffer.clear();
        Ok(())
    }

    /// The shard finished and its rows are in the teacher file: drop the parts.
    pub fn remove(self) -> Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("cannot remove {}", self.dir.display()))
    }
}

/// `part-NNNNNN.parquet` files of a folder with their numbers, in order. Temp files of an
/// interrupted write have other names and are ignored.
fn part_files(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let n = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
            Some((n.parse().ok()?, p))
        })
        .collect();
    out.sort();
    Ok(out)
}
