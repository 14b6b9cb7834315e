//! Batched incremental inference over a decoder's weights: many sequences, each with its
//! own length and key/value cache, advanced together in one step. This is how kdpipe serves
//! a llama-family teacher on a CPU fast: one sequence at a time, decoding reads every weight
//! for one token and is bound by memory bandwidth; 16–64 sequences a step turn the same
//! weight reads into one matrix product per layer, which is bound by arithmetic instead.
//!
//! The linear layers run as candle matrix products over all rows of the step. Rotary
//! embeddings, the key/value caches and attention, which differ per sequence, are plain
//! loops over f32 rows here, in parallel over (row, head).

use super::Decoder;
use anyhow::{ensure, Result};
use candle_core::{Module, Tensor};
use rayon::prelude::*;

/// Keys and values of one sequence: per layer, `[position][kv_head][head_dim]` row after
/// row, RoPE applied to the keys.
#[derive(Clone, Debug)]
pub struct SeqCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    /// Floats per position in one layer: kv heads × head_dim.
    row: usize,
}

impl SeqCache {
    /// An empty cache with room for `capacity` tokens before it reallocates.
    pub fn new(model: &Decoder, capacity: usize) -> Self {
        let s = &model.shape;
        let row = s.num_key_value_heads * s.head_dim();
        SeqCache {
            keys: (0..s.num_hidden_layers)
                .map(|_| Vec::with_capacity(capacity * row))
                .collect(),
            values: (0..s.num_hidden_layers)
                .map(|_| Vec::with_capacity(capacity * row))
                .collect(),
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
        for layer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            layer.truncate(n * self.row);
        }
        self.len = n;
    }

    /// A copy of the first `n` tokens, with room for `extra` more.
    pub fn prefix(&self, n: usize, extra: usize) -> Self {
        let n = n.min(self.len);
        let copy = |layers: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            layers
                .iter()
                .map(|l| {
                    let mut v = Vec::with_capacity((n + extra) * self.row);
                    v.extend_from_slice(&l[..n * self.row]);
                    v
                })
                .collect()
        };
        SeqCache {
            keys: copy(&self.keys),
            values: copy(&self.values),
            len: n,
            row: self.row,
        }
    }
}

/// One sequence's part of a step: the tokens it appends, and whether the caller needs the
/// logits after every one of them (scoring) or only after the last (generation).
pub struct StepInput<'a> {
    pub cache: &'a mut SeqCache,
    pub tokens: &'a [u32],
    pub all_logits: bool,
}

