//! eval: score the trained student, the student before training and the teacher on the
//! same rows (a curated split, or any JSONL / Parquet / CSV file with gold answers), and
//! write predictions.parquet, report.json and report.md with the models side by side.
//!
//! rows (this file) → answers per model (student.rs, teacher.rs) → metrics.rs → report.rs

pub mod metrics;
mod report;
mod student;
mod teacher;
mod worker;

use crate::config::{
    Config, EvalModel, Stage, StudentDecode, TaskKind, TeacherKind, TeacherSource,
};
use crate::io::atomic::{write_bytes, write_json, StagedDir};
use crate::io::inputs::read_inputs;
use crate::io::manifest::{config_hash, entry, staged_entry, FileEntry, Manifest};
use crate::io::parquet::{read_frame, write_frame};
use crate::llama;
use crate::prompts::{Prompt, View};
use crate::records::CuratedRow;
use crate::task::Task;
use anyhow::{bail, Context, Result};
use metrics::Outcome;
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub use report::{ModelScores, Scores};
pub use worker::{work, Scoring};

/// One row to score.
#[derive(Debug, Clone)]
pub struct EvalRow {
    pub id: String,
    pub input: String,
    /// Normalized gold answer.
    pub gold: String,
    /// The teacher's answer from generate (curated splits only).
    pub generated: Option<String>,
}

/// One model's answer to one row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    pub text: String,
    pub answer: Option<String>,
    pub seconds: f64,
    /// Tokens the model generated for it (0 where it generated none: label scores, the
    /// teacher's stored rows).
    pub tokens: u32,
}

/// One model's answers to all rows, in row order, and the wall time they took.
#[derive(Serialize, Deserialize)]
pub struct Answers {
    pub predictions: Vec<Prediction>,
    pub wall_seconds: f64,
    /// Answers written outside the label set that the model's own label scores replaced
    /// (the teacher run live, as generate does); 0 for every other model.
    #[serde(default)]
    pub rescued: usize,
}

fn split_path(cfg: &Config) -> PathBuf {
    cfg.stage_dir(Stage::Curate)
        .join(format!("{}.parquet", cfg.eval.split))
}

/// Digests of the files an eval run reads.
pub fn input_entries(cfg: &Config) -> Result<Vec<FileEntry>> {
    let mut v = if cfg.eval.files.is_empty() {
        vec![entry(&split_path(cfg), None)?]
    } else {
        cfg.eval
            .files
            .iter()
            .map(|f| entry(f, None))
            .collect::<Result<_>>()?
    };
    if cfg.eval.models.contains(&EvalModel::Student) {
        Manifest::read(&cfg.stage_dir(Stage::Finetune), Stage::Finetune)?;
        v.push(entry(&cfg.student_dir().join("model.safetensors"), None)?);
    }
    if cfg.eval.models.contains(&EvalModel::Exported) {
        for (_, path) in exported_files(cfg)? {
            v.push(entry(&path, None)?);
        }
    }
    Ok(v)
}

/// The GGUF files `kdpipe export` wrote, by type, from its manifest.
fn exported_files(cfg: &Config) -> Result<Vec<(String, PathBuf)>> {
    let dir = cfg.stage_dir(Stage::Export);
    let m = Manifest::read(&dir, Stage::Export).with_context(|| {
        format!("[eval] models has \"exported\", and {} holds no export\nhint: run kdpipe export --config … first (or set [export] for kdpipe run)", dir.display())
    })?;
    let files = m.summary["gguf"].as_array().cloned().unwrap_or_default();
    files
        .iter()
        .map(|f| {
            let kind = f["type"].as_str().unwrap_or_default().to_string();
            let file = f["file"].as_str().unwrap_or_default();
            let path = dir.join(Path::new(file).file_name().unwrap_or_default());
            Ok((kind, path))
        })
        .collect()
}

