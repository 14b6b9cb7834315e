//! synthesize: a few seed examples → the teacher writes new task inputs (Self-Instruct,
//! Wang et al., 2023) → filters (filters.rs) → `synthesize/inputs.jsonl` + manifest, which
//! generate then labels like any input file.
//!
//! Requests go out in rounds; each shows a seeded random subset of the seeds and of the
//! inputs accepted so far. After every round the accepted inputs and the counts are saved
//! (state.json), so a killed run resumes there and a run with a larger target extends the
//! earlier one.

mod filters;
mod prompt;

use crate::config::{Config, DataConfig, Stage, TeacherKind};
use crate::dedup::Contamination;
use crate::io::atomic::{write_bytes, write_json};
use crate::io::inputs::read_inputs;
use crate::io::manifest::{config_hash, entry, FileEntry, Manifest};
use crate::progress::Progress;
use crate::records::InputRow;
use crate::teacher::{self, Job, JobResult, Settings};
use anyhow::{Context, Result};
use filters::Filters;
use rand::seq::index::sample;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One accepted input and where it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Synthesized {
    pub id: String,
    pub input: String,
    pub round: u32,
    /// The seeds shown in its request.
    pub seed_ids: Vec<String>,
    /// The earlier synthesized inputs shown in its request.
    pub synthesized_ids: Vec<String>,
}

/// What a run has done so far: the resume point.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    /// Hash of what decides the inputs' content (not the target): a state written under
    /// another one is not reused.
    content_hash: String,
    rounds: u32,
    requests: usize,
    failed_requests: usize,
    /// Replies that passed the filters after the target was already reached.
    surplus: usize,
    rejected: BTreeMap<String, u64>,
    accepted: Vec<Synthesized>,
}

/// Digests of the files synthesize reads.
pub fn input_entries(cfg: &Config) -> Result<Vec<FileEntry>> {
    let s = section(cfg)?;
    s.seeds
        .iter()
        .chain(&s.decontaminate)
        .map(|p| entry(p, None))
        .collect()
}

fn section(cfg: &Config) -> Result<&crate::config::SynthesizeConfig> {
    cfg.synthesize
        .as_ref()
        .context("the config has no [synthesize] section\nhint: add one with seeds = [\"seeds.jsonl\"] and a target")
}

fn content_hash(cfg: &Config) -> String {
    let mut view = cfg.stage_view(Stage::Synthesize);
    if let Some(s) = view.get_mut("synthesize") {
        s["target"] = serde_json::Value::Null;
        s["max_requests"] = serde_json::Value::Null;
    }
    config_hash(&view)
}

fn read_state(path: &Path, hash: &str) -> Option<State> {
    let text = std::fs::read_to_string(path).ok()?;
    let state: State = serde_json::from_str(&text).ok()?;
    (state.content_hash == hash).then_some(state)
}

fn read_texts(cfg: &Config, files: &[PathBuf], what: &str) -> Result<Vec<InputRow>> {
    if files.is_empty() {
        return Ok(vec![]);
    }
    let data = DataConfig {
        inputs: files.to_vec(),
        gold_field: None,
        limit: None,
        ..cfg.data.clone()
    };
    read_inputs(&data).with_context(|| format!("cannot read the {what} named in [synthesize]"))
}

/// The inputs file, one JSON object a line with the [data] field names and provenance.
fn write_inputs(path: &Path, cfg: &Config, rows: &[Synthesized]) -> Result<()> {
    let id_field = cfg.data.id_field.as_deref().unwrap_or("id");
    let mut text = String::new();
    for r in rows {
        let mut obj = serde_json::Map::new();
        obj.insert(id_field.into(), r.id.clone().into());
        obj.insert(cfg.data.input_field.clone(), r.input.clone().into());
        // No gold answer (null, not absent: the reader tells the two apart).
        if let Some(g) = &cfg.data.gold_field {
            obj.insert(g.clone(), serde_json::Value::Null);
        }
        obj.insert("synthesized".into(), true.into());
        obj.insert("round".into(), r.round.into());
        obj.insert("seed_ids".into(), r.seed_ids.clone().into());
        obj.insert("synthesized_ids".into(), r.synthesized_ids.clone().into());
        text.push_str(&serde_json::Value::Object(obj).to_string());
        text.push('\n');
    }
    write_bytes(path, text.as_bytes())
}

