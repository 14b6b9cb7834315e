//! generate: inputs → step-by-step prompts → teacher (one request at a time) → parsed
//! rationale and answer → label-set soft labels → teacher-00000-of-00001.parquet.

use crate::config::{Config, TaskKind};
use crate::io::manifest::{config_hash, entry, Manifest};
use crate::io::{inputs::read_inputs, parquet::write_frame};
use crate::progress::Progress;
use crate::prompts::Prompt;
use crate::records::{InputRow, TeacherRow, SOFT_LABEL_SCORES, SOFT_NONE};
use crate::task::{ParseStatus, Task};
use crate::teacher::{self, normalize_logprobs, Teacher, TeacherError};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;

pub const TEACHER_FILE: &str = "teacher-00000-of-00001.parquet";

/// Digests of the files a generate run reads.
pub fn input_entries(cfg: &Config) -> Result<Vec<crate::io::manifest::FileEntry>> {
    let mut v: Vec<_> = cfg
        .data
        .inputs
        .iter()
        .map(|p| entry(p, None))
        .collect::<Result<_>>()?;
    v.push(entry(&cfg.prompt_path(), None)?);
    Ok(v)
}

pub fn run(cfg: &Config) -> Result<PathBuf> {
    let out_dir = cfg.stage_dir("generate");
    let task = Task::from_config(&cfg.task);
    let prompt = Prompt::load(cfg)?;
    let inputs = read_inputs(&cfg.data)?;
    let inputs_manifest = input_entries(cfg)?;
    eprintln!(
        "generate: {} inputs, teacher {}",
        inputs.len(),
        cfg.teacher.model
    );
    let scores_labels = task.kind == TaskKind::Labels && cfg.teacher.label_scores;
    let teacher = teacher::open(&cfg.teacher, scores_labels)?;

    let mut progress = Progress::new("generate", inputs.len() as u64);
    let mut rows = Vec::with_capacity(inputs.len());
    for input in &inputs {
        let row = answer_one(teacher.as_ref(), cfg, &task, &prompt, input)
            .with_context(|| format!("teacher failed on input id {:?}", input.id))?;
        progress.inc(row.completion_tokens as u64);
        rows.push(row);
    }
    let secs = progress.finish();

    std::fs::create_dir_all(&out_dir)?;
    let out_path = out_dir.join(TEACHER_FILE);
    let mut df = TeacherRow::to_frame(&rows)?;
    write_frame(&out_path, &mut df)?;

    let ok = rows
        .iter()
        .filter(|r| ParseStatus::usable(&r.status))
        .count();
    let tokens: u64 = rows.iter().map(|r| r.completion_tokens as u64).sum();
    let mut m = Manifest::new(
        "generate",
        config_hash(&cfg.stage_view("generate")),
        cfg.seed,
    );
    m.inputs = inputs_manifest;
    m.outputs = vec![entry(&out_path, Some(rows.len()))?];
    m.summary = serde_json::json!({
        "rows": rows.len(), "parsed": ok, "seconds": secs,
        "completion_tokens": tokens, "tokens_per_second": tokens as f64 / secs.max(1e-9),
        "teacher": teacher.id(),
    });
    m.write(&out_dir)?;
    eprintln!(
        "generate: {} rows ({} parsed) in {:.0} s, {:.1} tok/s → {}",
        rows.len(),
        ok,
        secs,
        tokens as f64 / secs.max(1e-9),
        out_path.display()
    );
    Ok(out_path)
}

/// One input through the teacher, retrying a retryable failure a few times.
fn answer_one(
    teacher: &dyn Teacher,
    cfg: &Config,
    task: &Task,
    prompt: &Prompt,
    input: &InputRow,
) -> Result<TeacherRow> {
    let chat = prompt.teacher_chat(&input.input)?;
    let start = Instant::now();
    let mut attempt = 0;
    let gen = loop {
        match teacher.generate(&chat, cfg.teacher.max_tokens, cfg.teacher.temperature) {
            Ok(g) => break g,
            Err(TeacherError::Retryable(e)) if attempt < 2 => {
                attempt += 1;
                tracing::warn!("retrying row {} after: {e}", input.id);
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut parsed = task.parse_rationale_output(&gen.text, gen.truncated);

    // Label-set scores: the teacher's probability of each label right after its own
    // rationale. A parsed answer outside the label set is rescued by the best label.
    let (mut soft_kind, mut soft_labels, mut soft_probs) = (SOFT_NONE.to_string(), vec![], vec![]);
    if task.kind == TaskKind::Labels && cfg.teacher.label_scores {
        if let Some(offset) = parsed.answer_offset {
            let conts: Vec<String> = task.labels.iter().map(|l| format!(" {l}")).collect();
            let logprobs = teacher.score_continuations(&chat, &gen.text[..offset], &conts)?;
            soft_probs = normalize_logprobs(&logprobs);
            soft_labels = task.labels.clone();
            soft_kind = SOFT_LABEL_SCORES.to_string();
            if parsed.status == ParseStatus::OutsideLabelSet {
                let best = soft_probs
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i);
                if let Some(i) = best {
                    parsed.answer = Some(task.labels[i].clone());
                    parsed.status = ParseStatus::Rescued;
                }
            }
        }
    }
    Ok(TeacherRow {
        id: input.id.clone(),
        sample: 0,
        input: input.input.clone(),
        gold: input
            .gold
            .as_deref()
            .map(|g| task.normalize_gold(g).unwrap_or_else(|| g.to_string())),
        raw: gen.text,
        rationale: parsed.rationale,
        answer: parsed.answer,
        status: parsed.status.as_str().to_string(),
        soft_kind,
        soft_labels,
        soft_probs,
        prompt_tokens: gen.prompt_tokens,
        completion_tokens: gen.completion_tokens,
        latency_ms: start.elapsed().as_secs_f64() * 1000.0,
        teacher: teacher.id().to_string(),
        prompt_hash: prompt.hash.clone(),
    })
}
