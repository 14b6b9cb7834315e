//! The batched local teacher: kdpipe's own decoder (the student's, in f32) serving a
//! llama-family GGUF or Hugging Face model, many sequences at a time.
//!
//! mistralrs decodes one request at a time on CPU (it mixes up concurrent prompts, see
//! STACK-NOTES), so every token reads all weights once and speed is bound by memory. Here up
//! to `[teacher] batch` sequences advance together (continuous batching: a finished
//! sequence's slot goes to the next job at once), which turns those reads into matrix
//! products. The few-shot prefix shared by consecutive prompts is computed once and copied.
//! Weights are dequantized to f32, so this engine needs about 4 bytes a parameter of memory;
//! `engine = "auto"` picks it only when that fits (see `fits_in_memory`).

use super::{
    log_softmax, top_k, AnswerLocator, ChatMessage, Job, JobResult, Reply, RetryCounts, Settings,
    Teacher, Token, TokenChoice,
};
use crate::student::serve::{SeqCache, StepInput};
use crate::student::{Decoder, LoadedModel};
use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::time::Instant;

pub struct BatchedTeacher {
    id: String,
    loaded: LoadedModel,
    model: Decoder,
    /// Tokens that end a reply: end-of-sequence and the chat format's end-of-turn tokens.
    stop: Vec<u32>,
    batch: usize,
}

/// End-of-turn tokens of the chat formats kdpipe's decoder serves, stopped on when present.
const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"];

/// Whether `model` is one this engine can serve (llama or qwen2, GGUF or Hugging Face
/// folder) and its f32 weights take at most half the memory now available.
pub fn fits_in_memory(model: &str) -> bool {
    let Some(params) = supported_params(model) else {
        return false;
    };
    match available_memory_bytes() {
        Some(available) => params.saturating_mul(4) <= available / 2,
        None => false,
    }
}

/// Parameters of a supported model, from its header (no weights read).
fn supported_params(model: &str) -> Option<u64> {
    let path = Path::new(model);
    if model.to_ascii_lowercase().ends_with(".gguf") {
        let mut file = std::fs::File::open(path).ok()?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).ok()?;
        let arch = crate::student::tokenizer::meta_str(&content, "general.architecture").ok()?;
        (arch == "llama" || arch == "qwen2").then(|| {
            content
                .tensor_infos
                .values()
                .map(|t| t.shape.elem_count() as u64)
                .sum()
        })
    } else if path.join("config.json").is_file() {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).ok()?).ok()?;
        let kind = config.get("model_type")?.as_str()?;
        let weights: u64 = std::fs::read_dir(path)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| e.metadata().ok().map(|m| m.len()))
            .sum();
        // Safetensors hold 2 (bf16/f16) or 4 (f32) bytes a parameter: count 2, the worse case.
        (kind == "llama" || kind == "qwen2").then_some(weights / 2)
    } else {
        None
    }
}

fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A sequence being generated.
struct Active {
    job: Job,
    cache: SeqCache,
    prompt_len: usize,
    /// The prompt's last token, rerun when labels are scored right after the prompt.
    prompt_last: u32,
    generated: Vec<u32>,
    choices: Vec<TokenChoice>,
    /// Next-token logits after everything in `cache`.
    logits: Vec<f32>,
    rng: ChaCha8Rng,
    seed: u64,
    started: Instant,
    prompt_seconds: f64,
}

/// The last prompt prefilled, kept so the next prompt reuses the prefix they share.
struct PrefixCache {
    ids: Vec<u32>,
    cache: SeqCache,
}

impl BatchedTeacher {
    pub fn open(model: &str, batch: usize) -> Result<Self> {
        let mut loaded = crate::student::load(model, &candle_core::Device::Cpu)
            .with_context(|| format!("cannot load teacher model {model}"))?;
        let decoder = loaded.decoder(&candle_core::Device::Cpu, |_| false)?;
        // Keep only the tokenizer and template here, so each weight is freed as soon as
        // its transposed copy exists (peak: the weights plus one layer's copy).
        loaded.weights.clear();
        let decoder = decoder.into_inference()?;
        let mut stop = vec![loaded.eos_token_id];
        stop.extend(
            END_OF_TURN
                .iter()
                .filter_map(|t| loaded.tokenizer.token_to_id(t)),
        );
        Ok(BatchedTeacher {
            id: model.to_string(),
            loaded,
            model: decoder,
            stop,
            batch: batch.max(1),
        })
    }

