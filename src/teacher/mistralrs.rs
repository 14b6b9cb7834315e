//! The local teacher: mistralrs 0.8.1 in this process, from a GGUF file or a Hugging
//! Face model directory. The only file that imports mistralrs.
//!
//! Requests go one at a time (mistralrs mixes up concurrent prompts on CPU, see
//! docs/STACK.md) through token-id completion requests, so kdpipe knows the exact prompt
//! tokens; the engine's prefix cache then reuses the few-shot prefix between rows.
//! Label scoring reads the full next-token distribution through a logits processor at
//! each distinct label prefix, one token generated per request.

use super::{
    top_k, AnswerLocator, Job, JobResult, Reply, RetryCounts, Settings, Teacher, TeacherError,
    Token, TokenChoice,
};
use crate::chat::ChatMessage;
use crate::llama::infer::log_softmax;
use anyhow::{bail, Context, Result};
use mistralrs::{
    Constraint, CustomLogitsProcessor, GgufModelBuilder, Model, NormalRequest, Request,
    RequestMessage, Response, SamplingParams, Tensor, TextMessageRole, TextMessages,
    TextModelBuilder,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct MistralrsTeacher {
    id: String,
    model: Arc<Model>,
    runtime: tokio::runtime::Runtime,
    /// Keep every decode step's distribution of the last reply (for label scoring).
    capture_steps: bool,
    last_reply: Mutex<Option<LastReply>>,
}

fn fatal(e: impl std::fmt::Display) -> TeacherError {
    TeacherError::Fatal(e.to_string())
}

impl MistralrsTeacher {
    /// Load a GGUF file, or a Hugging Face directory (config.json + safetensors +
    /// tokenizer.json), or a hub id (needs a network).
    /// `capture_steps`: keep each reply's per-step distributions, so scoring labels
    /// right after the reply's own rationale costs no recomputation.
    pub fn open(model: &str, capture_steps: bool) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let path = Path::new(model);
        let is_gguf = crate::llama::is_gguf(model);
        if is_gguf && !path.is_file() {
            bail!(
                "teacher model file {model} does not exist\nhint: run scripts/fetch-models.sh, or set [teacher] model to a GGUF file or model folder"
            );
        }
        let built = runtime.block_on(async {
            if is_gguf {
                let dir = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let file = path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                GgufModelBuilder::new(dir.display().to_string(), vec![file])
                    .with_prefix_cache_n(Some(4))
                    .with_max_num_seqs(1)
                    .build()
                    .await
            } else {
                TextModelBuilder::new(model)
                    .with_prefix_cache_n(Some(4))
                    .with_max_num_seqs(1)
                    .build()
                    .await
            }
        });
        let model_obj = built
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .with_context(|| format!("cannot load teacher model {model}"))?;
        Ok(MistralrsTeacher {
            id: model.to_string(),
            model: Arc::new(model_obj),
            runtime,
            capture_steps,
            last_reply: Mutex::new(None),
        })
    }

    /// Token ids of a chat, rendered by the engine's own template, ready for the reply.
    pub fn chat_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TeacherError> {
        let mut msgs = TextMessages::new();
        for m in messages {
            let role = match m.role.as_str() {
                "system" => TextMessageRole::System,
                "assistant" => TextMessageRole::Assistant,
                _ => TextMessageRole::User,
            };
            msgs = msgs.add_message(role, &m.content);
        }
        self.runtime
            .block_on(
                self.model
                    .tokenize(either::Either::Left(msgs), None, true, true, None),
            )
            .map_err(fatal)
    }

    /// Token ids of plain text, without special tokens, by the engine's tokenizer.
    pub fn text_ids(&self, text: &str) -> Result<Vec<u32>, TeacherError> {
        if text.is_empty() {
            return Ok(vec![]);
        }
        self.runtime
            .block_on(self.model.tokenize(
                either::Either::Right(text.to_string()),
                None,
                false,
                false,
                None,
            ))
            .map_err(fatal)
    }

    /// Send one token-id completion request and wait for it.
    fn complete(
        &self,
        ids: Vec<u32>,
        sampling: SamplingParams,
        processors: Option<Vec<Arc<dyn CustomLogitsProcessor>>>,
    ) -> Result<mistralrs::CompletionResponse, TeacherError> {
        self.runtime.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let request = Request::Normal(Box::new(NormalRequest {
                messages: RequestMessage::CompletionTokens(ids),
                sampling_params: sampling,
                response: tx,
                return_logprobs: false,
                is_streaming: false,
                id: 0,
                constraint: Constraint::None,
                suffix: None,
                tools: None,
                tool_choice: None,
                logits_processors: processors,
                return_raw_logits: false,
                web_search_options: None,
                model_id: None,
                truncate_sequence: false,
            }));
            let sender = self.model.inner().get_sender(None).map_err(fatal)?;
            sender
                .send(request)
                .await
                .map_err(|e| fatal(format!("engine stopped: {e}")))?;
            match rx.recv().await {
                Some(Response::CompletionDone(r)) => Ok(r),
                Some(Response::CompletionModelError(msg, _)) => Err(TeacherError::Retryable(msg)),
                Some(Response::ValidationError(e)) => Err(fatal(e)),
                Some(Response::InternalError(e)) => Err(TeacherError::Retryable(e.to_string())),
                Some(_) => Err(fatal("unexpected response kind from the engine")),
                None => Err(fatal("the engine closed the request channel")),
            }
        })
    }

    /// Natural-log next-token distribution after `context`, from one decode step.
    ///
    /// A context that a cached sequence already holds whole is recomputed from scratch
    /// (the prefix cache needs at least one new token); `score_continuations` avoids that
    /// case by reading the distributions captured while the reply was generated.
    pub fn next_token_logprobs(&self, context: Vec<u32>) -> Result<Vec<f32>, TeacherError> {
        let steps = StepCapture::new(1);
        let sampling = SamplingParams {
            max_len: Some(1),
            ..SamplingParams::deterministic()
        };
        self.complete(context, sampling, Some(vec![steps.processor()]))?;
        steps
            .take()
            .logprobs
            .into_iter()
            .next()
            .ok_or_else(|| fatal("the engine did not expose the next-token logits"))
    }
}

