//! The teacher's answers to the eval rows: asked now (greedy, the step-by-step prompt, the
//! configured backend), or taken from the rows generate wrote.

use super::{Answers, EvalRow, Prediction};
use crate::config::{Config, Stage, TeacherKind};
use crate::io::manifest::Manifest;
use crate::prompts::Prompt;
use crate::task::Task;
use crate::teacher::{self, Job, JobResult, Settings};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::time::Instant;

/// Ask the configured teacher every row once, greedily, as generate would with one
/// sample at temperature 0: on label tasks it also scores the labels after its rationale
/// and an answer written outside the label set is replaced by its top-scored label, as in
/// the rows students train on (`Answers::rescued` counts them). Returns the answers and
/// the teacher's id.
pub fn run(
    cfg: &Config,
    prompt: &Prompt,
    task: &Task,
    rows: &[EvalRow],
) -> Result<(Answers, String)> {
    let teacher = teacher::open(&cfg.teacher, false, 0)?;
    let seeded = cfg.teacher.kind != TeacherKind::Local;
    let jobs: Vec<Job> = rows
        .iter()
        .map(|r| {
            Ok(Job {
                id: r.id.clone(),
                sample: 0,
                messages: prompt.teacher_chat(&r.input)?,
                seed: seeded.then_some(cfg.seed),
            })
        })
        .collect::<Result<_>>()?;
    let settings = Settings {
        max_tokens: cfg.teacher.max_tokens,
        temperature: 0.0,
        token_topk: 0,
        labels: teacher::scored_labels(&cfg.task, &cfg.teacher),
    };
    let mut progress = crate::progress::Progress::new("teacher", rows.len() as u64);
    let mut by_id: HashMap<String, Prediction> = HashMap::new();
    let locate = |text: &str| task.answer_offset(text);
    let mut rescued = 0;
    let started = Instant::now();
    teacher.answer_all(
        jobs,
        &settings,
        &locate,
        &mut |job: Job, result: JobResult| {
            let prediction = match result {
                Ok(reply) => {
                    progress.inc(reply.completion_tokens as u64);
                    let mut parsed =
                        task.parse_rationale_output(&reply.text, reply.finish_reason == "length");
                    if let Some(probs) = &reply.label_probs {
                        if parsed.rescue_with_label_scores(&settings.labels, probs) {
                            rescued += 1;
                        }
                    }
                    Prediction {
                        text: reply.text,
                        answer: parsed.answer,
                        seconds: reply.latency_ms / 1000.0,
                        tokens: reply.completion_tokens,
                    }
                }
                Err(message) => Prediction {
                    text: message,
                    answer: None,
                    seconds: 0.0,
                    tokens: 0,
                },
            };
            by_id.insert(job.id, prediction);
            Ok(())
        },
    )?;
    progress.finish();
    if rescued > 0 {
        eprintln!(
            "eval: teacher: {rescued} answers written outside the label set were replaced by its top-scored label (as generate does)"
        );
    }
    let wall_seconds = started.elapsed().as_secs_f64();
    let predictions = rows
        .iter()
        .map(|r| {
            by_id
                .remove(&r.id)
                .with_context(|| format!("the teacher returned no answer for row {:?}", r.id))
        })
        .collect::<Result<_>>()?;
    Ok((
        Answers {
            predictions,
            wall_seconds,
            rescued,
        },
        teacher.id().to_string(),
    ))
}

/// The answers generate wrote for these rows (a curated split carries them). The cost is
/// generate's own: seconds per row written by its last run, from its manifest.
pub fn generated(cfg: &Config, rows: &[EvalRow]) -> Result<Answers> {
    let per_row = Manifest::read(&cfg.stage_dir(Stage::Generate), Stage::Generate)
        .ok()
        .and_then(|m| {
            let secs = m.summary.get("seconds")?.as_f64()?;
            let n = m.summary.get("rows")?.as_f64()? - m.summary.get("rows_reused")?.as_f64()?;
            (n > 0.0).then(|| secs / n)
        })
        .unwrap_or(0.0);
    let predictions = rows
        .iter()
        .map(|r| {
            let answer = r
                .generated
                .clone()
                .with_context(|| format!("row {:?} has no generated teacher answer", r.id))?;
            Ok(Prediction {
                text: answer.clone(),
                answer: Some(answer),
                seconds: per_row,
                tokens: 0,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Answers {
        wall_seconds: per_row * predictions.len() as f64,
        predictions,
        rescued: 0,
    })
}
