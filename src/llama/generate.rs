//! Generation with continuous batching: up to `parallel` sequences decode together, each
//! one step at a time through `forward_step`; a finished sequence's slot goes to the next
//! request at once. Consecutive prompts that share a prefix (a few-shot prompt) compute it
//! once: each prefill starts from a copy of the previous prompt's cache.
//!
//! What a caller does with the tokens (keep top-k alternatives, write a calculator's
//! result into the text, score labels once a reply is done) goes in its `Hooks`; the
//! loop itself only chooses tokens and decides when a sequence ends. The teacher engine,
//! eval and `Decoder::greedy` all run this loop.

use super::infer::{PromptCache, SeqCache, StepInput};
use super::Decoder;
use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// A token drawn from softmax(logits / temperature), from the sequence's own seeded
    /// generator (so a sequence's reply does not depend on the others of its batch).
    Temperature(f64),
}

/// One sequence to generate.
pub struct Request<T> {
    /// The caller's key for this sequence (a row, an index).
    pub tag: T,
    pub prompt: Vec<u32>,
    pub max_new: usize,
    /// Seed of this sequence's sampling generator (unused when greedy).
    pub seed: u64,
}

/// A sequence being generated, as hooks see it.
pub struct Sequence<T> {
    pub tag: T,
    /// Keys and values of the prompt and of every generated token run so far.
    pub cache: SeqCache,
    pub prompt_len: usize,
    /// The prompt's last token, rerun when a caller rescores right after the prompt.
    pub prompt_last: u32,
    /// Tokens written after the prompt: chosen ones and any a hook inserted.
    pub generated: Vec<u32>,
    /// The stop token that ended it (`Finish::Stop`); not part of `generated`.
    pub stop_token: Option<u32>,
    pub seed: u64,
    /// When its prefill began, and how long the prefill took.
    pub started: Instant,
    pub prompt_seconds: f64,
    /// Next-token logits after everything in `cache` (empty once the token is chosen).
    logits: Vec<f32>,
    /// Tokens to run at the next step (the last chosen one and any inserted after it).
    feed: Vec<u32>,
    max_new: usize,
    rng: ChaCha8Rng,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token came (it is not part of `generated`).
    Stop,
    /// `max_new` tokens, or the model's context, reached.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

pub trait Hooks<T> {
    /// The token just appended to `seq.generated` was chosen from `logits`; returns tokens
    /// to write after it (the model reads them next, they count towards `max_new`; when
    /// they do not all fit, the sequence ends there, at its length limit).
    fn after_token(&mut self, _seq: &Sequence<T>, _logits: &[f32]) -> Result<Vec<u32>> {
        Ok(vec![])
    }

    /// A sequence ended; its cache is still whole (for rescoring). An error stops the run.
    fn finished(&mut self, seq: Sequence<T>, finish: Finish) -> Result<()>;

    /// A request that cannot run (an empty prompt, or one longer than the context).
    fn rejected(&mut self, tag: T, message: String) -> Result<()>;
}

pub struct Generator<'m> {
    pub model: &'m Decoder,
    /// Sequences decoded together.
    pub parallel: usize,
    /// Tokens that end a sequence (end-of-sequence, end-of-turn).
    pub stop: Vec<u32>,
    pub sampling: Sampling,
}

