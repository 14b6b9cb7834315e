//! The teacher's view of token sequences it did not write: at every position of a given
//! continuation, its natural-log probability of the token there and its top-k
//! alternatives. This is what token-level on-policy distillation asks of a teacher for
//! the student's own samples (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024).

use super::openai::ApiTeacher;
use super::top_k;
use crate::llama::infer::{log_softmax, PromptCache, SeqCache, StepInput};
use crate::llama::Decoder;
use anyhow::{ensure, Result};
use rayon::prelude::*;
use std::sync::Mutex;

/// A sequence to score: the teacher's distribution is read before each token of
/// `continuation`, given `prompt` and the continuation's tokens before it.
#[derive(Debug, Clone, Copy)]
pub struct ScoreRequest<'a> {
    pub prompt: &'a [u32],
    pub continuation: &'a [u32],
}

/// The teacher at one position of a continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionScore {
    /// Natural-log probability of the continuation's token at this position.
    pub logprob: f32,
    /// The k most probable ids with their natural-log probabilities, largest first (k at
    /// least the vocabulary: the whole distribution).
    pub top: Vec<(u32, f32)>,
}

/// A teacher that scores given sequences: kdpipe's engine in this process, or an
/// OpenAI-compatible server.
pub enum Scorer {
    /// The inference decoder (a GGUF's weights quantized as stored).
    Local(Box<LocalScorer>),
    /// `/v1/completions` with echo + logprobs (`ApiTeacher::score`).
    Api(Box<ApiScorer>),
}

pub struct LocalScorer {
    pub decoder: Decoder,
    /// The last prompt scored, kept from one call to the next: a training run scores
    /// rows under one few-shot prompt step after step, and its head is computed once.
    previous: Mutex<PromptCache>,
}

pub struct ApiScorer {
    api: ApiTeacher,
    /// The tokenizer teacher and student share: sequences as text where the server takes
    /// text only, and the API's alternatives back to ids.
    tokenizer: tokenizers::Tokenizer,
    texts: TokenTexts,
}

impl Scorer {
    pub fn local(decoder: Decoder) -> Scorer {
        Scorer::Local(Box::new(LocalScorer {
            decoder,
            previous: Mutex::new(PromptCache::default()),
        }))
    }

    /// A server's scores, its tokens read back to ids with `tokenizer`.
    pub fn api(api: ApiTeacher, tokenizer: &tokenizers::Tokenizer) -> Result<Scorer> {
        Ok(Scorer::Api(Box::new(ApiScorer {
            api,
            texts: TokenTexts::new(tokenizer)?,
            tokenizer: tokenizer.clone(),
        })))
    }

    /// Per request, the teacher's log-probability and top-`top` at each continuation token.
    pub fn score(&self, requests: &[ScoreRequest], top: usize) -> Result<Vec<Vec<PositionScore>>> {
        match self {
            Scorer::Local(l) => {
                // A poisoned lock only means an earlier call failed midway: start afresh.
                let mut previous = l.previous.lock().unwrap_or_else(|e| e.into_inner());
                let scores =
                    score_local_from(&l.decoder, requests, top, ROWS_PER_STEP, &mut previous);
                if scores.is_err() {
                    *previous = PromptCache::default();
                }
                scores
            }
            Scorer::Api(a) => a.api.score(requests, top, &a.tokenizer, &a.texts),
        }
    }
}

/// Rows (positions) run through the model in one step: each keeps a row of logits over
/// the vocabulary until it is scored (600 KB for Qwen2's 152k ids), so this bounds the
/// memory a step takes.
pub const ROWS_PER_STEP: usize = 256;

