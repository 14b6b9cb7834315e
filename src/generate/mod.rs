//! generate: inputs → step-by-step prompts → teacher → parsed rationale, answer and soft
//! labels → `teacher-IIIII-of-NNNNN.parquet` + manifest.
//!
//! One job per (id, sample). Rows go to part files as they arrive (parts.rs), so a killed
//! run resumes with only the missing keys; when every job of the shard has a row, the parts
//! are merged in input order, vote shares are added across samples, and the shard's
//! teacher file and manifest are written (manifest last).

mod dry_run;
mod parts;
mod rows;

use crate::config::{Config, Stage, TeacherConfig};
use crate::io::atomic::text_sha256;
use crate::io::inputs::read_inputs;
use crate::io::manifest::{config_hash, entry, FileEntry, Manifest};
use crate::io::parquet::{read_frame, write_frame};
use crate::io::shards::Shard;
use crate::progress::Progress;
use crate::prompts::Prompt;
use crate::records::topk_store::{bytes_per_token, stored_tokens};
use crate::records::{InputRow, TeacherRow};
use crate::task::{ParseStatus, Task};
use crate::teacher::{self, batch_api, Job, JobResult, RetryCounts, Settings};
use anyhow::{bail, Context, Result};
use parts::PartStore;
use rows::{add_vote_shares, RowContext};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How `generate` was asked to run, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub shard: Shard,
    /// Render, count and price; call no teacher.
    pub dry_run: bool,
    /// Discard rows of an earlier, unfinished run instead of resuming it.
    pub fresh: bool,
    pub batch_files: Option<BatchFiles>,
}

/// OpenAI Batch API files instead of live requests.
#[derive(Debug, Clone)]
pub enum BatchFiles {
    /// Write request files for the missing rows into this folder.
    Write(PathBuf),
    /// Read Batch output and error files into rows; re-emit requests for what failed.
    Ingest(Vec<PathBuf>),
}

/// Digests of the files a generate run reads.
pub fn input_entries(cfg: &Config) -> Result<Vec<FileEntry>> {
    let mut v: Vec<_> = cfg
        .data
        .inputs
        .iter()
        .map(|p| entry(p, None))
        .collect::<Result<_>>()?;
    v.push(entry(&cfg.prompt_path(), None)?);
    Ok(v)
}

/// The request settings of one teacher's jobs.
fn settings(cfg: &Config, teacher: &TeacherConfig) -> Settings {
    Settings {
        max_tokens: teacher.max_tokens,
        temperature: teacher.temperature,
        token_topk: cfg.generate.token_topk(),
        labels: teacher::scored_labels(&cfg.task, teacher),
    }
}

/// Which teacher writes a sample: teacher i writes samples i·k … i·k + k − 1.
fn teacher_index(cfg: &Config, sample: u32) -> usize {
    sample as usize / cfg.generate.samples.max(1)
}

fn row_context<'a>(
    cfg: &Config,
    task: &'a Task,
    settings: &'a Settings,
    prompt: &Prompt,
    backend: &str,
    teacher: &str,
) -> RowContext<'a> {
    RowContext {
        task,
        settings,
        backend: backend.to_string(),
        teacher: teacher.to_string(),
        prompt_name: prompt_name(cfg),
        prompt_hash: prompt.hash.clone(),
        vocab: String::new(),
    }
}

/// The fingerprint of the vocabulary a teacher's token ids index: read from its model
/// when it runs here and keeps token top-k ("" otherwise: an API gives token texts).
fn teacher_vocabulary(teacher: &TeacherConfig, settings: &Settings) -> Result<String> {
    if settings.token_topk == 0 || teacher.kind == crate::config::TeacherKind::Openai {
        return Ok(String::new());
    }
    let tokenizer = crate::llama::load_tokenizer(&teacher.model)?;
    Ok(crate::llama::vocab::fingerprint(&tokenizer))
}

/// A sample's seed, from the run seed and the row key: the same row always gets the same
/// seed, whichever shard or resumed run sends it.
fn sample_seed(seed: u64, id: &str, sample: u32) -> u64 {
    crate::io::atomic::seed_from_text(&format!("{seed}:{id}:{sample}"))
}