/// The rows to score and a short name for where they came from.
fn eval_rows(cfg: &Config, task: &Task) -> Result<(String, Vec<EvalRow>)> {
    let mut rows = if cfg.eval.files.is_empty() {
        split_rows(cfg)?
    } else {
        file_rows(cfg, task)?
    };
    if let Some(limit) = cfg.eval.limit {
        rows.truncate(limit);
    }
    let source = if cfg.eval.files.is_empty() {
        format!("{} split", cfg.eval.split)
    } else {
        cfg.eval
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if rows.is_empty() {
        bail!("{source} has no rows with gold answers to score\nhint: set [data] gold_field, or use more input rows so the split is not empty");
    }
    Ok((source, rows))
}

/// A curated split: one row per input (the first sample kept), with gold.
fn split_rows(cfg: &Config) -> Result<Vec<EvalRow>> {
    let path = split_path(cfg);
    let mut seen = HashSet::new();
    Ok(CuratedRow::from_frame(&read_frame(&path)?, &path)?
        .into_iter()
        .filter(|r| r.gold.is_some() && seen.insert(r.id.clone()))
        .map(|r| EvalRow {
            id: r.id,
            input: r.input,
            gold: r.gold.unwrap_or_default(),
            generated: Some(r.answer),
        })
        .collect())
}

/// Eval files, read through the `[data]` field names; every row needs a valid gold answer.
fn file_rows(cfg: &Config, task: &Task) -> Result<Vec<EvalRow>> {
    let mut data = cfg.data.clone();
    data.inputs = cfg.eval.files.clone();
    // [eval] limit, else [data] limit: a quick trial stays quick on eval files too.
    data.limit = cfg.eval.limit.or(cfg.data.limit);
    let mut rows = Vec::new();
    for r in read_inputs(&data)? {
        let field = data.gold_field.as_deref().unwrap_or("gold");
        let Some(gold) = r.gold.as_deref() else {
            bail!(
                "eval row {:?} has no gold answer in field {field:?}\nhint: every row of an eval file needs one",
                r.id
            );
        };
        let Some(gold) = task.normalize_gold(gold) else {
            bail!(
                "eval row {:?}: gold answer {gold:?} in field {field:?} is not {}\nhint: fix the row, or check [task]",
                r.id,
                task.answer_kind()
            );
        };
        rows.push(EvalRow {
            id: r.id,
            input: r.input,
            gold,
            generated: None,
        });
    }
    Ok(rows)
}

/// Size on disk of a model file, or of the weight files in a model folder.
fn size_on_disk(model: &str) -> Option<u64> {
    let path = Path::new(model);
    if path.is_file() {
        return path.metadata().ok().map(|m| m.len());
    }
    let entries = std::fs::read_dir(path).ok()?;
    let total = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.ends_with(".safetensors") || name.ends_with(".gguf")
        })
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .sum();
    Some(total)
}

/// What one scored model contributes: its table row and its prediction columns.
#[derive(Serialize, Deserialize)]
struct Scored {
    scores: ModelScores,
    answers: Answers,
    correct: Vec<bool>,
}

/// Which model a set of answers belongs to, as the report names it.
struct Who<'a> {
    key: &'a str,
    name: &'a str,
    model: String,
    decode: &'a str,
    params: Option<u64>,
}

fn scored(who: Who, answers: Answers, rows: &[EvalRow], task: &Task) -> Scored {
    let outcomes: Vec<Outcome> = rows
        .iter()
        .zip(&answers.predictions)
        .map(|(r, p)| Outcome {
            gold: r.gold.clone(),
            answer: p.answer.clone(),
            correct: p.answer.as_deref().is_some_and(|a| task.agrees(a, &r.gold)),
        })
        .collect();
    let correct = outcomes.iter().map(|o| o.correct).collect();
    let n = rows.len().max(1) as f64;
    let per_example = answers.wall_seconds / n;
    let generated: u64 = answers.predictions.iter().map(|p| p.tokens as u64).sum();
    let scores = ModelScores {
        generated_tokens: generated,
        tokens_per_second: (generated > 0 && answers.wall_seconds > 0.0)
            .then(|| generated as f64 / answers.wall_seconds),
        key: who.key.into(),
        name: who.name.into(),
        size_bytes: size_on_disk(&who.model),
        model: who.model,
        decode: who.decode.into(),
        metrics: metrics::score(&outcomes, &task.labels),
        seconds_per_example: per_example,
        examples_per_second: if per_example > 0.0 {
            1.0 / per_example
        } else {
            0.0
        },
        seconds_per_1k: per_example * 1000.0,
        params: who.params,
        peak_rss_bytes: None,
        rescued: answers.rescued,
    };
    Scored {
        scores,
        answers,
        correct,
    }
}