pub fn run(cfg: &Config) -> Result<PathBuf> {
    let s = section(cfg)?;
    let out_dir = cfg.stage_dir(Stage::Synthesize);
    let out_path = cfg.synthesized_inputs();
    let state_path = out_dir.join("state.json");
    let stage_hash = config_hash(&cfg.stage_view(Stage::Synthesize));
    let inputs = input_entries(cfg)?;
    if let Ok(m) = Manifest::read(&out_dir, Stage::Synthesize) {
        if m.is_current(&stage_hash, &inputs) {
            eprintln!("synthesize: {} is up to date", out_path.display());
            return Ok(out_path);
        }
    }
    let seeds = read_texts(cfg, &s.seeds, "seed file")?;
    let eval_texts = read_texts(cfg, &s.decontaminate, "evaluation files")?;
    let contamination = (!eval_texts.is_empty())
        .then(|| Contamination::new(eval_texts.iter().map(|r| r.input.as_str()), 13));

    let hash = content_hash(cfg);
    let mut state = read_state(&state_path, &hash).unwrap_or_else(|| State {
        content_hash: hash.clone(),
        rejected: filters::REASONS
            .iter()
            .map(|r| (r.to_string(), 0))
            .collect(),
        ..Default::default()
    });
    state.accepted.truncate(s.target);
    let known = seeds
        .iter()
        .map(|r| r.input.as_str())
        .chain(state.accepted.iter().map(|a| a.input.as_str()));
    let mut filters = Filters::new(s, cfg.task.kind, known, contamination);
    filters.rejected = state.rejected.clone();
    let max_requests = s.max_requests.unwrap_or(5 * s.target);
    eprintln!(
        "synthesize: {} seeds, target {} inputs ({} accepted earlier), at most {max_requests} requests, teacher {}",
        seeds.len(),
        s.target,
        state.accepted.len(),
        cfg.teacher.model
    );

    let settings = Settings {
        max_tokens: s.max_tokens,
        temperature: s.temperature,
        token_topk: 0,
        labels: vec![],
    };
    let mut progress = Progress::new("synthesize", s.target as u64);
    for _ in &state.accepted {
        progress.inc(0);
    }
    let mut teacher_box = None;
    while state.accepted.len() < s.target && state.requests < max_requests {
        let teacher = match &teacher_box {
            Some(t) => t,
            None => teacher_box.insert(teacher::open(&cfg.teacher, false, 0)?),
        };
        let n = s
            .requests_per_round
            .max(1)
            .min(max_requests - state.requests);
        let jobs = round_jobs(cfg, &seeds, &state, n)?;
        let shown: BTreeMap<String, (Vec<String>, Vec<String>)> = jobs
            .iter()
            .map(|r| {
                let ids = (r.seed_ids.clone(), r.synthesized_ids.clone());
                (r.job.id.clone(), ids)
            })
            .collect();
        let mut replies: BTreeMap<String, JobResult> = BTreeMap::new();
        let locate = |_: &str| None;
        teacher.answer_all(
            jobs.into_iter().map(|r| r.job).collect(),
            &settings,
            &locate,
            &mut |job: Job, result: JobResult| {
                replies.insert(job.id, result);
                Ok(())
            },
        )?;
        // In request order, so a rerun of the same round decides the same way.
        for (id, result) in replies {
            if state.accepted.len() >= s.target {
                state.surplus += 1;
                continue;
            }
            let reply = match result {
                Ok(r) => r,
                Err(_) => {
                    state.failed_requests += 1;
                    continue;
                }
            };
            let text = prompt::clean(&reply.text);
            let admitted = filters.admit(text.as_deref(), reply.finish_reason == "length");
            if admitted {
                let (seed_ids, synthesized_ids) = shown.get(&id).cloned().unwrap_or_default();
                state.accepted.push(Synthesized {
                    id: format!("synth-{:06}", state.accepted.len() + 1),
                    input: text.unwrap_or_default(),
                    round: state.rounds,
                    seed_ids,
                    synthesized_ids,
                });
                progress.inc(u64::from(reply.completion_tokens));
            }
        }
        state.requests += n;
        state.rounds += 1;
        state.rejected = filters.rejected.clone();
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("cannot create {}", out_dir.display()))?;
        write_json(&state_path, &state)?;
    }
    let secs = progress.finish();
    if state.accepted.len() < s.target {
        eprintln!(
            "synthesize: warning: stopped at [synthesize] max_requests = {max_requests} with {} of {} inputs accepted\nhint: raise max_requests, add seeds, or loosen near_dup_threshold",
            state.accepted.len(),
            s.target
        );
    }
    write_inputs(&out_path, cfg, &state.accepted)?;
    let summary = serde_json::json!({
        "accepted": state.accepted.len(), "target": s.target, "requests": state.requests,
        "failed_requests": state.failed_requests, "rejected": state.rejected,
        "surplus": state.surplus,
        "rounds": state.rounds, "seconds_this_run": secs, "seeds": seeds.len(),
    });
    let mut m = Manifest::new(Stage::Synthesize, stage_hash, cfg.seed);
    m.inputs = inputs;
    m.outputs = vec![
        entry(&out_path, Some(state.accepted.len()))?,
        entry(&state_path, None)?,
    ];
    m.summary = summary.clone();
    m.write(&out_dir)?;
    eprintln!(
        "synthesize: {} inputs accepted from {} requests; rejected {} → {}",
        state.accepted.len(),
        state.requests,
        serde_json::Value::from(
            state
                .rejected
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (k.clone(), serde_json::Value::from(*n)))
                .collect::<serde_json::Map<_, _>>()
        ),
        out_path.display()
    );
    Ok(out_path)
}