impl Generator<'_> {
    /// Generate every request, calling `hooks` as tokens come and sequences end (in the
    /// order they end). `requests` is read as slots free up; an `Err` from it stops the run.
    pub fn run<T>(
        &self,
        requests: impl IntoIterator<Item = Result<Request<T>>>,
        hooks: &mut impl Hooks<T>,
    ) -> Result<()> {
        let mut pending = requests.into_iter();
        let mut active: Vec<Sequence<T>> = Vec::new();
        let mut prefix = PromptCache::default();
        loop {
            while active.len() < self.parallel.max(1) {
                let Some(request) = pending.next() else { break };
                match self.start(request?, &mut prefix)? {
                    Ok(seq) => active.push(seq),
                    Err((tag, message)) => hooks.rejected(tag, message)?,
                }
            }
            if active.is_empty() {
                return Ok(());
            }
            let mut running = Vec::with_capacity(active.len());
            for mut seq in active.drain(..) {
                match self.advance(&mut seq, hooks)? {
                    None => running.push(seq),
                    Some(finish) => hooks.finished(seq, finish)?,
                }
            }
            if !running.is_empty() {
                let mut inputs: Vec<StepInput> = running
                    .iter_mut()
                    .map(|s| StepInput {
                        cache: &mut s.cache,
                        tokens: &s.feed,
                        all_logits: false,
                    })
                    .collect();
                let logits = self.model.forward_step(&mut inputs)?;
                for (s, l) in running.iter_mut().zip(logits) {
                    s.logits = l;
                }
            }
            active = running;
        }
    }

    /// Prefill a request's prompt, reusing the prefix it shares with the previous prompt.
    /// `Err((tag, message))` rejects only this request.
    fn start<T>(
        &self,
        request: Request<T>,
        prefix: &mut PromptCache,
    ) -> Result<std::result::Result<Sequence<T>, (T, String)>> {
        let started = Instant::now();
        let Request {
            tag,
            prompt,
            max_new,
            seed,
        } = request;
        let context = self.model.context_len();
        if prompt.is_empty() {
            return Ok(Err((tag, "the prompt rendered to no tokens".to_string())));
        }
        if prompt.len() >= context {
            let msg = format!(
                "the prompt has {} tokens; the model's context holds {context}",
                prompt.len()
            );
            return Ok(Err((tag, msg)));
        }
        let (mut cache, reused) = prefix.start(self.model, &prompt, prompt.len() + max_new);
        let logits = self
            .model
            .forward_step(&mut [StepInput {
                cache: &mut cache,
                tokens: &prompt[reused..],
                all_logits: false,
            }])?
            .pop()
            .context("no logits for the prompt")?;
        prefix.keep(&prompt, &cache);
        Ok(Ok(Sequence {
            tag,
            prompt_len: prompt.len(),
            prompt_last: prompt[prompt.len() - 1],
            cache,
            generated: Vec::new(),
            stop_token: None,
            seed,
            started,
            prompt_seconds: started.elapsed().as_secs_f64(),
            logits,
            feed: Vec::new(),
            max_new,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }))
    }

    /// Choose `seq`'s next token and let the hooks see it; `Some` when the sequence ends.
    fn advance<T>(
        &self,
        seq: &mut Sequence<T>,
        hooks: &mut impl Hooks<T>,
    ) -> Result<Option<Finish>> {
        let token = match self.sampling {
            Sampling::Temperature(t) if t > 0.0 => sample(&seq.logits, t, &mut seq.rng),
            _ => argmax(&seq.logits),
        };
        if self.stop.contains(&token) {
            seq.stop_token = Some(token);
            return Ok(Some(Finish::Stop));
        }
        seq.generated.push(token);
        let inserted = hooks.after_token(seq, &seq.logits)?;
        // Read for the last time: freed before the next step computes the batch's new
        // logits (32 × vocab floats, 19 MB for Qwen2), not held beside them.
        seq.logits = Vec::new();
        seq.feed.clear();
        seq.feed.push(token);
        // An insertion is written whole, or the reply ends at the token limit: the
        // calculator's ` 19.5` cut to ` 19`, or left for the model to write, would read as
        // the model's own value.
        if inserted.len() > seq.max_new.saturating_sub(seq.generated.len()) {
            return Ok(Some(Finish::Length));
        }
        seq.feed.extend(&inserted);
        seq.generated.extend(&inserted);
        let full = seq.generated.len() >= seq.max_new
            || seq.cache.len() + seq.feed.len() >= self.model.context_len();
        Ok(full.then_some(Finish::Length))
    }
}

impl Decoder {
    /// Greedy decoding of one prompt, up to `max_new` tokens or a `stop` token.
    pub fn greedy(&self, prompt: &[u32], max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
        struct Collect(Option<Vec<u32>>);
        impl Hooks<()> for Collect {
            fn finished(&mut self, seq: Sequence<()>, _: Finish) -> Result<()> {
                self.0 = Some(seq.generated);
                Ok(())
            }
            fn rejected(&mut self, _: (), message: String) -> Result<()> {
                anyhow::bail!("{message}")
            }
        }
        let generator = Generator {
            model: self,
            parallel: 1,
            stop: stop.to_vec(),
            sampling: Sampling::Greedy,
        };
        let mut out = Collect(None);
        let request = Request {
            tag: (),
            prompt: prompt.to_vec(),
            max_new,
            seed: 0,
        };
        generator.run([Ok(request)], &mut out)?;
        out.0.context("the sequence did not finish")
    }
}

pub fn argmax(v: &[f32]) -> u32 {
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