/// Score a student-shaped model (`(key, name)`: its column key in the predictions and
/// its name in the report).
fn score_student(
    cfg: &Config,
    (key, name): (String, String),
    model: &str,
    prompt: &Prompt,
    task: &Task,
    rows: &[EvalRow],
) -> Result<Scored> {
    // A GGUF student runs on its block formats, as the teacher engine does.
    let mut loaded = llama::load_for_inference(model)?;
    let params = loaded.params();
    let decoder = loaded.take_inference_decoder()?;
    let inputs: Vec<&str> = rows.iter().map(|r| r.input.as_str()).collect();
    let decode = cfg.eval.student_decode;
    let view = View::for_eval(cfg);
    let reasons = view == View::Rationale;
    let how = student::Decoding {
        decode,
        view,
        max_new: cfg.eval.new_tokens(reasons),
        calculator: cfg.eval.calculator && reasons,
        parallel: cfg.eval.parallel,
    };
    let chats: Vec<_> = inputs
        .iter()
        .map(|i| prompt.student_chat(view, i))
        .collect();
    let answers = student::answer(&key, (&decoder, &loaded), &chats, task, how)?;
    let decode = match (decode, view) {
        (StudentDecode::LabelScores, _) => "label_scores",
        (StudentDecode::Greedy, View::Rationale) if how.calculator => {
            "greedy, rationale view, calculator"
        }
        (StudentDecode::Greedy, View::Rationale) => "greedy, rationale view",
        (StudentDecode::Greedy, View::Label) => "greedy",
    };
    let who = Who {
        key: &key,
        name: &name,
        model: model.to_string(),
        decode,
        params: Some(params),
    };
    Ok(scored(who, answers, rows, task))
}

fn score_teacher(
    cfg: &Config,
    prompt: &Prompt,
    task: &Task,
    rows: &[EvalRow],
) -> Result<Option<Scored>> {
    let (answers, model, decode) = match cfg.eval.teacher {
        TeacherSource::Run => {
            let (answers, id) = teacher::run(cfg, prompt, task, rows)?;
            (answers, id, "run")
        }
        TeacherSource::Generated if rows.iter().all(|r| r.generated.is_some()) => (
            teacher::generated(cfg, rows)?,
            cfg.teacher.model.clone(),
            "generated",
        ),
        TeacherSource::Generated => {
            eprintln!("eval: the teacher is not scored: eval files carry no generated answers\nhint: set [eval] teacher = \"run\" (or --teacher run) to have the teacher answer them");
            return Ok(None);
        }
    };
    let params = match cfg.teacher.kind {
        TeacherKind::Local if crate::llama::is_gguf(&model) => {
            llama::gguf::architecture_and_params(Path::new(&model))
                .ok()
                .map(|(_, params)| params)
        }
        _ => None,
    };
    let who = Who {
        key: "teacher",
        name: "teacher",
        model,
        decode,
        params,
    };
    Ok(Some(scored(who, answers, rows, task)))
}