/// Score every request on the local decoder: per request, one `PositionScore` per
/// continuation token. Requests with the same prompt (several samples of one prompt)
/// compute it once, and a prompt starts from the previous one's cache where they share
/// a head (a few-shot prompt); continuations then run together, `rows_per_step` positions a step,
/// each on its own copy of the prompt's cache. A position's scores do not depend on which
/// other rows share its step (the decoder's rows are batch-invariant).
pub fn score_local(
    decoder: &Decoder,
    requests: &[ScoreRequest],
    top: usize,
    rows_per_step: usize,
) -> Result<Vec<Vec<PositionScore>>> {
    let mut previous = PromptCache::default();
    score_local_from(decoder, requests, top, rows_per_step, &mut previous)
}

/// `score_local`, the first prompt starting from `previous` (the last prompt of an
/// earlier call) where they share a head; `previous` ends as this call's last prompt.
pub fn score_local_from(
    decoder: &Decoder,
    requests: &[ScoreRequest],
    top: usize,
    rows_per_step: usize,
    previous: &mut PromptCache,
) -> Result<Vec<Vec<PositionScore>>> {
    ensure!(rows_per_step > 0, "rows_per_step must be at least 1");
    let vocab = decoder.shape.vocab_size;
    for (i, r) in requests.iter().enumerate() {
        if let Some(&bad) = r
            .prompt
            .iter()
            .chain(r.continuation)
            .find(|&&t| t as usize >= vocab)
        {
            anyhow::bail!("sequence {i} to score has token id {bad}, past the teacher's vocabulary of {vocab}: teacher and student must share a tokenizer");
        }
    }
    let mut out: Vec<Vec<PositionScore>> = vec![Vec::new(); requests.len()];
    for (prompt, members) in by_prompt(requests) {
        ensure!(
            !prompt.is_empty(),
            "a scored sequence needs at least one prompt token (the chat template's first)"
        );
        let longest = members
            .iter()
            .map(|&i| requests[i].continuation.len())
            .max()
            .unwrap_or(0);
        let (mut base, reused) = previous.start(decoder, prompt, prompt.len() + longest);
        let next = decoder.forward_step(&mut [StepInput {
            cache: &mut base,
            tokens: &prompt[reused..],
            all_logits: false,
        }])?;
        previous.keep(prompt, &base);
        let first = log_softmax(&next[0]);
        for &i in &members {
            if let Some(&token) = requests[i].continuation.first() {
                out[i].push(score_row(&first, token, top));
            }
        }
        // The rest of each continuation: its tokens but the last, run on a copy of the
        // prompt's cache; the logits after token j score token j + 1.
        let mut caches: Vec<SeqCache> = members
            .iter()
            .map(|&i| base.prefix(base.len(), requests[i].continuation.len()))
            .collect();
        let inputs_of = |i: usize| {
            let c = requests[i].continuation;
            &c[..c.len().saturating_sub(1)]
        };
        let mut done = vec![0usize; members.len()];
        loop {
            // This step: the next chunk of each unfinished continuation, in member order,
            // until the row budget is spent.
            let mut budget = rows_per_step;
            let mut chunks: Vec<(usize, usize)> = Vec::new(); // (member, rows)
            for (m, &i) in members.iter().enumerate() {
                let left = inputs_of(i).len() - done[m];
                if left > 0 && budget > 0 {
                    let rows = left.min(budget);
                    chunks.push((m, rows));
                    budget -= rows;
                }
            }
            if chunks.is_empty() {
                break;
            }
            let mut inputs: Vec<StepInput> = Vec::with_capacity(chunks.len());
            let mut pending = chunks.iter().peekable();
            for (m, cache) in caches.iter_mut().enumerate() {
                if let Some(&&(at, rows)) = pending.peek() {
                    if at == m {
                        let tokens = &inputs_of(members[m])[done[m]..done[m] + rows];
                        inputs.push(StepInput {
                            cache,
                            tokens,
                            all_logits: true,
                        });
                        pending.next();
                    }
                }
            }
            let logits = decoder.forward_step(&mut inputs)?;
            drop(inputs);
            for ((m, rows), logits) in chunks.into_iter().zip(logits) {
                let i = members[m];
                let targets = &requests[i].continuation[done[m] + 1..done[m] + 1 + rows];
                let scored: Vec<PositionScore> = logits
                    .par_chunks(vocab)
                    .zip(targets)
                    .map(|(row, &token)| score_row(&log_softmax(row), token, top))
                    .collect();
                out[i].extend(scored);
                done[m] += rows;
            }
        }
    }
    Ok(out)
}