fn jobs(cfg: &Config, prompt: &Prompt, inputs: &[InputRow]) -> Result<Vec<Job>> {
    let k = cfg.generate.samples as u32;
    let teachers = cfg.teachers();
    let mut jobs = Vec::with_capacity(inputs.len() * k as usize * teachers.len());
    for input in inputs {
        let messages = prompt.teacher_chat(&input.input)?;
        // Every backend gets a seed; one that cannot use it (mistralrs) drops it.
        for index in 0..teachers.len() {
            for s in 0..k {
                let sample = index as u32 * k + s;
                jobs.push(Job {
                    id: input.id.clone(),
                    sample,
                    messages: messages.clone(),
                    seed: Some(sample_seed(cfg.seed, &input.id, sample)),
                });
            }
        }
    }
    Ok(jobs)
}

type Key = (String, u32);

pub fn run(cfg: &Config, opts: &Options) -> Result<PathBuf> {
    let out_dir = cfg.stage_dir(Stage::Generate);
    let shard = opts.shard;
    let task = Task::from_config(&cfg.task);
    let prompt = Prompt::load(cfg)?;
    let inputs: Vec<InputRow> = read_inputs(&cfg.data)?
        .into_iter()
        .filter(|r| shard.owns(&r.id))
        .collect();
    let jobs = jobs(cfg, &prompt, &inputs)?;
    if opts.dry_run {
        dry_run::report(cfg, &jobs, &settings(cfg, &cfg.teacher))?;
        return Ok(out_dir);
    }
    if opts.batch_files.is_some() && !cfg.ensemble.is_empty() {
        bail!("Batch API files are written for one teacher, and this config names an [[ensemble]]\nhint: run the Batch job with one [teacher] per run name");
    }

    check_token_kd_vocabulary(cfg)?;
    let inputs_manifest = input_entries(cfg)?;
    let stage_hash = config_hash(&cfg.stage_view(Stage::Generate));
    let out_path = shard.teacher_file(&out_dir);
    let finished = Manifest::read_as(&out_dir, &shard.manifest_name(), Stage::Generate).ok();
    if opts.batch_files.is_none() && !opts.fresh {
        if let Some(m) = &finished {
            if m.is_current(&stage_hash, &inputs_manifest) {
                eprintln!("generate: {} is up to date", out_path.display());
                return Ok(out_path);
            }
        }
    }

    let row_hash = text_sha256(&format!("{}:{}", cfg.row_view(), prompt.hash));
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let (mut parts, earlier) = PartStore::open(
        &shard.parts_dir(&out_dir),
        &row_hash,
        cfg.generate.flush_rows,
        opts.fresh,
    )?;
    let mut done: HashMap<Key, TeacherRow> = HashMap::new();
    if !opts.fresh {
        for row in finished_rows(finished.as_ref(), &out_path, &row_hash)? {
            done.insert((row.id.clone(), row.sample), row);
        }
    }
    for row in earlier {
        done.entry((row.id.clone(), row.sample)).or_insert(row);
    }
    let todo: Vec<Job> = jobs
        .iter()
        .filter(|j| !done.contains_key(&(j.id.clone(), j.sample)))
        .cloned()
        .collect();
    let reused = jobs.len() - todo.len();
    eprintln!(
        "generate: {} inputs × {} samples{}: {} rows to write, {} already written, teacher {}",
        inputs.len(),
        cfg.generate.samples,
        if shard.count > 1 {
            format!(" (shard {}/{})", shard.index, shard.count)
        } else {
            String::new()
        },
        todo.len(),
        reused,
        cfg.teacher.model
    );

    if let Some(BatchFiles::Write(dir)) = &opts.batch_files {
        let files = batch_api::write_requests(
            dir,
            &cfg.teacher.model,
            &todo,
            &settings(cfg, &cfg.teacher),
        )?;
        eprintln!(
            "generate: wrote {} requests in {} file(s) under {}",
            todo.len(),
            files.len(),
            dir.display()
        );
        return Ok(dir.clone());
    }

    // Where the rows come from: batch result files, or the live teachers one after another.
    let by_id: HashMap<&str, &InputRow> = inputs.iter().map(|r| (r.id.as_str(), r)).collect();
    let locate = |text: &str| task.answer_offset(text);
    let mut progress = Progress::new("generate", todo.len() as u64);
    let mut new_rows: Vec<TeacherRow> = vec![];
    let mut new_tokens = (0u64, 0u64);
    let mut unanswered: Vec<Job> = vec![];
    let mut teacher_ids: Vec<(String, String)> = vec![];
    let mut record = |ctx: &RowContext, job: Job, result: JobResult| -> Result<()> {
        let input = by_id
            .get(job.id.as_str())
            .context("a reply for an id that was not asked")?;
        let row = ctx.row(&job, input, result);
        progress.inc(row.completion_tokens as u64);
        new_tokens.0 += row.prompt_tokens as u64;
        new_tokens.1 += row.completion_tokens as u64;
        parts.push(row.clone())?;
        new_rows.push(row);
        Ok(())
    };
    let outcome = match &opts.batch_files {
        Some(BatchFiles::Ingest(files)) => {
            let settings = settings(cfg, &cfg.teacher);
            let ctx = row_context(cfg, &task, &settings, &prompt, "batch", &cfg.teacher.model);
            teacher_ids.push(("batch".into(), cfg.teacher.model.clone()));
            batch_api::ingest(files, &todo, &settings, &locate, &mut |job, result| {
                record(&ctx, job, result)
            })
            .map(|o| {
                unanswered = o.unanswered;
                o.failures
            })
        }
        _ => {
            let mut retries = RetryCounts::new();
            let mut outcome = Ok(());
            for (index, tcfg) in cfg.teachers().into_iter().enumerate() {
                let mine: Vec<Job> = todo
                    .iter()
                    .filter(|j| teacher_index(cfg, j.sample) == index)
                    .cloned()
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let settings = settings(cfg, tcfg);
                let teacher =
                    match teacher::open(tcfg, !settings.labels.is_empty(), settings.token_topk) {
                        Ok(t) => t,
                        Err(e) => {
                            outcome = Err(e);
                            break;
                        }
                    };
                teacher_ids.push((teacher.backend().to_string(), teacher.id().to_string()));
                let vocab = match teacher_vocabulary(tcfg, &settings) {
                    Ok(v) => v,
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                };
                let ctx = RowContext {
                    vocab,
                    ..row_context(
                        cfg,
                        &task,
                        &settings,
                        &prompt,
                        teacher.backend(),
                        teacher.id(),
                    )
                };
                let answered = teacher.answer_all(mine, &settings, &locate, &mut |job, result| {
                    record(&ctx, job, result)
                });
                match answered {
                    Ok(r) => {
                        for (cause, n) in r {
                            *retries.entry(cause).or_default() += n;
                        }
                    }
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            outcome.map(|()| retries)
        }
    };
    let (backend, teacher_id) = teacher_ids.first().cloned().unwrap_or_default();
    // Whatever happened, rows already answered are kept for the next run.
    parts.flush()?;
    let retries = outcome?;
    for row in new_rows {
        done.insert((row.id.clone(), row.sample), row);
    }
    let secs = progress.finish();
    if !retries.is_empty() {
        eprintln!("generate: retries by cause {retries:?}");
    }
    if !unanswered.is_empty() {
        let dir = out_dir.join("batch-retry");
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        let settings = settings(cfg, &cfg.teacher);
        let files = batch_api::write_requests(&dir, &cfg.teacher.model, &unanswered, &settings)?;
        bail!(
            "{} rows have no answer in the batch files ({} written for them under {})\nhint: submit those request files, then ingest their output together with the earlier files",
            unanswered.len(),
            files.len(),
            dir.display()
        );
    }

    // Every job has a row: merge in input order, add vote shares, write the shard.
    let mut rows: Vec<TeacherRow> = Vec::with_capacity(jobs.len());
    for job in &jobs {
        let row = done
            .remove(&(job.id.clone(), job.sample))
            .with_context(|| format!("no row for input {:?} sample {}", job.id, job.sample))?;
        rows.push(row);
    }
    add_vote_shares(&mut rows, cfg.generate.samples * cfg.teachers().len());
    let mut df = TeacherRow::to_frame(&rows)?;
    write_frame(&out_path, &mut df)?;

    let summary = summary(
        cfg, &rows, &retries, secs, reused, new_tokens, &row_hash, shard,
    );
    let mut m = Manifest::new(Stage::Generate, stage_hash, cfg.seed);
    m.inputs = inputs_manifest;
    m.outputs = vec![entry(&out_path, Some(rows.len()))?];
    m.summary = summary;
    let topk_tokens = stored_tokens(&df);
    if let Some(bytes) = bytes_per_token(&[&out_path], topk_tokens)? {
        m.summary["topk_tokens"] = topk_tokens.into();
        m.summary["topk_bytes_per_token"] = bytes.into();
    }
    m.summary["backend"] = backend.clone().into();
    m.summary["teacher"] = teacher_id.into();
    if teacher_ids.len() > 1 {
        m.summary["teachers"] = teacher_ids.iter().map(|(_, id)| id.clone()).collect();
    }
    m.write_as(&out_dir, &shard.manifest_name())?;
    parts.remove()?;
    let parsed = rows
        .iter()
        .filter(|r| ParseStatus::usable(&r.status))
        .count();
    eprintln!(
        "generate: {} rows ({} parsed, {} new) in {:.0} s → {}",
        rows.len(),
        parsed,
        rows.len() - reused,
        secs,
        out_path.display()
    );
    Ok(out_path)
}

/// Token top-k that the configured finetune reads by id (`kd_token_weight > 0`,
/// `token_kd = "same_vocab"`) must come from the student's own vocabulary: a local
/// teacher of another tokenizer is refused here, before any teacher time is spent.
/// Vocabularies of one family that differ only in the padding of the embedding matrix
/// (Qwen2.5's 151,936 and 152,064 rows) have the same tokens and pass. A student file
/// that is not there yet is not checked (finetune checks again).
fn check_token_kd_vocabulary(cfg: &Config) -> Result<()> {
    let ft = &cfg.finetune;
    let local = cfg.teacher.kind != crate::config::TeacherKind::Openai;
    if cfg.generate.token_topk() == 0
        || ft.kd_token_weight() <= 0.0
        || ft.token_kd != crate::config::TokenKd::SameVocab
        || !local
        || !Path::new(&cfg.student.model).exists()
    {
        return Ok(());
    }
    let teacher = crate::llama::load_tokenizer(&cfg.teacher.model)?;
    let student = crate::llama::load_tokenizer(&cfg.student.model)?;
    if let Some(difference) = crate::llama::vocab::vocabulary_difference(&teacher, &student)? {
        bail!(
            "[finetune] kd_token_weight > 0 reads the teacher's token ids with the student's vocabulary (token_kd = \"same_vocab\"), and the two differ: {difference}\nhint: set [finetune] token_kd = \"cross\" (byte-offset alignment across tokenizers), use a student of the teacher's family, or set kd_token_weight = 0"
        );
    }
    Ok(())
}

/// The prompt template's name, for provenance: the file stem.
fn prompt_name(cfg: &Config) -> String {
    cfg.prompt_path()
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Rows of this shard's finished teacher file, when it was written under the same row
/// configuration (a run extended with more inputs or samples reuses them).
fn finished_rows(
    manifest: Option<&Manifest>,
    path: &Path,
    row_hash: &str,
) -> Result<Vec<TeacherRow>> {
    let same = manifest
        .and_then(|m| m.summary.get("row_hash")?.as_str().map(|h| h == row_hash))
        .unwrap_or(false);
    if !same || !path.exists() {
        return Ok(vec![]);
    }
    TeacherRow::from_frame(&read_frame(path)?, path)
}

#[allow(clippy::too_many_arguments)]
fn summary(
    cfg: &Config,
    rows: &[TeacherRow],
    retries: &RetryCounts,
    secs: f64,
    reused: usize,
    (prompt, completion): (u64, u64),
    row_hash: &str,
    shard: Shard,
) -> serde_json::Value {
    let mut statuses: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows {
        *statuses.entry(r.status.as_str()).or_default() += 1;
    }
    serde_json::json!({
        "rows": rows.len(),
        "parsed": rows.iter().filter(|r| ParseStatus::usable(&r.status)).count(),
        "statuses": statuses,
        "rows_reused": reused,
        "retries": retries,
        "seconds": secs,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "completion_tokens_per_second": completion as f64 / secs.max(1e-9),
        "row_hash": row_hash,
        "shard": format!("{}/{}", shard.index, shard.count),
        // The resolved generate config; it holds no secrets (keys are named, never stored).
        "config": cfg.stage_view(Stage::Generate),
    })
}
