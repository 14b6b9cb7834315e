//! curate: teacher rows → train / val / test Parquet, with a report of what each rule
//! removed. The rules are Polars expressions applied in order; each one's count is the
//! difference of row counts around it.

mod rules;

use crate::config::Config;
use crate::io::atomic::write_json;
use crate::io::manifest::{config_hash, entry, FileEntry, Manifest};
use crate::io::parquet::{read_frame, write_frame};
use crate::io::shards::{complete_teacher_files, Shard};
use crate::records::{TeacherRow, CURATED_COLUMNS};
use crate::task::Task;
use anyhow::Result;
use polars::prelude::*;
use std::path::{Path, PathBuf};

pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// All teacher shard files of a run's generate folder, sorted; every shard must have
/// finished (its manifest written, of this schema version).
pub fn teacher_files(generate_dir: &Path) -> Result<Vec<PathBuf>> {
    let files = complete_teacher_files(generate_dir)?;
    for f in &files {
        let shard = Shard::from_teacher_file(f).expect("listed files are teacher shard files");
        Manifest::read_as(generate_dir, &shard.manifest_name(), "generate")?;
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