/// The local teacher answering its few-shot chats through kdpipe's engine with the
/// calculator (`[eval] calculator`, numeric tasks): the figure that says how much of the
/// teacher's error is arithmetic, next to its own row.
fn score_teacher_with_calculator(
    cfg: &Config,
    prompt: &Prompt,
    task: &Task,
    rows: &[EvalRow],
) -> Result<Scored> {
    let model = &cfg.teacher.model;
    let mut loaded = llama::load_for_inference(model)?;
    let params = loaded.params();
    let decoder = loaded.take_inference_decoder()?;
    let chats: Vec<_> = rows
        .iter()
        .map(|r| prompt.teacher_chat(&r.input))
        .collect::<Result<_>>()?;
    let how = student::Decoding {
        decode: StudentDecode::Greedy,
        view: View::Rationale,
        max_new: cfg.teacher.max_tokens,
        calculator: true,
        parallel: cfg.eval.parallel,
    };
    let key = "teacher_calculator";
    let answers = student::answer(key, (&decoder, &loaded), &chats, task, how)?;
    let who = Who {
        key,
        name: "teacher, calculator",
        model: model.clone(),
        decode: "greedy, few-shot, calculator",
        params: Some(params),
    };
    Ok(scored(who, answers, rows, task))
}

/// One model eval scores, in the report's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    Teacher,
    /// The local teacher again, with the calculator (`teacher_with_calculator`).
    TeacherCalculator,
    Base,
    Student,
    /// An exported GGUF, by its type ("q8_0", ...).
    Exported(String),
}

impl Unit {
    /// The name a worker process is given (`kdpipe eval-worker --model ...`).
    pub fn arg(&self) -> String {
        match self {
            Unit::Teacher => "teacher".into(),
            Unit::TeacherCalculator => "teacher_calculator".into(),
            Unit::Base => "base".into(),
            Unit::Student => "student".into(),
            Unit::Exported(kind) => format!("exported:{kind}"),
        }
    }

    pub fn parse(arg: &str) -> Result<Unit> {
        Ok(match arg {
            "teacher" => Unit::Teacher,
            "teacher_calculator" => Unit::TeacherCalculator,
            "base" => Unit::Base,
            "student" => Unit::Student,
            _ => match arg.strip_prefix("exported:") {
                Some(kind) => Unit::Exported(kind.to_string()),
                None => bail!(
                    "unknown eval model {arg:?}\nhint: teacher, base, student or exported:<type>"
                ),
            },
        })
    }

    /// Whether scoring it loads weights into this process (its memory is the model's); the
    /// teacher's stored answers and an API teacher load none.
    fn loads_weights(&self, cfg: &Config) -> bool {
        match self {
            Unit::Teacher => {
                cfg.eval.teacher == TeacherSource::Run && cfg.teacher.kind == TeacherKind::Local
            }
            _ => true,
        }
    }
}

/// Whether eval also scores the teacher with the calculator: asked for, a numeric task,
/// and a local teacher answering now (kdpipe's engine writes the values as it decodes).
fn teacher_with_calculator(cfg: &Config) -> bool {
    cfg.eval.calculator
        && cfg.task.kind == TaskKind::Numeric
        && cfg.eval.teacher == TeacherSource::Run
        && cfg.teacher.kind == TeacherKind::Local
}

fn units(cfg: &Config) -> Result<Vec<Unit>> {
    let mut v = Vec::new();
    for which in [
        EvalModel::Teacher,
        EvalModel::Base,
        EvalModel::Student,
        EvalModel::Exported,
    ] {
        if !cfg.eval.models.contains(&which) {
            continue;
        }
        match which {
            EvalModel::Teacher => {
                v.push(Unit::Teacher);
                if teacher_with_calculator(cfg) {
                    v.push(Unit::TeacherCalculator);
                }
            }
            EvalModel::Base => v.push(Unit::Base),
            EvalModel::Student => v.push(Unit::Student),
            EvalModel::Exported => {
                for (kind, _) in exported_files(cfg)? {
                    v.push(Unit::Exported(kind));
                }
            }
        }
    }
    Ok(v)
}