/// Request indices grouped by prompt, groups in order of first appearance.
fn by_prompt<'a>(requests: &[ScoreRequest<'a>]) -> Vec<(&'a [u32], Vec<usize>)> {
    let mut groups: Vec<(&[u32], Vec<usize>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for (i, r) in requests.iter().enumerate() {
        let g = *index.entry(r.prompt).or_insert_with(|| {
            groups.push((r.prompt, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
    }
    groups
}

fn score_row(logprobs: &[f32], token: u32, k: usize) -> PositionScore {
    PositionScore {
        logprob: logprobs[token as usize],
        top: top_k(logprobs, k),
    }
}

/// A tokenizer's tokens as the text an API returns for them: each id decoded alone, and
/// back from that text to the id where the text is one token's alone (a byte-level token
/// holding part of a UTF-8 character decodes lossily, and special tokens to nothing or
/// their name, so those map back to no id).
pub struct TokenTexts {
    text: Vec<String>,
    special: Vec<bool>,
    id: std::collections::HashMap<String, u32>,
}

impl TokenTexts {
    pub fn new(tokenizer: &tokenizers::Tokenizer) -> Result<TokenTexts> {
        let n = tokenizer.get_vocab_size(true);
        let specials: std::collections::HashSet<u32> = tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        let mut text = Vec::with_capacity(n);
        let mut id = std::collections::HashMap::with_capacity(n);
        let mut ambiguous = std::collections::HashSet::new();
        for i in 0..n as u32 {
            let t = tokenizer
                .decode(&[i], false)
                .map_err(|e| anyhow::anyhow!("cannot decode token {i}: {e}"))?;
            let plain = !specials.contains(&i) && !t.contains('\u{FFFD}') && !t.is_empty();
            if plain && id.insert(t.clone(), i).is_some() {
                ambiguous.insert(t.clone());
            }
            text.push(t);
        }
        for t in ambiguous {
            id.remove(&t);
        }
        let special = (0..n as u32).map(|i| specials.contains(&i)).collect();
        Ok(TokenTexts { text, special, id })
    }

    /// Tokens given by their texts (and whether each is special), for tests.
    #[cfg(test)]
    pub(crate) fn from_texts(tokens: &[(&str, bool)]) -> TokenTexts {
        TokenTexts {
            text: tokens.iter().map(|(t, _)| t.to_string()).collect(),
            special: tokens.iter().map(|(_, s)| *s).collect(),
            id: tokens
                .iter()
                .enumerate()
                .filter(|(_, (t, s))| !s && !t.is_empty())
                .map(|(i, (t, _))| (t.to_string(), i as u32))
                .collect(),
        }
    }

    /// The id an API's token string names: "token_id:N" (vLLM's
    /// `return_tokens_as_token_ids`), else the one token whose text it is.
    pub fn id_of(&self, token: &str) -> Option<u32> {
        match token.strip_prefix("token_id:") {
            Some(n) => n.parse().ok().filter(|&i| (i as usize) < self.text.len()),
            None => self.id.get(token).copied(),
        }
    }

    /// Whether an API's token string can stand for `id`: its id, its text, or (a special
    /// token, which some servers print as nothing) the empty string.
    pub fn matches(&self, token: &str, id: u32) -> bool {
        match token.strip_prefix("token_id:") {
            Some(n) => n.parse() == Ok(id),
            None => {
                let i = id as usize;
                i < self.text.len()
                    && (self.text[i] == token || (self.special[i] && token.is_empty()))
            }
        }
    }

    /// The text of `id` alone (for messages).
    pub fn text(&self, id: u32) -> &str {
        self.text
            .get(id as usize)
            .map(String::as_str)
            .unwrap_or("?")
    }
}
