//! curate: teacher rows (all shards) → train / val / test Parquet, report.json,
//! report.md and funnel.svg. The rules (rules.rs) are one Polars plan over the columns
//! they judge by, each rule on/off and tuned in `[curate]`, each one's removals counted;
//! the kept rows' other columns (raw text, token top-k) stream from the teacher files to
//! the split files (splits.rs).

mod ensemble;
mod report;
pub mod rules;
pub mod splits;

use crate::config::{Config, DataConfig, Stage};
use crate::dedup::Contamination;
use crate::io::atomic::{with_storage_hint, write_bytes, write_json, StagedDir};
use crate::io::inputs::read_inputs;
use crate::io::manifest::{config_hash, entry, staged_entry, FileEntry, Manifest};
use crate::io::parquet::read_columns;
use crate::io::shards::{complete_teacher_files, Shard};
use crate::records::topk_store::bytes_per_token;
use crate::records::TeacherRow;
use crate::task::Task;
use anyhow::{bail, Context, Result};
use polars::prelude::*;
use std::path::{Path, PathBuf};

pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// All teacher shard files of a run's generate folder, sorted; every shard must have
/// finished (its manifest written, of this schema version).
pub fn teacher_files(generate_dir: &Path) -> Result<Vec<PathBuf>> {
    let files = complete_teacher_files(generate_dir)?;
    for f in &files {
        let shard = Shard::from_teacher_file(f).expect("listed files are teacher shard files");
        Manifest::read_as(generate_dir, &shard.manifest_name(), Stage::Generate)?;
    }
    Ok(files)
}

pub fn input_entries(cfg: &Config) -> Result<Vec<FileEntry>> {
    let mut files = teacher_files(&cfg.stage_dir(Stage::Generate))?;
    files.extend(cfg.curate.decontaminate.iter().cloned());
    files.iter().map(|p| entry(p, None)).collect()
}

/// The n-grams of the evaluation files named in `[curate] decontaminate`.
pub fn contamination(cfg: &Config) -> Result<Option<Contamination>> {
    if cfg.curate.decontaminate.is_empty() {
        return Ok(None);
    }
    let field = cfg
        .curate
        .decontaminate_field
        .clone()
        .unwrap_or_else(|| cfg.data.input_field.clone());
    let mut texts = vec![];
    for file in &cfg.curate.decontaminate {
        let data = DataConfig {
            inputs: vec![file.clone()],
            id_field: None,
            input_field: field.clone(),
            gold_field: None,
            limit: None,
            max_input_chars: usize::MAX,
        };
        let rows = read_inputs(&data).with_context(|| {
            format!(
                "cannot read the evaluation file {} named in [curate] decontaminate",
                file.display()
            )
        })?;
        texts.extend(rows.into_iter().map(|r| r.input));
    }
    Ok(Some(Contamination::new(
        texts.iter().map(String::as_str),
        cfg.curate.decontaminate_ngram,
    )))
}

/// The columns the rules read (`splits::RULE_COLUMNS`) of all teacher rows of the run, in
/// file order with their index (`splits::ROW`), columns checked (naming the file), at
/// least one row.
fn teacher_rows(cfg: &Config) -> Result<(Vec<PathBuf>, DataFrame)> {
    let files = teacher_files(&cfg.stage_dir(Stage::Generate))?;
    let mut frames = Vec::new();
    for f in &files {
        let df = read_columns(f, &splits::RULE_COLUMNS)?;
        TeacherRow::check_columns(&df, f)?;
        frames.push(df.lazy());
    }
    let all = concat(frames, UnionArgs::default())?
        .with_row_index(splits::ROW, None)
        .collect()?;
    if all.height() == 0 {
        bail!(
            "{} hold no teacher rows\nhint: check [data] inputs and --limit, then re-run kdpipe generate",
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok((files, all))
}

/// `kdpipe curate --explain`: the Polars plan of the rules, optimized.
pub fn explain(cfg: &Config) -> Result<String> {
    let task = Task::from_config(&cfg.task);
    let (_, all) = teacher_rows(cfg)?;
    let df = rules::prepare(
        all,
        &task,
        &cfg.curate,
        cfg.seed,
        contamination(cfg)?.as_ref(),
    )?;
    Ok(rules::plan(df, &task, &cfg.curate)?.explain(true)?)
}

pub fn run(cfg: &Config) -> Result<PathBuf> {
    let started = std::time::Instant::now();
    let out_dir = cfg.stage_dir(Stage::Curate);
    let task = Task::from_config(&cfg.task);
    let (files, all) = teacher_rows(cfg)?;
    let contamination = contamination(cfg)?;
    let all = if cfg.ensemble.is_empty() {
        all
    } else {
        ensemble::prepare(cfg, all)?
    };
    let outcome = rules::apply(all, &task, &cfg.curate, cfg.seed, contamination.as_ref())?;

    // Written beside the earlier output, which stays complete until the swap.
    let staged = StagedDir::begin(&out_dir)?;
    let dir = staged.path();
    let mut outputs = Vec::new();
    let mut split_rows = serde_json::Map::new();
    let written = splits::write(&files, &outcome.kept, dir, SPLITS)
        .map_err(|e| with_storage_hint(e, &dir.join("train.parquet")))?;
    let topk_tokens: usize = written.iter().map(|w| w.topk_tokens).sum();
    for w in &written {
        split_rows.insert(w.split.to_string(), w.rows.into());
        outputs.push(staged_entry(&staged, &w.path, Some(w.rows))?);
    }
    let split_files: Vec<PathBuf> = written.into_iter().map(|w| w.path).collect();
    let mut summary = report::summary(&outcome, &split_rows)?;
    let split_paths: Vec<&Path> = split_files.iter().map(PathBuf::as_path).collect();
    if let Some(bytes) = bytes_per_token(&split_paths, topk_tokens)? {
        summary["topk_tokens"] = topk_tokens.into();
        summary["topk_bytes_per_token"] = bytes.into();
    }
    let report_path = dir.join("report.json");
    write_json(&report_path, &summary)?;
    let md_path = dir.join("report.md");
    write_bytes(&md_path, report::markdown(&summary).as_bytes())?;
    let svg_path = dir.join("funnel.svg");
    write_bytes(&svg_path, report::funnel_svg(&summary)?.as_bytes())?;
    for p in [&report_path, &md_path, &svg_path] {
        outputs.push(staged_entry(&staged, p, None)?);
    }

    let mut m = Manifest::new(
        Stage::Curate,
        config_hash(&cfg.stage_view(Stage::Curate)),
        cfg.seed,
    );
    m.inputs = files
        .iter()
        .chain(&cfg.curate.decontaminate)
        .map(|p| entry(p, None))
        .collect::<Result<_>>()?;
    m.outputs = outputs;
    m.summary = summary;
    m.write(dir)?;
    staged.commit()?;
    eprintln!(
        "curate: {} rows in, {} out {} in {:.1} s → {}",
        outcome.rows_in,
        outcome.kept.height(),
        serde_json::Value::Object(split_rows),
        started.elapsed().as_secs_f64(),
        out_dir.display()
    );
    Ok(out_dir)
}