/// Score one model here (None: the teacher has no answers to score).
fn score_unit(
    cfg: &Config,
    unit: &Unit,
    (prompt, task, rows): (&Prompt, &Task, &[EvalRow]),
) -> Result<Option<Scored>> {
    let student = |who: (&str, &str), model: &str| {
        let who = (who.0.to_string(), who.1.to_string());
        score_student(cfg, who, model, prompt, task, rows).map(Some)
    };
    match unit {
        Unit::Teacher => score_teacher(cfg, prompt, task, rows),
        Unit::TeacherCalculator => score_teacher_with_calculator(cfg, prompt, task, rows).map(Some),
        Unit::Base => student(("base", "student before"), &cfg.student.model),
        Unit::Student => {
            let dir = cfg.student_dir();
            let dir = dir.to_str().context("student folder path is not UTF-8")?;
            student(("student", "student after"), dir)
        }
        Unit::Exported(kind) => {
            let files = exported_files(cfg)?;
            let Some((_, path)) = files.iter().find(|(k, _)| k == kind) else {
                bail!("the export manifest lists no {kind} GGUF\nhint: run kdpipe export again");
            };
            let path = path.to_str().context("export path is not UTF-8")?;
            let who = (format!("student_{kind}"), format!("student {kind} GGUF"));
            student((&who.0, &who.1), path)
        }
    }
}

fn predictions_frame(rows: &[EvalRow], models: &[Scored]) -> Result<DataFrame> {
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
            rows.iter().map(|r| r.gold.as_str()).collect::<Vec<_>>(),
        ),
    ];
    for m in models {
        let key = &m.scores.key;
        let p = &m.answers.predictions;
        cols.push(Column::new(
            format!("{key}_text").into(),
            p.iter().map(|p| p.text.as_str()).collect::<Vec<_>>(),
        ));
        cols.push(Column::new(
            format!("{key}_answer").into(),
            p.iter().map(|p| p.answer.as_deref()).collect::<Vec<_>>(),
        ));
        cols.push(Column::new(
            format!("{key}_correct").into(),
            m.correct.clone(),
        ));
        cols.push(Column::new(
            format!("{key}_seconds").into(),
            p.iter().map(|p| p.seconds).collect::<Vec<_>>(),
        ));
    }
    Ok(DataFrame::new_infer_height(cols)?)
}

/// Score the models `[eval] models` names; `scoring` says whether each runs in a process of
/// its own (the binary: peak RSS per model) or in this one (library callers, tests).
pub fn run(cfg: &Config, scoring: &Scoring) -> Result<Scores> {
    let out_dir = cfg.stage_dir(Stage::Eval);
    let inputs = input_entries(cfg)?;
    let task = Task::from_config(&cfg.task);
    let prompt = Prompt::load(cfg)?;
    let (source, rows) = eval_rows(cfg, &task)?;
    eprintln!(
        "eval: {} rows from {source}; models {:?}",
        rows.len(),
        cfg.eval.models
    );

    let mut models: Vec<Scored> = Vec::new();
    for unit in units(cfg)? {
        models.extend(scoring.score(cfg, &unit, (&prompt, &task, &rows))?);
    }

    // Written beside the earlier output, which stays complete until the swap.
    let staged = StagedDir::begin(&out_dir)?;
    let dir = staged.path();
    let pred_path = dir.join("predictions.parquet");
    write_frame(&pred_path, &mut predictions_frame(&rows, &models)?)?;
    let scores = Scores {
        source,
        rows: rows.len(),
        threads: rayon::current_num_threads(),
        models: models.into_iter().map(|m| m.scores).collect(),
    };
    let report_path = dir.join("report.json");
    write_json(&report_path, &scores)?;
    let md_path = dir.join("report.md");
    write_bytes(&md_path, scores.markdown().as_bytes())?;

    let mut m = Manifest::new(
        Stage::Eval,
        config_hash(&cfg.stage_view(Stage::Eval)),
        cfg.seed,
    );
    m.inputs = inputs;
    m.outputs = vec![
        staged_entry(&staged, &pred_path, Some(rows.len()))?,
        staged_entry(&staged, &report_path, None)?,
        staged_entry(&staged, &md_path, None)?,
    ];
    m.summary = serde_json::to_value(&scores)?;
    m.write(dir)?;
    staged.commit()?;
    Ok(scores)
}
