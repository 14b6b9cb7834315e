//! The local teacher on kdpipe's own engine: the llama-family decoder (the student's)
//! serving a llama or qwen2 GGUF or Hugging Face model, `parallel` sequences decoded
//! together through `llama::generate` (continuous batching; the few-shot prefix shared by
//! consecutive prompts is computed once).
//!
//! mistralrs decodes one request at a time on CPU (it mixes up concurrent prompts,
//! docs/STACK.md), so every token reads all weights once and speed is bound by memory;
//! here the same reads become matrix products. A GGUF's weights stay in their block
//! formats (`kernels::quant`), so the engine holds about the file's size; a Hugging Face
//! folder's are held in f32 (4 bytes a parameter). `engine = "auto"` picks this engine
//! only when that fits (see `fits_in_memory`).

use super::{
    top_k, AnswerLocator, Job, JobResult, Reply, RetryCounts, Settings, Teacher, Token, TokenChoice,
};
use crate::chat::ChatMessage;
use crate::llama::generate::{Finish, Generator, Hooks, Request, Sampling, Sequence};
use crate::llama::infer::log_softmax;
use crate::llama::{Decoder, LoadedModel};
use anyhow::{Context, Result};

pub struct EngineTeacher {
    id: String,
    loaded: LoadedModel,
    model: Decoder,
    /// Tokens that end a reply: end-of-sequence and the chat format's end-of-turn tokens.
    stop: Vec<u32>,
    parallel: usize,
}

/// Whether `model` is one this engine can serve (llama or qwen2, GGUF or Hugging Face
/// folder) and its weights, as the engine holds them, take at most half the memory now
/// available.
pub fn fits_in_memory(model: &str) -> bool {
    let Some(bytes) = crate::llama::inference_bytes(model) else {
        return false;
    };
    match available_memory_bytes() {
        Some(available) => bytes <= available / 2,
        None => false,
    }
}

fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl EngineTeacher {
    pub fn open(model: &str, parallel: usize) -> Result<Self> {
        let mut loaded = crate::llama::load_for_inference(model)
            .with_context(|| format!("cannot load teacher model {model}"))?;
        let decoder = loaded.take_inference_decoder()?;
        let stop = loaded.stop_tokens();
        Ok(EngineTeacher {
            id: model.to_string(),
            loaded,
            model: decoder,
            stop,
            parallel: parallel.max(1),
        })
    }

    /// Probability of each label (as " label") right after `before_answer`, the reply's
    /// text up to its answer. The cache keeps the generated tokens that spell a prefix of
    /// that text; the rest of it is tokenized and run, then every label's tokens.
    fn label_probs(
        &self,
        seq: &mut Sequence<Job>,
        before_answer: &str,
        labels: &[String],
    ) -> Result<Vec<f64>> {
        let mut kept = 0;
        let mut spelled_len = 0;
        for k in 1..=seq.generated.len() {
            let spelled = self.loaded.decode(&seq.generated[..k])?;
            if !before_answer.starts_with(&spelled) {
                break;
            }
            (kept, spelled_len) = (k, spelled.len());
        }
        let mut context: Vec<u32> = seq.generated[..kept].to_vec();
        context.extend(self.loaded.encode(&before_answer[spelled_len..])?);
        // Rerun from one token back (the prompt's last or the last kept generated token),
        // so the step yields the distribution after the context.
        let keep = seq.prompt_len + kept - 1;
        let rerun = if kept > 0 {
            seq.generated[kept - 1]
        } else {
            seq.prompt_last
        };
        seq.cache.truncate(keep);
        let mut feed = vec![rerun];
        feed.extend_from_slice(&context[kept..]);
        let after = self
            .model
            .forward_step(&mut [crate::llama::infer::StepInput {
                cache: &mut seq.cache,
                tokens: &feed,
                all_logits: false,
            }])?
            .pop()
            .context("no logits after the rationale")?;
        let labels: Vec<Vec<u32>> = labels
            .iter()
            .map(|l| self.loaded.encode(&format!(" {l}")))
            .collect::<Result<_>>()?;
        Ok(self
            .model
            .continuation_logprobs(&seq.cache, &after, &labels)?
            .into_iter()
            .map(f64::exp)
            .collect())
    }
}

