//! curate: teacher rows → train / val / test Parquet, with a report of what each rule
//! removed. The rules are Polars expressions applied in order; each one's count is the
//! difference of row counts around it.

mod rules;

use crate::config::Config;
use crate::io::atomic::write_json;
use crate::io::manifest::{config_hash, entry, FileEntry, Manifest};
use crate::io::parquet::{read_frame, write_frame};
use crate::records::{TeacherRow, CURATED_COLUMNS};
use crate::task::Task;
use anyhow::{bail, Context, Result};
use polars::prelude::*;
use std::path::{Path, PathBuf};

pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// All teacher shard files of a run's generate folder, sorted.
pub fn teacher_files(generate_dir: &Path) -> Result<Vec<PathBuf>> {
    Manifest::read(generate_dir, "generate")?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(generate_dir)
        .with_context(|| format!("cannot list {}", generate_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.starts_with("teacher-") && n.ends_with(".parquet")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{} has no teacher-*.parquet files\nhint: run kdpipe generate --config …",
            generate_dir.display()
        );
    }
    Ok(files)
}

pub fn input_entries(cfg: &Config) -> Result<Vec<FileEntry>> {
    teacher_files(&cfg.stage_dir("generate"))?
        .iter()
        .map(|p| entry(p, None))
        .collect()
}

pub fn run(cfg: &Config) -> Result<PathBuf> {
    let out_dir = cfg.stage_dir("curate");
    let task = Task::from_config(&cfg.task);
    let files = teacher_files(&cfg.stage_dir("generate"))?;
    let mut frames = Vec::new();
    for f in &files {
        let df = read_frame(f)?;
        TeacherRow::from_frame(&df, f)?; // checks every column and type, naming the file
        frames.push(df.lazy());
    }
    let all = concat(frames, UnionArgs::default())?.collect()?;
    let outcome = rules::apply(all, &task, &cfg.curate, cfg.seed)?;

    std::fs::create_dir_all(&out_dir)?;
    let mut outputs = Vec::new();
    let mut split_rows = serde_json::Map::new();
    for split in SPLITS {
        let mut part = outcome
            .kept
            .clone()
            .lazy()
            .filter(col("split").eq(lit(split)))
            .select(CURATED_COLUMNS.iter().map(|c| col(*c)).collect::<Vec<_>>())
            .collect()?;
        let path = out_dir.join(format!("{split}.parquet"));
        write_frame(&path, &mut part)?;
        split_rows.insert(split.to_string(), part.height().into());
        outputs.push(entry(&path, Some(part.height()))?);
    }
    let report = serde_json::json!({
        "rows_in": outcome.rows_in,
        "removed": outcome.removed,
        "removed_parse_by_reason": outcome.parse_reasons,
        "rows_out": outcome.kept.height(),
        "splits": split_rows,
    });
    let report_path = out_dir.join("report.json");
    write_json(&report_path, &report)?;
    outputs.push(entry(&report_path, None)?);

    let mut m = Manifest::new("curate", config_hash(&cfg.stage_view("curate")), cfg.seed);
    m.inputs = files
        .iter()
        .map(|p| entry(p, None))
        .collect::<Result<_>>()?;
    m.outputs = outputs;
    m.summary = report.clone();
    m.write(&out_dir)?;
    eprintln!(
        "curate: {} rows in, {} out {} → {}",
        outcome.rows_in,
        outcome.kept.height(),
        serde_json::Value::Object(split_rows),
        out_dir.display()
    );
    Ok(out_dir)
}
