//! The live teacher of `[finetune.live_teacher]`: a teacher running next to the student
//! while it trains, asked for its distribution at tokens the step needs.
//!
//! Each micro-batch passes through `LiveTeacher::prepare` before its forward pass:
//! 1. each of its rows goes on-policy with probability λ (a draw keyed by the run seed,
//!    the step, the micro-batch and the row); those rows' off-policy examples leave;
//! 2. the student samples `samples_per_prompt` replies for each on-policy row, in the
//!    rationale view, on an inference copy of its weights (taken every `refresh_every`
//!    steps; LoRA merged; Q8_0 unless `sample_weights = "f32"`), each sequence with its
//!    own seed from the same key;
//! 3. the teacher scores every sampled token (and, online, every token of the remaining
//!    rationale examples) under its own few-shot prompt for the row: top-k ids and
//!    natural-log probabilities, on its inference engine or through its API;
//! 4. the samples become `OnPolicy` examples (loss: the on-policy divergence only), the
//!    scored rationales keep their CE and gain token-level KD.
//!
//! Everything follows from the seed, the step and the weights, so a resumed run samples
//! and scores what an uninterrupted one does (copies are taken at multiples of
//! `refresh_every`, and config validation makes every checkpoint one).

use super::data::{tokenization_difference, Example, ExampleKind};
use crate::config::{Config, LiveTeacherConfig, SampleWeights, TeacherKind};
use crate::io::atomic::seed_from_text;
use crate::llama::generate::{Finish, Generator, Hooks, Request, Sampling, Sequence};
use crate::llama::{self, Decoder, LoadedModel};
use crate::prompts::{Prompt, View};
use crate::records::CuratedRow;
use crate::teacher::openai::ApiTeacher;
use crate::teacher::scoring::{PositionScore, ScoreRequest, Scorer};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// The prompts of one train row: the student's (rationale view) and the teacher's own
/// few-shot prompt, as token ids.
struct RowPrompts {
    student: Vec<u32>,
    teacher: Vec<u32>,
}

/// Renders a row's prompt for the teacher, as token ids.
type TeacherPrompt<'a> = Box<dyn Fn(&CuratedRow) -> Result<Vec<u32>> + 'a>;

/// What the live teacher did for one step, for the progress line and metrics.jsonl.
#[derive(Debug, Default, Clone, Copy)]
pub struct LiveStats {
    pub on_policy_rows: usize,
    /// Taking the inference copy of the student to sample from.
    pub refresh_seconds: f64,
    pub sampled_tokens: usize,
    pub sample_seconds: f64,
    pub scored_tokens: usize,
    pub score_seconds: f64,
}

impl LiveStats {
    pub fn sample_rate(&self) -> Option<f64> {
        (self.sample_seconds > 0.0).then(|| self.sampled_tokens as f64 / self.sample_seconds)
    }

    pub fn score_rate(&self) -> Option<f64> {
        (self.score_seconds > 0.0).then(|| self.scored_tokens as f64 / self.score_seconds)
    }
}

pub struct LiveTeacher {
    cfg: LiveTeacherConfig,
    scorer: Scorer,
    rows: Vec<RowPrompts>,
    /// The student's tokens that end a reply, and its vocabulary size.
    stop: Vec<u32>,
    student_vocab: usize,
    max_seq_len: usize,
    seed: u64,
    /// The inference copy of the student that samples (none in a refresh window without
    /// on-policy rows).
    snapshot: Option<Decoder>,
}