/// What the logits processor saw during one request: the next-token distribution at
/// each decode step (natural log), and the tokens generated before the latest step.
#[derive(Default)]
struct Steps {
    logprobs: Vec<Vec<f32>>,
    generated: Vec<u32>,
}

/// Records the full next-token distribution at each decode step of one request. The
/// context the engine passes may start after a prefix-cache hit, so a step is identified
/// by its index, not by the context length; its last k tokens are the k generated ones.
#[derive(Clone)]
struct StepCapture {
    steps: Arc<Mutex<Steps>>,
    limit: usize,
}

impl StepCapture {
    fn new(limit: usize) -> Self {
        StepCapture {
            steps: Arc::new(Mutex::new(Steps::default())),
            limit,
        }
    }

    fn processor(&self) -> Arc<dyn CustomLogitsProcessor> {
        let this = self.clone();
        Arc::new(
            move |logits: &Tensor, ctx: &[u32]| -> mistralrs::Result<Tensor> {
                if let Ok(mut steps) = this.steps.lock() {
                    let k = steps.logprobs.len();
                    if k < this.limit {
                        let v = logits
                            .to_dtype(mistralrs::DType::F32)?
                            .flatten_all()?
                            .to_vec1::<f32>()?;
                        steps.logprobs.push(log_softmax(&v));
                        steps.generated = ctx[ctx.len().saturating_sub(k)..].to_vec();
                    }
                }
                Ok(logits.clone())
            },
        )
    }

    fn take(&self) -> Steps {
        self.steps
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }
}

/// The last reply generated with step capture: its prompt and its captured steps. Label
/// scoring after the reply's own rationale reads these instead of recomputing the whole
/// prompt.
struct LastReply {
    prompt: Vec<u32>,
    steps: Steps,
}

