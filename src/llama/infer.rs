//! Incremental inference, many sequences at a time: each sequence keeps its own key/value
//! cache, and one step advances every sequence of a batch by its new tokens through the
//! same blocks training uses. One sequence at a time, decoding reads every weight for one
//! token and is bound by memory bandwidth; 16–64 sequences a step turn the same weight
//! reads into one matrix product per layer, bound by arithmetic instead.
//!
//! This is the one inference path: the teacher engine, eval and greedy decoding all run
//! through `forward_step` (see `super::generate` for the batching loop).

use super::block::Attend;
use super::linear::Pass;
use super::Decoder;
use crate::kernels::kv_attention::{attend_rows, KvPrecision, KvView};
use crate::kernels::rope::rope_rows;
use anyhow::{ensure, Result};
use candle_core::Tensor;
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Keys and values of one sequence: per layer, `[position][kv_head][head_dim]` row after
/// row, RoPE applied to the keys, in the decoder's `KvPrecision`.
#[derive(Clone, Debug)]
pub struct SeqCache {
    store: Store,
    len: usize,
    /// Numbers per position in one layer: kv heads × head_dim.
    row: usize,
}

#[derive(Clone, Debug)]
enum Store {
    F32(Layers<f32>),
    F16(Layers<f16>),
}

/// Every layer's cached keys and values.
#[derive(Clone, Debug)]
struct Layers<T> {
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
}

impl<T: Copy> Layers<T> {
    fn new(layers: usize, capacity: usize) -> Self {
        let empty = || (0..layers).map(|_| Vec::with_capacity(capacity)).collect();
        Layers {
            keys: empty(),
            values: empty(),
        }
    }

    fn truncate(&mut self, len: usize) {
        for v in self.keys.iter_mut().chain(self.values.iter_mut()) {
            v.truncate(len);
        }
    }

    /// A copy of each layer's first `len` numbers, with room for `extra` more.
    fn prefix(&self, len: usize, extra: usize) -> Self {
        let copy = |layers: &Vec<Vec<T>>| {
            layers
                .iter()
                .map(|l| {
                    let mut v = Vec::with_capacity(len + extra);
                    v.extend_from_slice(&l[..len]);
                    v
                })
                .collect()
        };
        Layers {
            keys: copy(&self.keys),
            values: copy(&self.values),
        }
    }
}

impl Store {
    /// Append rows of keys and of values (f32) to `layer`, rounded to nearest where the
    /// cache holds f16.
    fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        match self {
            Store::F32(l) => {
                l.keys[layer].extend_from_slice(keys);
                l.values[layer].extend_from_slice(values);
            }
            Store::F16(l) => {
                for (cache, rows) in [(&mut l.keys[layer], keys), (&mut l.values[layer], values)] {
                    let at = cache.len();
                    cache.resize(at + rows.len(), f16::ZERO);
                    cache[at..].convert_from_f32_slice(rows);
                }
            }
        }
    }

    fn view(&self, layer: usize) -> KvView<'_> {
        match self {
            Store::F32(l) => KvView::F32 {
                keys: &l.keys[layer],
                values: &l.values[layer],
            },
            Store::F16(l) => KvView::F16 {
                keys: &l.keys[layer],
                values: &l.values[layer],
            },
        }
    }
}

impl SeqCache {
    /// An empty cache with room for `capacity` tokens before it reallocates.
    pub fn new(model: &Decoder, capacity: usize) -> Self {
        let s = &model.shape;
        let row = s.num_key_value_heads * s.head_dim();
        let (layers, numbers) = (s.num_hidden_layers, capacity * row);
        SeqCache {
            store: match model.kv_precision() {
                KvPrecision::F32 => Store::F32(Layers::new(layers, numbers)),
                KvPrecision::F16 => Store::F16(Layers::new(layers, numbers)),
            },
            len: 0,
            row,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget every token after the first `n` (a shared prefix, a rescoring point).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len);
        match &mut self.store {
            Store::F32(l) => l.truncate(n * self.row),
            Store::F16(l) => l.truncate(n * self.row),
        }
        self.len = n;
    }

    /// A copy of the first `n` tokens, with room for `extra` more.
    pub fn prefix(&self, n: usize, extra: usize) -> Self {
        let n = n.min(self.len);
        let (len, extra_numbers) = (n * self.row, extra * self.row);
        SeqCache {
            store: match &self.store {
                Store::F32(l) => Store::F32(l.prefix(len, extra_numbers)),
                Store::F16(l) => Store::F16(l.prefix(len, extra_numbers)),
            },
            len: n,
            row: self.row,
        }
    }
}