/// What the engine does as a reply is generated: keep each token's top-k alternatives,
/// and once it is done, score the labels and hand the reply to the caller's sink.
struct ReplyHooks<'a> {
    teacher: &'a EngineTeacher,
    settings: &'a Settings,
    locate_answer: AnswerLocator<'a>,
    sink: &'a mut dyn FnMut(Job, JobResult) -> Result<()>,
    /// Per active sequence (by job key), the token choices so far.
    choices: std::collections::HashMap<(String, u32), Vec<TokenChoice>>,
}

fn key(job: &Job) -> (String, u32) {
    (job.id.clone(), job.sample)
}

impl Hooks<Job> for ReplyHooks<'_> {
    fn after_token(&mut self, seq: &Sequence<Job>, logits: &[f32]) -> Result<Vec<u32>> {
        if self.settings.token_topk > 0 {
            let token = *seq.generated.last().expect("a token was just chosen");
            let logprobs = log_softmax(logits);
            self.choices
                .entry(key(&seq.tag))
                .or_default()
                .push(TokenChoice {
                    token: Token::Id(token),
                    logprob: logprobs[token as usize],
                    top: top_k(&logprobs, self.settings.token_topk)
                        .into_iter()
                        .map(|(id, lp)| (Token::Id(id), lp))
                        .collect(),
                });
        }
        Ok(vec![])
    }

    fn finished(&mut self, mut seq: Sequence<Job>, finish: Finish) -> Result<()> {
        let row = format!("{:?}#{}", seq.tag.id, seq.tag.sample);
        let text = self.teacher.loaded.decode(&seq.generated)?;
        let mut reply = Reply {
            finish_reason: finish.as_str().to_string(),
            prompt_tokens: seq.prompt_len as u32,
            completion_tokens: seq.generated.len() as u32,
            seed: Some(seq.seed),
            prompt_seconds: seq.prompt_seconds,
            decode_seconds: seq.started.elapsed().as_secs_f64() - seq.prompt_seconds,
            tokens: self.choices.remove(&key(&seq.tag)).unwrap_or_default(),
            ..Reply::default()
        };
        if !self.settings.labels.is_empty() {
            if let Some(offset) = (self.locate_answer)(&text) {
                let probs = self
                    .teacher
                    .label_probs(&mut seq, &text[..offset], &self.settings.labels)
                    .with_context(|| format!("local teacher failed on input {row}"))?;
                reply.label_probs = Some(probs);
            }
        }
        reply.text = text;
        reply.latency_ms = seq.started.elapsed().as_secs_f64() * 1000.0;
        (self.sink)(seq.tag, Ok(reply))
    }

    fn rejected(&mut self, job: Job, message: String) -> Result<()> {
        (self.sink)(job, Err(message))
    }
}

impl Teacher for EngineTeacher {
    fn id(&self) -> &str {
        &self.id
    }

    fn backend(&self) -> &'static str {
        "local"
    }

    fn answer_all(
        &self,
        jobs: Vec<Job>,
        settings: &Settings,
        locate_answer: AnswerLocator,
        sink: &mut dyn FnMut(Job, JobResult) -> Result<()>,
    ) -> Result<RetryCounts> {
        tracing::info!(
            "local engine: key/value cache in {:?}, {:.1} KB a token; {} sequences at a time, each its prompt plus up to {} new tokens",
            self.model.kv_precision(),
            self.model.kv_bytes_per_token() as f64 / 1024.0,
            self.parallel,
            settings.max_tokens
        );
        let generator = Generator {
            model: &self.model,
            parallel: self.parallel,
            stop: self.stop.clone(),
            sampling: if settings.temperature > 0.0 {
                Sampling::Temperature(settings.temperature)
            } else {
                Sampling::Greedy
            },
        };
        let requests = jobs.into_iter().map(|job| {
            let row = format!("{:?}#{}", job.id, job.sample);
            let prompt = self
                .loaded
                .chat_ids(&job.messages)
                .with_context(|| format!("local teacher failed on input {row}"))?;
            // Jobs without a seed get one from their key, so reruns sample the same reply.
            let seed = job.seed.unwrap_or_else(|| {
                crate::io::atomic::seed_from_text(&format!("{}#{}", job.id, job.sample))
            });
            Ok(Request {
                tag: job,
                prompt,
                max_new: settings.max_tokens,
                seed,
            })
        });
        let mut hooks = ReplyHooks {
            teacher: self,
            settings,
            locate_answer,
            sink,
            choices: Default::default(),
        };
        generator.run(requests, &mut hooks)?;
        Ok(RetryCounts::new())
    }

    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Option<usize>> {
        Ok(Some(self.loaded.chat_ids(messages)?.len()))
    }
}