impl LastReply {
    /// The captured distribution after `context`, if `context` is the prompt followed by
    /// the first k generated tokens.
    fn lookup(&self, context: &[u32]) -> Option<&[f32]> {
        let rest = context.strip_prefix(self.prompt.as_slice())?;
        let logprobs = self.steps.logprobs.get(rest.len())?;
        self.steps
            .generated
            .starts_with(rest)
            .then_some(logprobs.as_slice())
    }
}

impl MistralrsTeacher {
    /// Write a reply to the chat (one request).
    pub fn generate(
        &self,
        messages: &[ChatMessage],
        max_tokens: usize,
        temperature: f64,
    ) -> Result<Reply, TeacherError> {
        let ids = self.chat_ids(messages)?;
        let prompt_tokens = ids.len() as u32;
        let mut sampling = SamplingParams {
            max_len: Some(max_tokens),
            ..SamplingParams::deterministic()
        };
        if temperature > 0.0 {
            sampling.temperature = Some(temperature);
            sampling.top_k = None;
        }
        let capture = self.capture_steps.then(|| StepCapture::new(max_tokens));
        let processors = capture.as_ref().map(|c| vec![c.processor()]);
        let resp = self.complete(ids.clone(), sampling, processors)?;
        if let (Some(c), Ok(mut last)) = (capture, self.last_reply.lock()) {
            *last = Some(LastReply {
                prompt: ids,
                steps: c.take(),
            });
        }
        let choice = resp
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| TeacherError::Retryable("no choices in response".into()))?;
        Ok(Reply {
            text: choice.text,
            finish_reason: choice.finish_reason,
            prompt_tokens,
            completion_tokens: resp.usage.completion_tokens as u32,
            prompt_seconds: resp.usage.total_prompt_time_sec as f64,
            decode_seconds: resp.usage.total_completion_time_sec as f64,
            ..Reply::default()
        })
    }

    /// Natural-log probability of each continuation after the chat's assistant turn has
    /// begun with `assistant_prefix`: log p(continuation | chat, prefix), summed over its
    /// tokens.
    pub fn score_continuations(
        &self,
        messages: &[ChatMessage],
        assistant_prefix: &str,
        continuations: &[String],
    ) -> Result<Vec<f64>, TeacherError> {
        // The prefix as the engine would tokenize it; when it equals the prompt plus the
        // reply's first tokens (the usual case), the captured steps answer directly.
        let mut prefix = self.chat_ids(messages)?;
        prefix.extend(self.text_ids(assistant_prefix)?);
        let conts: Vec<Vec<u32>> = continuations
            .iter()
            .map(|c| self.text_ids(c))
            .collect::<Result<_, _>>()?;
        // One request per distinct context (the prefix plus a label's first j tokens):
        // labels sharing a first token share its request.
        let mut cache: HashMap<Vec<u32>, Vec<f32>> = HashMap::new();
        let mut scores = Vec::with_capacity(conts.len());
        for cont in &conts {
            if cont.is_empty() {
                return Err(fatal("a label tokenized to nothing"));
            }
            let mut total = 0f64;
            for j in 0..cont.len() {
                let mut ctx = prefix.clone();
                ctx.extend_from_slice(&cont[..j]);
                if !cache.contains_key(&ctx) {
                    let captured = self
                        .last_reply
                        .lock()
                        .ok()
                        .and_then(|last| last.as_ref()?.lookup(&ctx).map(<[f32]>::to_vec));
                    let lp = match captured {
                        Some(lp) => lp,
                        None => self.next_token_logprobs(ctx.clone())?,
                    };
                    cache.insert(ctx.clone(), lp);
                }
                let lp = &cache[&ctx];
                total += *lp
                    .get(cont[j] as usize)
                    .ok_or_else(|| fatal("token id outside the vocabulary"))?
                    as f64;
            }
            scores.push(total);
        }
        Ok(scores)
    }

    /// The top-k alternatives of each generated token of the last reply, from the captured
    /// distributions (our own log-softmax of the logits: natural logs, unlike mistralrs's
    /// base-10 `logprobs`). The final step, usually the end-of-turn token, is not known to
    /// the processor and is left out.
    fn last_reply_topk(&self, k: usize) -> Vec<TokenChoice> {
        let Ok(last) = self.last_reply.lock() else {
            return vec![];
        };
        let Some(last) = last.as_ref() else {
            return vec![];
        };
        let steps = &last.steps;
        steps
            .generated
            .iter()
            .zip(&steps.logprobs)
            .map(|(&chosen, dist)| TokenChoice {
                token: Token::Id(chosen),
                logprob: dist
                    .get(chosen as usize)
                    .copied()
                    .unwrap_or(f32::NEG_INFINITY),
                top: top_k(dist, k)
                    .into_iter()
                    .map(|(id, lp)| (Token::Id(id), lp))
                    .collect(),
            })
            .collect()
    }

    /// One job: the reply, its label probabilities and token alternatives.
    fn answer(
        &self,
        job: &Job,
        settings: &Settings,
        locate_answer: AnswerLocator,
    ) -> Result<Reply, TeacherError> {
        let started = Instant::now();
        let mut attempt = 0;
        let mut reply = loop {
            match self.generate(&job.messages, settings.max_tokens, settings.temperature) {
                Err(TeacherError::Retryable(e)) if attempt < 2 => {
                    attempt += 1;
                    tracing::warn!("retrying {}#{} after: {e}", job.id, job.sample);
                }
                other => break other?,
            }
        };
        if !settings.labels.is_empty() {
            if let Some(offset) = locate_answer(&reply.text) {
                let conts: Vec<String> = settings.labels.iter().map(|l| format!(" {l}")).collect();
                let logprobs =
                    self.score_continuations(&job.messages, &reply.text[..offset], &conts)?;
                reply.label_probs = Some(logprobs.iter().map(|l| l.exp()).collect());
            }
        }
        if settings.token_topk > 0 {
            reply.tokens = self.last_reply_topk(settings.token_topk);
        }
        reply.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(reply)
    }
}