impl LiveTeacher {
    /// Load the teacher the config names and render every train row's prompts. None when
    /// the section is absent or asks for nothing (λ = 0, not online).
    pub fn open(
        cfg: &Config,
        student: &LoadedModel,
        prompt: &Prompt,
        train: &[CuratedRow],
    ) -> Result<Option<LiveTeacher>> {
        let ft = &cfg.finetune;
        let Some(live) = ft.live_teacher.clone() else {
            return Ok(None);
        };
        if live.on_policy == 0.0 && !live.online {
            return Ok(None);
        }
        let started = Instant::now();
        let (scorer, teacher_ids): (Scorer, TeacherPrompt) = match (&live.model, cfg.teacher.kind) {
            (None, TeacherKind::Openai) => {
                let api = ApiTeacher::open(&cfg.teacher)?;
                let scorer = Scorer::api(api, &student.tokenizer)?;
                // Teacher and student share a tokenizer; the student's template
                // renders the teacher's chat for the API's raw completions.
                let ids = |r: &CuratedRow| student.chat_ids(&prompt.teacher_chat(&r.input)?);
                (scorer, Box::new(ids))
            }
            (model, _) => {
                let path = model.as_deref().unwrap_or(&cfg.teacher.model);
                let mut loaded = llama::load_for_inference(path).with_context(|| {
                        format!("cannot load the live teacher {path} ([finetune.live_teacher] model, else [teacher] model)")
                    })?;
                check_same_tokenizer(&loaded, student, train, path)?;
                let decoder = loaded.take_inference_decoder()?;
                let ids = move |r: &CuratedRow| loaded.chat_ids(&prompt.teacher_chat(&r.input)?);
                (Scorer::local(decoder), Box::new(ids))
            }
        };
        let rows = train
            .iter()
            .map(|r| {
                Ok(RowPrompts {
                    student: student.chat_ids(&prompt.student_chat(View::Rationale, &r.input))?,
                    teacher: teacher_ids(r).with_context(|| {
                        format!("cannot render the teacher's prompt for row {:?}", r.id)
                    })?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let what = match &scorer {
            Scorer::Local(l) => format!(
                "{} in this process ({} layers)",
                live.model.as_deref().unwrap_or(&cfg.teacher.model),
                l.decoder.shape.num_hidden_layers
            ),
            Scorer::Api(_) => format!(
                "{} at {}",
                cfg.teacher.model,
                cfg.teacher.base_url.as_deref().unwrap_or("?")
            ),
        };
        eprintln!(
            "finetune: live teacher {what}, ready in {:.1} s: on-policy λ = {}, {} sample(s) of ≤ {} tokens at temperature {}, {:?} over its top {}{}",
            started.elapsed().as_secs_f64(),
            live.on_policy,
            live.samples_per_prompt,
            live.max_new_tokens,
            live.temperature,
            live.divergence,
            live.top_k,
            if live.online { "; online: rationales scored live" } else { "" }
        );
        Ok(Some(LiveTeacher {
            cfg: live,
            scorer,
            rows,
            stop: student.stop_tokens(),
            student_vocab: student.shape.vocab_size,
            max_seq_len: ft.max_seq_len,
            seed: cfg.seed,
            snapshot: None,
        }))
    }

    /// Before step `step`'s micro-batches: every `refresh_every` steps the inference copy
    /// of the student expires, and a new one is taken only if a micro-batch before the
    /// next refresh sends a row on-policy (the draws follow from the seed, so they are
    /// known ahead from `schedule`, the run's micro-batches, `accum` a step). Copies are
    /// always of the weights at a multiple of `refresh_every`, as a resumed run takes them.
    pub fn before_step(
        &mut self,
        student: &Decoder,
        step: usize,
        (schedule, accum): (&[Vec<Example>], usize),
        stats: &mut LiveStats,
    ) -> Result<()> {
        if self.cfg.on_policy == 0.0 {
            return Ok(());
        }
        let every = self.cfg.refresh_every;
        if step.is_multiple_of(every) {
            // Free the old copy first: two would double the memory they take.
            self.snapshot = None;
        }
        if self.snapshot.is_some() {
            return Ok(());
        }
        let needed = (step..(step / every + 1) * every).any(|s| {
            (0..accum).any(|k| {
                schedule
                    .get(s * accum + k)
                    .is_some_and(|examples| !self.on_policy_rows(examples, s, k).is_empty())
            })
        });
        if needed {
            let started = Instant::now();
            self.snapshot = Some(match self.cfg.sample_weights {
                SampleWeights::Q8_0 if student.device().is_cpu() => student.quantized_copy()?,
                _ => student.inference_copy()?,
            });
            stats.refresh_seconds += started.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// The micro-batch `micro` of step `step` as it trains: on-policy rows replaced by the
    /// student's samples, rationales scored when online.
    pub fn prepare(
        &self,
        mut examples: Vec<Example>,
        step: usize,
        micro: usize,
        stats: &mut LiveStats,
    ) -> Result<Vec<Example>> {
        let on_policy = self.on_policy_rows(&examples, step, micro);
        examples.retain(|e| !on_policy.contains(&e.row));
        stats.on_policy_rows += on_policy.len();
        let samples = self.sample(&on_policy, step, micro, stats)?;

        // Everything the teacher scores: the remaining rationales (online), then the samples.
        let rationales: Vec<usize> = if self.cfg.online {
            (0..examples.len())
                .filter(|&i| examples[i].kind == ExampleKind::Rationale)
                .collect()
        } else {
            vec![]
        };
        let replies: Vec<Vec<u32>> = rationales.iter().map(|&i| reply_of(&examples[i])).collect();
        let mut requests: Vec<ScoreRequest> = rationales
            .iter()
            .zip(&replies)
            .map(|(&i, reply)| ScoreRequest {
                prompt: &self.rows[examples[i].row as usize].teacher,
                continuation: reply,
            })
            .collect();
        requests.extend(samples.iter().map(|(row, _, reply)| ScoreRequest {
            prompt: &self.rows[*row as usize].teacher,
            continuation: reply,
        }));
        let scores = self.score(&requests, stats)?;
        let mut scores = scores.into_iter();
        for &i in &rationales {
            let s = scores
                .next()
                .context("the teacher scored fewer sequences than asked")?;
            examples[i].token_topk = self.alternatives(s);
        }
        for (row, prompt_len, reply) in &samples {
            let s = scores
                .next()
                .context("the teacher scored fewer sequences than asked")?;
            let prompt = &self.rows[*row as usize].student;
            let prompt = &prompt[prompt.len() - prompt_len..];
            let mut target = vec![0u8; prompt.len()];
            target.extend(std::iter::repeat_n(1u8, reply.len()));
            examples.push(Example {
                kind: ExampleKind::OnPolicy,
                ids: [prompt, reply].concat(),
                target,
                kd: None,
                truncated: *prompt_len < self.rows[*row as usize].student.len(),
                token_topk: self.alternatives(s),
                token_uld: vec![],
                row: *row,
            });
        }
        Ok(examples)
    }

    /// The rows of the micro-batch (in order of appearance) that go on-policy.
    fn on_policy_rows(&self, examples: &[Example], step: usize, micro: usize) -> Vec<u32> {
        let mut rows: Vec<u32> = Vec::new();
        for e in examples {
            if !rows.contains(&e.row) {
                rows.push(e.row);
            }
        }
        let lambda = self.cfg.on_policy;
        rows.retain(|row| {
            let key = format!("on-policy-row:{}:{step}:{micro}:{row}", self.seed);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed_from_text(&key));
            lambda >= 1.0 || rng.random::<f64>() < lambda
        });
        rows
    }

    /// The student's replies for `rows`: (row, prompt tokens kept, reply with its stop
    /// token), `samples_per_prompt` each, in row order.
    fn sample(
        &self,
        rows: &[u32],
        step: usize,
        micro: usize,
        stats: &mut LiveStats,
    ) -> Result<Vec<(u32, usize, Vec<u32>)>> {
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let model = self
            .snapshot
            .as_ref()
            .context("no copy of the student to sample from (before_step was not called)")?;
        let started = Instant::now();
        let max_new = self.cfg.max_new_tokens;
        // The prompt keeps its last tokens when prompt and reply would not fit.
        let room = self.max_seq_len - max_new;
        let mut meta = Vec::new();
        let mut requests = Vec::new();
        for &row in rows {
            let prompt = &self.rows[row as usize].student;
            let kept = prompt.len().min(room);
            for j in 0..self.cfg.samples_per_prompt {
                let key = format!("on-policy-sample:{}:{step}:{micro}:{row}:{j}", self.seed);
                meta.push((row, kept));
                requests.push(SampleRequest {
                    prompt: prompt[prompt.len() - kept..].to_vec(),
                    seed: seed_from_text(&key),
                });
            }
        }
        let replies = sample_replies(model, &self.stop, &requests, max_new, self.cfg.temperature)?;
        let out: Vec<(u32, usize, Vec<u32>)> = meta
            .into_iter()
            .zip(replies)
            .map(|((row, kept), reply)| (row, kept, reply))
            .collect();
        stats.sampled_tokens += out.iter().map(|(_, _, r)| r.len()).sum::<usize>();
        stats.sample_seconds += started.elapsed().as_secs_f64();
        Ok(out)
    }

    fn score(
        &self,
        requests: &[ScoreRequest],
        stats: &mut LiveStats,
    ) -> Result<Vec<Vec<PositionScore>>> {
        if requests.is_empty() {
            return Ok(vec![]);
        }
        let started = Instant::now();
        let scores = self.scorer.score(requests, self.cfg.top_k)?;
        stats.scored_tokens += requests.iter().map(|r| r.continuation.len()).sum::<usize>();
        stats.score_seconds += started.elapsed().as_secs_f64();
        Ok(scores)
    }

    /// A position's alternatives as training reads them; ids past the student's
    /// vocabulary (a teacher's padded head) join the tail.
    fn alternatives(&self, scores: Vec<PositionScore>) -> Vec<(Vec<u32>, Vec<f32>)> {
        scores
            .into_iter()
            .map(|p| {
                p.top
                    .into_iter()
                    .filter(|(id, _)| (*id as usize) < self.student_vocab)
                    .unzip()
            })
            .collect()
    }
}

/// The reply tokens of an example (its targets), in order.
fn reply_of(e: &Example) -> Vec<u32> {
    e.ids
        .iter()
        .zip(&e.target)
        .filter(|(_, &t)| t == 1)
        .map(|(&id, _)| id)
        .collect()
}

/// One reply to sample: its prompt and the seed of its sampling generator.
pub struct SampleRequest {
    pub prompt: Vec<u32>,
    pub seed: u64,
}

/// The replies `model` samples for `requests` (at `temperature`; 0: greedy), up to
/// `max_new` tokens each, decoded together; each reply ends with the stop token that
/// ended it (a target too: the student learns where its teacher would stop). A reply
/// depends only on its prompt, its seed and the weights.
pub fn sample_replies(
    model: &Decoder,
    stop: &[u32],
    requests: &[SampleRequest],
    max_new: usize,
    temperature: f64,
) -> Result<Vec<Vec<u32>>> {
    let generator = Generator {
        model,
        parallel: requests.len().clamp(1, 32),
        stop: stop.to_vec(),
        sampling: if temperature > 0.0 {
            Sampling::Temperature(temperature)
        } else {
            Sampling::Greedy
        },
    };
    let mut collect = Collect(vec![None; requests.len()]);
    let requests = requests.iter().enumerate().map(|(i, r)| {
        Ok(Request {
            tag: i,
            prompt: r.prompt.clone(),
            max_new,
            seed: r.seed,
        })
    });
    generator.run(requests, &mut collect)?;
    collect
        .0
        .into_iter()
        .map(|s| s.context("a sampled sequence did not finish"))
        .collect()
}

/// Sampled replies (with their stop token) by request index.
struct Collect(Vec<Option<Vec<u32>>>);

impl Hooks<usize> for Collect {
    fn finished(&mut self, seq: Sequence<usize>, _: Finish) -> Result<()> {
        let index = seq.tag;
        let mut reply = seq.generated;
        reply.extend(seq.stop_token);
        self.0[index] = Some(reply);
        Ok(())
    }

    fn rejected(&mut self, index: usize, message: String) -> Result<()> {
        bail!("cannot sample reply {index}: {message}")
    }
}

/// Teacher and student must read token ids alike: the same ids for the first rows'
/// inputs and replies.
fn check_same_tokenizer(
    teacher: &LoadedModel,
    student: &LoadedModel,
    rows: &[CuratedRow],
    path: &str,
) -> Result<()> {
    if let Some((id, t, s)) = tokenization_difference(teacher, student, rows)? {
        bail!(
            "the live teacher {path} tokenizes row {id:?} differently from the student ({t} vs {s} tokens): on-policy and online distillation compare the two token by token and need one tokenizer\nhint: use a teacher of the student's family (Qwen2.5-1.5B for a Qwen2.5-0.5B student), or remove [finetune.live_teacher] and use label-level KD (kd_weight)"
        );
    }
    Ok(())
}