/// One request and the ids of the seeds and synthesized inputs it shows.
struct Request {
    job: Job,
    seed_ids: Vec<String>,
    synthesized_ids: Vec<String>,
}

/// The requests of the next round. The choice is seeded by the run seed and the round.
fn round_jobs(cfg: &Config, seeds: &[InputRow], state: &State, n: usize) -> Result<Vec<Request>> {
    let s = section(cfg)?;
    let round = u64::from(state.rounds);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        cfg.seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let seeded = cfg.teacher.kind != TeacherKind::Local;
    let mut jobs = Vec::with_capacity(n);
    for i in 0..n {
        let picked: Vec<&InputRow> =
            sample(&mut rng, seeds.len(), s.seed_examples.min(seeds.len()))
                .into_iter()
                .map(|j| &seeds[j])
                .collect();
        let k = s.accepted_examples.min(state.accepted.len());
        let earlier: Vec<&Synthesized> = sample(&mut rng, state.accepted.len(), k)
            .into_iter()
            .map(|j| &state.accepted[j])
            .collect();
        let examples: Vec<&str> = picked
            .iter()
            .map(|r| r.input.as_str())
            .chain(earlier.iter().map(|r| r.input.as_str()))
            .collect();
        let job = Job {
            id: format!("round{round:05}-{i:03}"),
            sample: 0,
            messages: prompt::request(&cfg.task.description, &cfg.task.labels, &examples),
            seed: seeded.then_some(cfg.seed.wrapping_add(round * 1000 + i as u64)),
        };
        jobs.push(Request {
            job,
            seed_ids: picked.iter().map(|r| r.id.clone()).collect(),
            synthesized_ids: earlier.iter().map(|r| r.id.clone()).collect(),
        });
    }
    Ok(jobs)
}