    fn chat_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.loaded.chat.render(messages, true)?;
        self.loaded.encode(&text)
    }

    /// Prefill a job's prompt, reusing the prefix it shares with the previous prompt.
    /// `Err(message)` fails only this row (a prompt longer than the context).
    fn start(
        &self,
        job: Job,
        settings: &Settings,
        prefix: &mut Option<PrefixCache>,
    ) -> Result<std::result::Result<Active, (Job, String)>> {
        let started = Instant::now();
        let ids = self.chat_ids(&job.messages)?;
        let context = self.model.context_len();
        if ids.is_empty() {
            return Ok(Err((job, "the prompt rendered to no tokens".to_string())));
        }
        if ids.len() >= context {
            let msg = format!(
                "the prompt has {} tokens; the teacher's context holds {context}",
                ids.len()
            );
            return Ok(Err((job, msg)));
        }
        let room = ids.len() + settings.max_tokens;
        let (mut cache, reused) = match prefix.as_ref() {
            Some(p) => {
                let shared = p.ids.iter().zip(&ids).take_while(|(a, b)| a == b).count();
                // At least one token must run, for the next-token logits.
                let reused = shared.min(ids.len() - 1);
                (p.cache.prefix(reused, room - reused), reused)
            }
            None => (SeqCache::new(&self.model, room), 0),
        };
        let logits = self
            .model
            .forward_step(&mut [StepInput {
                cache: &mut cache,
                tokens: &ids[reused..],
                all_logits: false,
            }])?
            .pop()
            .context("no logits for the prompt")?;
        *prefix = Some(PrefixCache {
            ids: ids.clone(),
            cache: cache.prefix(ids.len(), 0),
        });
        // Jobs without a seed get one from their key, so reruns sample the same reply.
        let seed = job.seed.unwrap_or_else(|| {
            let key = crate::io::atomic::text_sha256(&format!("{}#{}", job.id, job.sample));
            u64::from_str_radix(&key[..15], 16).unwrap_or(0)
        });
        Ok(Ok(Active {
            job,
            prompt_len: ids.len(),
            prompt_last: ids[ids.len() - 1],
            cache,
            generated: Vec::new(),
            choices: Vec::new(),
            logits,
            rng: ChaCha8Rng::seed_from_u64(seed),
            seed,
            started,
            prompt_seconds: started.elapsed().as_secs_f64(),
        }))
    }

    /// Choose the next token of `a` from its logits; true when the reply is complete.
    fn choose(&self, a: &mut Active, settings: &Settings) -> (bool, &'static str) {
        let token = if settings.temperature > 0.0 {
            sample(&a.logits, settings.temperature, &mut a.rng)
        } else {
            argmax(&a.logits)
        };
        if self.stop.contains(&token) {
            return (true, "stop");
        }
        if settings.token_topk > 0 {
            let logprobs = log_softmax(&a.logits);
            a.choices.push(TokenChoice {
                token: Token::Id(token),
                logprob: logprobs[token as usize],
                top: top_k(&logprobs, settings.token_topk)
                    .into_iter()
                    .map(|(id, lp)| (Token::Id(id), lp))
                    .collect(),
            });
        }
        a.generated.push(token);
        let full = a.generated.len() >= settings.max_tokens
            || a.cache.len() + 1 >= self.model.context_len();
        (full, "length")
    }

    /// The reply of a finished sequence, with its label probabilities.
    fn finish(
        &self,
        mut a: Active,
        finish_reason: &str,
        settings: &Settings,
        locate_answer: AnswerLocator,
    ) -> Result<(Job, JobResult)> {
        let text = self.loaded.decode(&a.generated)?;
        let mut reply = Reply {
            finish_reason: finish_reason.to_string(),
            prompt_tokens: a.prompt_len as u32,
            completion_tokens: a.generated.len() as u32,
            seed: Some(a.seed),
            prompt_seconds: a.prompt_seconds,
            decode_seconds: a.started.elapsed().as_secs_f64() - a.prompt_seconds,
            tokens: std::mem::take(&mut a.choices),
            ..Reply::default()
        };
        if !settings.labels.is_empty() {
            if let Some(offset) = locate_answer(&text) {
                reply.label_probs = Some(self.label_probs(&mut a, &text[..offset], settings)?);
            }
        }
        reply.text = text;
        reply.latency_ms = a.started.elapsed().as_secs_f64() * 1000.0;
        Ok((a.job, Ok(reply)))
    }

    /// Probability of each label (as " label") right after `before_answer`, the reply's
    /// text up to its answer. The cache keeps the generated tokens that spell a prefix of
    /// that text; the rest of it is tokenized and run, then every label's tokens.
    fn label_probs(
        &self,
        a: &mut Active,
        before_answer: &str,
        settings: &Settings,
    ) -> Result<Vec<f64>> {
        let mut kept = 0;
        let mut spelled_len = 0;
        for k in 1..=a.generated.len() {
            let spelled = self.loaded.decode(&a.generated[..k])?;
            if !before_answer.starts_with(&spelled) {
                break;
            }
            (kept, spelled_len) = (k, spelled.len());
        }
        let mut context: Vec<u32> = a.generated[..kept].to_vec();
        context.extend(self.loaded.encode(&before_answer[spelled_len..])?);
        // Rerun from one token back (the prompt's last or the last kept generated token),
        // so the step yields the distribution after the context.
        let keep = a.prompt_len + kept - 1;
        let rerun = if kept > 0 {
            a.generated[kept - 1]
        } else {
            a.prompt_last
        };
        a.cache.truncate(keep);
        let mut feed = vec![rerun];
        feed.extend_from_slice(&context[kept..]);
        let after = self
            .model
            .forward_step(&mut [StepInput {
                cache: &mut a.cache,
                tokens: &feed,
                all_logits: false,
            }])?
            .pop()
            .context("no logits after the rationale")?;
        let first = log_softmax(&after);
        let labels: Vec<Vec<u32>> = settings
            .labels
            .iter()
            .map(|l| self.loaded.encode(&format!(" {l}")))
            .collect::<Result<_>>()?;
        // Labels of two or more tokens run their tokens but the last, together.
        let mut caches: Vec<SeqCache> = labels
            .iter()
            .filter(|ids| ids.len() > 1)
            .map(|ids| a.cache.prefix(a.cache.len(), ids.len()))
            .collect();
        let mut inputs: Vec<StepInput> = caches
            .iter_mut()
            .zip(labels.iter().filter(|ids| ids.len() > 1))
            .map(|(cache, ids)| StepInput {
                cache,
                tokens: &ids[..ids.len() - 1],
                all_logits: true,
            })
            .collect();
        let mut rest = if inputs.is_empty() {
            Vec::new()
        } else {
            self.model.forward_step(&mut inputs)?
        }
        .into_iter();
        let vocab = self.model.shape.vocab_size;
        let mut probs = Vec::with_capacity(labels.len());
        for ids in &labels {
            anyhow::ensure!(!ids.is_empty(), "a label tokenized to nothing");
            let mut logprob = first[ids[0] as usize] as f64;
            if ids.len() > 1 {
                let rows = rest.next().context("missing label logits")?;
                for (j, &id) in ids[1..].iter().enumerate() {
                    let row = log_softmax(&rows[j * vocab..(j + 1) * vocab]);
                    logprob += row[id as usize] as f64;
                }
            }
            probs.push(logprob.exp());
        }
        Ok(probs)
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0 as u32
}