/// The last prompt run and its cache, kept so the next prompt starts from the head they
/// share (a few-shot prompt runs once): generation and teacher scoring both go from
/// prompt to prompt this way.
#[derive(Default)]
pub struct PromptCache(Option<(Vec<u32>, SeqCache)>);

impl PromptCache {
    /// A cache for `prompt` with room for `room` tokens in all, holding the head it shares
    /// with the previous prompt, and that head's length. Never the whole prompt: at least
    /// one token must run, for the next-token logits.
    pub fn start(&self, model: &Decoder, prompt: &[u32], room: usize) -> (SeqCache, usize) {
        match &self.0 {
            Some((ids, cache)) => {
                let shared = ids.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                let reused = shared.min(prompt.len().saturating_sub(1));
                (cache.prefix(reused, room - reused), reused)
            }
            None => (SeqCache::new(model, room), 0),
        }
    }

    /// Keep `prompt` and the first `prompt.len()` positions of `cache` (which has run it)
    /// for the next prompt.
    pub fn keep(&mut self, prompt: &[u32], cache: &SeqCache) {
        self.0 = Some((prompt.to_vec(), cache.prefix(prompt.len(), 0)));
    }
}

/// One sequence's part of a step: the tokens it appends, and whether the caller needs the
/// logits after every one of them (scoring) or only after the last (generation).
pub struct StepInput<'a> {
    pub cache: &'a mut SeqCache,
    pub tokens: &'a [u32],
    pub all_logits: bool,
}

impl StepInput<'_> {
    /// Rows of logits the step returns for this sequence.
    fn logit_rows(&self) -> usize {
        if self.all_logits {
            self.tokens.len()
        } else {
            1
        }
    }
}

/// Attention in an inference step: row r of the step is a token of sequence `seq_of[r]`
/// at position `pos_of[r]`; its key and value join that sequence's cache, and it sees the
/// cache up to and including itself.
struct StepAttention<'s, 'a> {
    step: &'s mut [StepInput<'a>],
    seq_of: Vec<usize>,
    visible: Vec<usize>,
    /// RoPE cos / sin of each row's position, `head_dim / 2` floats a row.
    cos: Vec<f32>,
    sin: Vec<f32>,
    heads: (usize, usize, usize),
    device: candle_core::Device,
}

impl Attend for StepAttention<'_, '_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (nh, nkv, hd) = self.heads;
        let mut q = q.flatten_all()?.to_vec1::<f32>()?;
        let mut k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        rope_rows(&mut q, nh, hd, &self.cos, &self.sin);
        rope_rows(&mut k, nkv, hd, &self.cos, &self.sin);
        // Append this layer's keys and values; a sequence's rows are contiguous.
        let row = nkv * hd;
        let mut r = 0;
        for input in self.step.iter_mut() {
            let n = input.tokens.len();
            let rows = r * row..(r + n) * row;
            input.cache.store.append(layer, &k[rows.clone()], &v[rows]);
            r += n;
        }
        let caches: Vec<KvView> = self
            .step
            .iter()
            .map(|i| i.cache.store.view(layer))
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let out = attend_rows(&q, &caches, &self.seq_of, &self.visible, self.heads, scale);
        let rows = self.seq_of.len();
        Ok(Tensor::from_vec(out, (rows, nh * hd), &self.device)?)
    }
}

impl Decoder {
    /// Advance every sequence of `step` by its tokens; returns per sequence the logits
    /// (`vocab` floats a row) after each token (`all_logits`) or after its last token.
    ///
    /// The step runs on one of the thread pool's workers: each of its few hundred parallel
    /// products then splits among the workers by work stealing, where called from outside
    /// the pool each one would wake a worker and put the caller to sleep on a lock (with
    /// SmolLM2-135M decoding one sequence, a quarter of the time went to that scheduling;
    /// decode went from ~85 to ~110 tokens/s).
    ///
    /// The logits buffers, the step's largest allocation (32 sequences × vocab floats: 6 MB
    /// for SmolLM2's 49,152 tokens, 19 MB for Qwen2's 151,936), are made on the calling
    /// thread, which also frees them: made on whichever worker runs the step, each
    /// worker's heap kept its own set (the allocator never returns freed memory,
    /// src/alloc.rs).
    pub fn forward_step(&self, step: &mut [StepInput]) -> Result<Vec<Vec<f32>>> {
        let vocab = self.shape.vocab_size;
        let mut logits: Vec<Vec<f32>> = step
            .iter()
            .map(|input| vec![0f32; input.logit_rows() * vocab])
            .collect();
        rayon::scope(|_| self.forward_step_in_pool(step, &mut logits))?;
        Ok(logits)
    }

