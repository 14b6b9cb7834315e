//! eval: the student's label view, greedy-decoded on a curated split, scored against gold
//! next to the teacher's answers on the same rows and the student before training.

mod report;

use crate::config::Config;
use crate::finetune::data::prompt_ids;
use crate::io::atomic::write_json;
use crate::io::manifest::{config_hash, entry, FileEntry, Manifest};
use crate::io::parquet::{read_frame, write_frame};
use crate::progress::Progress;
use crate::prompts::{Prompt, LABEL_VIEW};
use crate::records::CuratedRow;
use crate::student::{self, LoadedModel};
use crate::task::Task;
use anyhow::{bail, Result};
use candle_core::Device;
use polars::prelude::*;

pub use report::Scores;

pub fn input_entries(cfg: &Config) -> Result<Vec<FileEntry>> {
    let split = cfg
        .stage_dir("curate")
        .join(format!("{}.parquet", cfg.eval.split));
    let weights = cfg.stage_dir("student").join("model.safetensors");
    Manifest::read(&cfg.stage_dir("finetune"), "finetune")?;
    Ok(vec![entry(&split, None)?, entry(&weights, None)?])
}

struct Prediction {
    text: String,
    answer: Option<String>,
    correct: bool,
}

fn predict_all(
    name: &str,
    loaded: &LoadedModel,
    prompt: &Prompt,
    task: &Task,
    rows: &[CuratedRow],
    max_new: usize,
) -> Result<(Vec<Prediction>, f64)> {
    let model = loaded.decoder(&Device::Cpu, |_| false)?;
    let mut progress = Progress::new(name, rows.len() as u64);
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let ids = prompt_ids(loaded, prompt, LABEL_VIEW, &row.input)?;
        let gen = model.greedy(&ids, max_new, &[loaded.eos_token_id])?;
        let text = loaded.decode(&gen)?;
        let parsed = task.parse_answer_only(&text);
        let correct = match (&parsed.answer, &row.gold) {
            (Some(a), Some(g)) => task.agrees(a, g),
            _ => false,
        };
        progress.inc(gen.len() as u64);
        out.push(Prediction {
            text,
            answer: parsed.answer,
            correct,
        });
    }
    let secs = progress.finish();
    Ok((out, secs))
}

pub fn run(cfg: &Config) -> Result<Scores> {
    let out_dir = cfg.stage_dir("eval");
    let inputs = input_entries(cfg)?;
    let task = Task::from_config(&cfg.task);
    let prompt = Prompt::load(cfg)?;
    let split_path = cfg
        .stage_dir("curate")
        .join(format!("{}.parquet", cfg.eval.split));
    let rows: Vec<CuratedRow> = CuratedRow::from_frame(&read_frame(&split_path)?, &split_path)?
        .into_iter()
        .filter(|r| r.gold.is_some())
        .collect();
    if rows.is_empty() {
        bail!("{} has no rows with gold answers to score\nhint: set [data] gold_field, or use more input rows so the {} split is not empty", split_path.display(), cfg.eval.split);
    }
    let device = Device::Cpu;
    let trained = student::load(&cfg.stage_dir("student").display().to_string(), &device)?;
    let (after, after_secs) = predict_all(
        "student",
        &trained,
        &prompt,
        &task,
        &rows,
        cfg.eval.max_new_tokens,
    )?;
    drop(trained);
    let before = if cfg.eval.compare_base {
        let base = student::load(&cfg.student.model, &device)?;
        Some(
            predict_all(
                "base",
                &base,
                &prompt,
                &task,
                &rows,
                cfg.eval.max_new_tokens,
            )?
            .0,
        )
    } else {
        None
    };
    let teacher_correct: Vec<bool> = rows
        .iter()
        .map(|r| r.gold.as_deref().is_some_and(|g| task.agrees(&r.answer, g)))
        .collect();

    let mut cols = vec![
        Column::new(
            "id".into(),
            rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "input".into(),
            rows.iter().map(|r| r.input.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "gold".into(),
            rows.iter().map(|r| r.gold.as_deref()).collect::<Vec<_>>(),
        ),
        Column::new(
            "teacher_answer".into(),
            rows.iter().map(|r| r.answer.as_str()).collect::<Vec<_>>(),
        ),
        Column::new("teacher_correct".into(), teacher_correct.clone()),
        Column::new(
            "student_text".into(),
            after.iter().map(|p| p.text.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "student_answer".into(),
            after
                .iter()
                .map(|p| p.answer.as_deref())
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "student_correct".into(),
            after.iter().map(|p| p.correct).collect::<Vec<_>>(),
        ),
    ];
    if let Some(b) = &before {
        cols.push(Column::new(
            "base_text".into(),
            b.iter().map(|p| p.text.as_str()).collect::<Vec<_>>(),
        ));
        cols.push(Column::new(
            "base_answer".into(),
            b.iter().map(|p| p.answer.as_deref()).collect::<Vec<_>>(),
        ));
        cols.push(Column::new(
            "base_correct".into(),
            b.iter().map(|p| p.correct).collect::<Vec<_>>(),
        ));
    }
    std::fs::create_dir_all(&out_dir)?;
    let pred_path = out_dir.join("predictions.parquet");
    write_frame(&pred_path, &mut DataFrame::new_infer_height(cols)?)?;

    let frac = |v: &[bool]| v.iter().filter(|c| **c).count() as f64 / v.len() as f64;
    let scores = Scores {
        split: cfg.eval.split.clone(),
        rows: rows.len(),
        teacher_accuracy: frac(&teacher_correct),
        student_before_accuracy: before
            .as_ref()
            .map(|b| frac(&b.iter().map(|p| p.correct).collect::<Vec<_>>())),
        student_after_accuracy: frac(&after.iter().map(|p| p.correct).collect::<Vec<_>>()),
        student_parse_failures: after.iter().filter(|p| p.answer.is_none()).count(),
        student_seconds_per_example: after_secs / rows.len() as f64,
    };
    let report_path = out_dir.join("report.json");
    write_json(&report_path, &scores)?;
    let md_path = out_dir.join("report.md");
    crate::io::atomic::write_bytes(
        &md_path,
        scores
            .markdown(&cfg.teacher.model, &cfg.student.model)
            .as_bytes(),
    )?;

    let mut m = Manifest::new("eval", config_hash(&cfg.stage_view("eval")), cfg.seed);
    m.inputs = inputs;
    m.outputs = vec![
        entry(&pred_path, Some(rows.len()))?,
        entry(&report_path, None)?,
        entry(&md_path, None)?,
    ];
    m.summary = serde_json::to_value(&scores)?;
    m.write(&out_dir)?;
    Ok(scores)
}