/// A token drawn from softmax(logits / temperature).
fn sample(logits: &[f32], temperature: f64, rng: &mut ChaCha8Rng) -> u32 {
    let t = temperature as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = logits.iter().map(|x| ((x - max) / t).exp()).collect();
    let total: f32 = weights.iter().sum();
    let mut draw = rng.random_range(0.0..total);
    for (i, w) in weights.iter().enumerate() {
        if draw < *w {
            return i as u32;
        }
        draw -= w;
    }
    argmax(logits)
}

impl Teacher for BatchedTeacher {
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
        let mut pending = jobs.into_iter();
        let mut active: Vec<Active> = Vec::new();
        let mut prefix = None;
        loop {
            while active.len() < self.batch {
                let Some(job) = pending.next() else { break };
                let key = format!("{:?}#{}", job.id, job.sample);
                match self
                    .start(job, settings, &mut prefix)
                    .with_context(|| format!("local teacher failed on input {key}"))?
                {
                    Ok(a) => active.push(a),
                    Err((job, msg)) => sink(job, Err(msg))?,
                }
            }
            if active.is_empty() {
                return Ok(RetryCounts::new());
            }
            let mut running = Vec::with_capacity(active.len());
            for mut a in active.drain(..) {
                match self.choose(&mut a, settings) {
                    (false, _) => running.push(a),
                    (true, reason) => {
                        let key = format!("{:?}#{}", a.job.id, a.job.sample);
                        let (job, result) = self
                            .finish(a, reason, settings, locate_answer)
                            .with_context(|| format!("local teacher failed on input {key}"))?;
                        sink(job, result)?;
                    }
                }
            }
            if !running.is_empty() {
                let last: Vec<u32> = running
                    .iter()
                    .map(|a| a.generated.last().copied().unwrap_or(0))
                    .collect();
                let mut inputs: Vec<StepInput> = running
                    .iter_mut()
                    .zip(&last)
                    .map(|(a, t)| StepInput {
                        cache: &mut a.cache,
                        tokens: std::slice::from_ref(t),
                        all_logits: false,
                    })
                    .collect();
                let logits = self.model.forward_step(&mut inputs)?;
                for (a, l) in running.iter_mut().zip(logits) {
                    a.logits = l;
                }
            }
            active = running;
        }
    }

    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Option<usize>> {
        Ok(Some(self.chat_ids(messages)?.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_the_temperature() {
        let logits = [0.0f32, 2.0, 1.0];
        assert_eq!(argmax(&logits), 1);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[sample(&logits, 1.0, &mut rng) as usize] += 1;
        }
        // softmax(0, 2, 1) = 0.090, 0.665, 0.245
        assert!(
            (counts[1] as f64 / 3000.0 - 0.665).abs() < 0.03,
            "{counts:?}"
        );
        assert!(
            (counts[0] as f64 / 3000.0 - 0.090).abs() < 0.02,
            "{counts:?}"
        );
        let mut cold = [0usize; 3];
        for _ in 0..1000 {
            cold[sample(&logits, 0.05, &mut rng) as usize] += 1;
        }
        assert_eq!(cold[1], 1000, "a low temperature is nearly greedy");
    }
}