impl Decoder {
    /// Advance every sequence of `step` by its tokens; returns per sequence the logits
    /// (`vocab` floats a row) after each token (`all_logits`) or after its last token.
    pub fn forward_step(&self, step: &mut [StepInput]) -> Result<Vec<Vec<f32>>> {
        let s = &self.shape;
        let (nh, nkv, hd) = (s.num_attention_heads, s.num_key_value_heads, s.head_dim());
        let max_pos = self.context_len();
        // Row r of the step belongs to sequence seq_of[r] at position pos_of[r].
        let mut seq_of = Vec::new();
        let mut pos_of = Vec::new();
        let mut ids = Vec::new();
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
        let (cos, sin) = (cos.to_vec1::<f32>()?, sin.to_vec1::<f32>()?);
        let embed = self.w("model.embed_tokens.weight")?;
        let mut x = embed.index_select(&Tensor::from_vec(ids, rows, dev)?, 0)?;
        let scale = 1.0 / (hd as f32).sqrt();
        for l in 0..s.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let h = super::ops::rms_norm(
                &x,
                self.w(&format!("{p}.input_layernorm.weight"))?,
                s.rms_norm_eps,
            )?;
            let project = |name: &str| -> Result<Vec<f32>> {
                let y = self.linear(&format!("{p}.self_attn.{name}"))?.forward(&h)?;
                Ok(y.flatten_all()?.to_vec1::<f32>()?)
            };
            let mut q = project("q_proj")?;
            let mut k = project("k_proj")?;
            let v = project("v_proj")?;
            rope_rows(&mut q, nh, hd, &cos, &sin);
            rope_rows(&mut k, nkv, hd, &cos, &sin);
            // Append this layer's keys and values; a sequence's rows are contiguous.
            let row = nkv * hd;
            let mut r = 0;
            for input in step.iter_mut() {
                let n = input.tokens.len();
                input.cache.keys[l].extend_from_slice(&k[r * row..(r + n) * row]);
                input.cache.values[l].extend_from_slice(&v[r * row..(r + n) * row]);
                r += n;
            }
            let caches: Vec<(&[f32], &[f32])> = step
                .iter()
                .map(|i| (&i.cache.keys[l][..], &i.cache.values[l][..]))
                .collect();
            let mut out = vec![0f32; rows * nh * hd];
            out.par_chunks_mut(hd).enumerate().for_each(|(rh, o)| {
                let (r, head) = (rh / nh, rh % nh);
                let (keys, values) = caches[seq_of[r]];
                let g = head / (nh / nkv);
                let qh = &q[rh * hd..(rh + 1) * hd];
                attend(
                    qh,
                    keys,
                    values,
                    pos_of[r] as usize + 1,
                    (row, g * hd),
                    scale,
                    o,
                );
            });
            let out = Tensor::from_vec(out, (rows, nh * hd), dev)?;
            let attn = self
                .linear(&format!("{p}.self_attn.o_proj"))?
                .forward(&out)?;
            x = (x + attn)?;
            let h = super::ops::rms_norm(
                &x,
                self.w(&format!("{p}.post_attention_layernorm.weight"))?,
                s.rms_norm_eps,
            )?;
            x = (x + self.mlp(&h, &p)?)?;
        }
        for input in step.iter_mut() {
            input.cache.len += input.tokens.len();
        }
        // Only the rows whose logits are wanted go through the (large) vocabulary head.
        let mut wanted = Vec::new();
        let mut r = 0u32;
        for input in step.iter() {
            let n = input.tokens.len() as u32;
            if input.all_logits {
                wanted.extend(r..r + n);
            } else {
                wanted.push(r + n - 1);
            }
            r += n;
        }
        let x = x.index_select(&Tensor::from_vec(wanted.clone(), wanted.len(), dev)?, 0)?;
        let x = super::ops::rms_norm(&x, self.w("model.norm.weight")?, s.rms_norm_eps)?;
        let logits = self.logits(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let vocab = s.vocab_size;
        let mut per_seq = Vec::with_capacity(step.len());
        let mut at = 0;
        for input in step.iter() {
            let n = if input.all_logits {
                input.tokens.len()
            } else {
                1
            };
            per_seq.push(logits[at * vocab..(at + n) * vocab].to_vec());
            at += n;
        }
        Ok(per_seq)
    }
}

/// Rotate-half RoPE, in place, on rows of `heads × hd` floats; `cos` / `sin` hold `hd / 2`
/// floats per row (the row's position).
fn rope_rows(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    x.par_chunks_mut(heads * hd)
        .enumerate()
        .for_each(|(r, row)| {
            let (c, s) = (
                &cos[r * half..(r + 1) * half],
                &sin[r * half..(r + 1) * half],
            );
            for head in row.chunks_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * c[i] - x2 * s[i];
                    b[i] = x2 * c[i] + x1 * s[i];
                }
            }
        });
}

/// One query head against the first `visible` cached positions: softmax(q·k × scale)·v
/// into `out`. `(stride, offset)` locate the head's keys and values in a cache row.
fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    visible: usize,
    (stride, offset): (usize, usize),
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    let mut scores: Vec<f32> = (0..visible)
        .map(|t| dot(q, &keys[t * stride + offset..t * stride + offset + hd]) * scale)
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for (t, w) in scores.iter().enumerate() {
        let v = &values[t * stride + offset..t * stride + offset + hd];
        let w = w / sum;
        out.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
    }
}