    /// `forward_step`, each sequence's logits written into its buffer in `logits`.
    fn forward_step_in_pool(&self, step: &mut [StepInput], logits: &mut [Vec<f32>]) -> Result<()> {
        let s = &self.shape;
        let max_pos = self.context_len();
        // Row r of the step belongs to sequence seq_of[r] at position pos_of[r].
        let (mut seq_of, mut pos_of, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for (i, input) in step.iter().enumerate() {
            ensure!(
                !input.tokens.is_empty(),
                "a step needs a token per sequence"
            );
            let end = input.cache.len + input.tokens.len();
            ensure!(
                end <= max_pos,
                "sequence of {end} tokens is longer than the model's {max_pos} positions"
            );
            for (j, &t) in input.tokens.iter().enumerate() {
                seq_of.push(i);
                pos_of.push((input.cache.len + j) as u32);
                ids.push(t);
            }
        }
        let rows = ids.len();
        let dev = self.device();
        let positions = Tensor::from_vec(pos_of.clone(), rows, dev)?;
        let cos = self.cos.index_select(&positions, 0)?.flatten_all()?;
        let sin = self.sin.index_select(&positions, 0)?.flatten_all()?;
        let mut x = self.embed.lookup(&Tensor::from_vec(ids, rows, dev)?)?;
        let mut attn = StepAttention {
            step: &mut *step,
            seq_of,
            visible: pos_of.iter().map(|p| *p as usize + 1).collect(),
            cos: cos.to_vec1::<f32>()?,
            sin: sin.to_vec1::<f32>()?,
            heads: (s.num_attention_heads, s.num_key_value_heads, s.head_dim()),
            device: dev.clone(),
        };
        for (l, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, l, &mut attn, &Pass::INFERENCE)?;
        }
        for input in step.iter_mut() {
            input.cache.len += input.tokens.len();
        }
        // Only the rows whose logits are wanted go through the (large) vocabulary head,
        // each written straight into its sequence's buffer.
        let mut wanted = Vec::new();
        let mut r = 0u32;
        for input in step.iter() {
            // The sequence's last `logit_rows` rows: the sizes `forward_step` gave the buffers.
            let n = input.tokens.len() as u32;
            wanted.extend(r + n - input.logit_rows() as u32..r + n);
            r += n;
        }
        let rows_wanted = wanted.len();
        let x = x.index_select(&Tensor::from_vec(wanted, rows_wanted, dev)?, 0)?;
        let mut out: Vec<&mut [f32]> = logits
            .iter_mut()
            .flat_map(|l| l.chunks_exact_mut(s.vocab_size))
            .collect();
        self.logits_into(&x, &mut out)
    }

    /// Log-probability of each continuation right after the sequence held in `cache`,
    /// whose next-token logits are `next`: each continuation's tokens but the last run
    /// together in one step, on copies of the cache. The cache is left as it was.
    pub fn continuation_logprobs(
        &self,
        cache: &SeqCache,
        next: &[f32],
        continuations: &[Vec<u32>],
    ) -> Result<Vec<f64>> {
        let first = log_softmax(next);
        let longer: Vec<&Vec<u32>> = continuations.iter().filter(|c| c.len() > 1).collect();
        let mut caches: Vec<SeqCache> = longer
            .iter()
            .map(|c| cache.prefix(cache.len(), c.len()))
            .collect();
        let mut inputs: Vec<StepInput> = caches
            .iter_mut()
            .zip(&longer)
            .map(|(cache, c)| StepInput {
                cache,
                tokens: &c[..c.len() - 1],
                all_logits: true,
            })
            .collect();
        let mut rest = if inputs.is_empty() {
            Vec::new()
        } else {
            self.forward_step(&mut inputs)?
        }
        .into_iter();
        let vocab = self.shape.vocab_size;
        continuations
            .iter()
            .map(|c| {
                anyhow::ensure!(!c.is_empty(), "a continuation tokenized to nothing");
                let mut logprob = first[c[0] as usize] as f64;
                if c.len() > 1 {
                    let rows = rest
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("missing continuation logits"))?;
                    for (j, &id) in c[1..].iter().enumerate() {
                        let row = log_softmax(&rows[j * vocab..(j + 1) * vocab]);
                        logprob += row[id as usize] as f64;
                    }
                }
                Ok(logprob)
            })
            .collect()
    }
}

/// Natural-log softmax of logits (in f64 for the normalizer over a large vocabulary).
pub fn log_softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = v.iter().map(|x| ((x - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    v.iter().map(|x| (*x as f64 - log_z) as f32).collect()
}