impl Teacher for MistralrsTeacher {
    fn id(&self) -> &str {
        &self.id
    }

    fn backend(&self) -> &'static str {
        "local"
    }

    /// One job at a time: mistralrs mixes up concurrent prompts on CPU (docs/STACK.md).
    fn answer_all(
        &self,
        jobs: Vec<Job>,
        settings: &Settings,
        locate_answer: AnswerLocator,
        sink: &mut dyn FnMut(Job, JobResult) -> Result<()>,
    ) -> Result<RetryCounts> {
        for mut job in jobs {
            // mistralrs has one engine-wide sampler and takes no request seed: the row
            // must not claim one.
            job.seed = None;
            let result = match self.answer(&job, settings, locate_answer) {
                Ok(reply) => Ok(reply),
                Err(TeacherError::Row(m)) => Err(m),
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("local teacher failed on input id {:?}", job.id)))
                }
            };
            sink(job, result)?;
        }
        Ok(RetryCounts::new())
    }

    fn count_prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Option<usize>> {
        Ok(Some(self.chat_ids(messages)?.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_steps_answer_only_contexts_on_the_generated_path() {
        // Three steps; the reply's first two tokens were 7 and 8.
        let last = LastReply {
            prompt: vec![1, 2],
            steps: Steps {
                logprobs: vec![vec![0.1], vec![0.2], vec![0.3]],
                generated: vec![7, 8],
            },
        };
        assert_eq!(last.lookup(&[1, 2]), Some(&[0.1f32][..]));
        assert_eq!(last.lookup(&[1, 2, 7, 8]), Some(&[0.3f32][..]));
        assert_eq!(last.lookup(&[1, 2, 9]), None, "off the generated path");
        assert_eq!(last.lookup(&[1, 3]), None, "another prompt");
        assert_eq!(
            last.lookup(&[1, 2, 7, 8, 9]),
            None,
            "past the captured steps"
        );
    }

    #[test]
    fn top_k_is_sorted_largest_first() {
        assert_eq!(top_k(&[0.1, 0.5, 0.3, 0.9], 2), vec![(3, 0.9), (1, 0.5)]);
        assert_eq!(top_k(&[0.1], 5), vec![(0, 0.1)]);
    }
}