/// Dot product in 16 independent lanes: a plain `sum()` is a serial chain (float addition
/// is not reassociated), which the compiler cannot turn into vector instructions.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_main, a_rest) = a.split_at(a.len() / LANES * LANES);
    let (b_main, b_rest) = b.split_at(a_main.len());
    for (x, y) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::student::KvCache;

    /// The batched step must reproduce the one-sequence cached path: two sequences of
    /// different lengths, prefilled together, then decoded together.
    #[test]
    fn batched_steps_match_single_sequence_decoding() {
        let model = crate::student::model::tests::tiny_decoder();
        check_against_cached_path(&model, &model);
        let reference = crate::student::model::tests::tiny_decoder_with_seed(3);
        let served = crate::student::model::tests::tiny_decoder_with_seed(3)
            .into_inference()
            .unwrap();
        check_against_cached_path(&served, &reference);
    }

    #[test]
    fn a_sequence_gets_the_same_logits_alone_and_in_any_batch() {
        let model = crate::student::model::tests::tiny_decoder_with_seed(5)
            .into_inference()
            .unwrap();
        let (prompt, other) = ([1u32, 2, 3, 4, 5, 6, 7], [8u32, 9, 10, 1]);
        let run = |others: usize| -> (Vec<f32>, Vec<f32>) {
            let mut mine = SeqCache::new(&model, 16);
            let mut rest: Vec<SeqCache> = (0..others).map(|_| SeqCache::new(&model, 16)).collect();
            let step =
                |tokens: &[u32], extra: &[u32], mine: &mut SeqCache, rest: &mut Vec<SeqCache>| {
                    let mut inputs = vec![StepInput {
                        cache: mine,
                        tokens,
                        all_logits: false,
                    }];
                    inputs.extend(rest.iter_mut().map(|c| StepInput {
                        cache: c,
                        tokens: extra,
                        all_logits: false,
                    }));
                    model.forward_step(&mut inputs).unwrap().swap_remove(0)
                };
            let prefill = step(&prompt, &other, &mut mine, &mut rest);
            let decode = step(&[9], &[10], &mut mine, &mut rest);
            (prefill, decode)
        };
        let alone = run(0);
        for others in [1, 2, 7] {
            assert_eq!(
                run(others),
                alone,
                "logits changed with {others} other sequences"
            );
        }
    }

    /// `model`'s batched steps against `reference`'s one-sequence cached path.
    fn check_against_cached_path(model: &Decoder, reference: &Decoder) {
        let prompts: [&[u32]; 2] = [&[1, 2, 3, 4, 5], &[6, 7]];
        let next: [u32; 2] = [8, 9];
        let mut caches: Vec<SeqCache> = (0..2).map(|_| SeqCache::new(model, 8)).collect();
        let [c0, c1] = &mut caches[..] else {
            unreachable!()
        };
        let first = model
            .forward_step(&mut [
                StepInput {
                    cache: c0,
                    tokens: prompts[0],
                    all_logits: true,
                },
                StepInput {
                    cache: c1,
                    tokens: prompts[1],
                    all_logits: false,
                },
            ])
            .unwrap();
        let second = model
            .forward_step(&mut [
                StepInput {
                    cache: c0,
                    tokens: &next[..1],
                    all_logits: false,
                },
                StepInput {
                    cache: c1,
                    tokens: &next[1..],
                    all_logits: false,
                },
            ])
            .unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let mut cache = KvCache::default();
            let logits = reference.forward_cached(prompt, &mut cache).unwrap();
            let vocab = logits.dim(1).unwrap();
            let logits = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = &first[i];
            let want = if i == 0 {
                &logits[..]
            } else {
                &logits[logits.len() - vocab..]
            };
            assert_eq!(got.len(), want.len());
            let diff = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "prefill of sequence {i}: max diff {diff}");
            let step = reference
                .forward_cached(&next[i..i + 1], &mut cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let diff = second[i]
                .iter()
                .zip(&step)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "decode of sequence {i}: max diff {diff}");
        }
        assert_eq!(caches[0].len(), 6);
        let mut cut = caches[0].prefix(3, 0);
        assert_eq!(cut.len(), 3);
        cut.truncate(1);
        assert_eq!(cut.len(), 1);
    }
}
