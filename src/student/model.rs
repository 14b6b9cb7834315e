//! The training decoder: RMSNorm, RoPE (Hugging Face rotate-half layout), grouped-query
//! attention with causal and padding masks, SwiGLU; q/k/v bias and tied embeddings as
//! shape flags. `forward` gives full-sequence logits for training, built only from ops that
//! have a backward pass: candle's fused softmax / rms_norm / rope drop gradients
//! (STACK-NOTES). `forward_cached` is the inference path (greedy decoding, label scoring):
//! a KV cache, so each new token costs one position instead of the whole sequence.

use super::ops::{rope_heads, silu_mul};
use super::ModelShape;
use crate::config::{LoraConfig, Precision};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use std::collections::BTreeMap;

pub struct Decoder {
    pub shape: ModelShape,
    /// Every weight by its Hugging Face name; trainable ones are views of `vars`.
    weights: BTreeMap<String, Tensor>,
    /// The trainable weights, by name.
    pub vars: Vec<(String, Var)>,
    /// LoRA adapters by linear layer prefix (`model.layers.0.self_attn.q_proj`).
    lora: BTreeMap<String, Lora>,
    /// LoRA input dropout rate, and the key of this forward pass's masks (None: no
    /// dropout, as in evaluation).
    lora_dropout: f64,
    dropout_key: std::cell::Cell<Option<u64>>,
    /// Linear weights stored as `[in, out]` (see `into_inference`).
    transposed: bool,
    /// The arithmetic of the linear layers' and the vocabulary head's products.
    precision: Precision,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    device: Device,
}

/// A low-rank adapter on a frozen linear layer (Hu et al., 2021): `W x + s·B(A x)` with
/// A `[r, in]`, B `[out, r]`, s = alpha / r. B starts at zero, so training starts from the
/// base model exactly.
#[derive(Clone)]
struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

pub(super) struct Linear<'a> {
    /// `[out, in]`, or `[in, out]` when `transposed`.
    weight: &'a Tensor,
    transposed: bool,
    bias: Option<&'a Tensor>,
    lora: Option<&'a Lora>,
    /// Dropout on the adapter's input: rate and mask key.
    dropout: Option<(f64, u64)>,
    /// The arithmetic of the product with `weight` (the adapter's is f32).
    precision: Precision,
}

/// A dropout mask for `x` (kept entries scaled by 1 / (1 − p)) drawn from `key`.
fn dropout_mask(x: &Tensor, p: f64, key: u64) -> candle_core::Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random_bool(p) { 0.0 } else { keep })
        .collect();
    Tensor::from_vec(mask, x.shape(), x.device())
}

impl Linear<'_> {
    /// The frozen weight and its adapter in one fused op (CPU, f32), when it applies.
    fn fused_lora(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(l) = self.lora.filter(|_| !self.transposed) else {
            return Ok(None);
        };
        let mask = match self.dropout {
            Some((p, key)) => Some(dropout_mask(x, p, key)?),
            None => None,
        };
        let base = (self.weight, self.precision == Precision::Bf16);
        super::ops::lora_linear(x, base, &l.a, &l.b, l.scale, mask)
    }
}

impl Module for Linear<'_> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = self.fused_lora(x)? {
            return match self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        let mut y = if self.transposed {
            matmul_rows(x, self.weight)?
        } else {
            matmul_t_in(x, self.weight, self.precision)?
        };
        if let Some(l) = self.lora {
            let xa = match self.dropout {
                Some((p, key)) => (x * dropout_mask(x, p, key)?)?,
                None => x.clone(),
            };
            // Scaled at rank width, not at the output's: one fewer output-sized tensor.
            let low = (matmul_t(&xa, &l.a)? * l.scale)?;
            y = (y + matmul_t(&low, &l.b)?)?;
        }
        match self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x · wᵀ` for `x` of shape `[..., in]` and `w` of shape `[out, in]`: the fused linear op
/// on the CPU, elsewhere one 2-D matmul (a batched matmul against a broadcast weight is
/// several times slower, forward and backward, measured on the CPU backend).
pub(super) fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    matmul_t_in(x, w, Precision::F32)
}

/// `matmul_t` in `precision`.
fn matmul_t_in(x: &Tensor, w: &Tensor, precision: Precision) -> candle_core::Result<Tensor> {
    let bf16 = precision == Precision::Bf16;
    if let Some(y) = super::ops::linear(x, w, bf16)? {
        return Ok(y);
    }
    // Other devices: one 2-D product.
    let dims = x.dims().to_vec();
    let x2 = x.reshape(((), dims[dims.len() - 1]))?;
    let y = match precision {
        Precision::Bf16 => super::mixed::linear_bf16(&x2, w)?,
        Precision::F32 => x2.matmul(&w.t()?)?,
    };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    y.reshape(out)
}

/// `x · w` for `x` of shape `[..., in]` and `w` of shape `[in, out]` (inference weights),
/// as one 2-D matmul. A single row is padded to two: for one row the matrix kernel takes a
/// matrix-vector path that sums in another order, so a sequence decoded alone would get
/// logits differing in the last bits from the same sequence in a batch, and a resumed
/// run could write a different reply than an uninterrupted one. From two rows on, every
/// row's result is independent of the others (the kernel's k blocking depends on k only).
pub(super) fn matmul_rows(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = dims[dims.len() - 1];
    let x2 = x.reshape(((), inner))?;
    let rows = x2.dim(0)?;
    let y = if rows == 1 {
        x2.pad_with_zeros(0, 0, 1)?.matmul(w)?.narrow(0, 0, 1)?
    } else {
        x2.matmul(w)?
    };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(1)?;
    y.reshape(out)
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    super::ops::rms_norm(x, weight, eps)
}

impl Decoder {
    /// Build from weights; names for which `trainable` is true become variables.
    pub fn new(
        shape: ModelShape,
        weights: BTreeMap<String, Tensor>,
        device: &Device,
        trainable: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let mut map = BTreeMap::new();
        let mut vars = Vec::new();
        for (name, w) in weights {
            let w = w.to_dtype(DType::F32)?.to_device(device)?;
            if trainable(&name) {
                let var = Var::from_tensor(&w)?;
                map.insert(name.clone(), var.as_tensor().clone());
                vars.push((name, var));
            } else {
                map.insert(name, w.detach());
            }
        }
        let (cos, sin) = rope_tables(&shape, device)?;
        let d = Decoder {
            shape,
            weights: map,
            vars,
            lora: BTreeMap::new(),
            lora_dropout: 0.0,
            transposed: false,
            precision: Precision::F32,
            dropout_key: std::cell::Cell::new(None),
            cos,
            sin,
            device: device.clone(),
        };
        check_weights(&d.shape, &d.weights)?;
        Ok(d)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same model for inference only: every linear weight stored transposed, `[in,
    /// out]`, and the vocabulary head as `lm_head.weight.T`. The matrix kernel then reads
    /// weights in place; as `[out, in]` it copies (packs) the whole weight at every call,
    /// which for a few rows (batched decoding) cost more than the product itself (perf:
    /// 42 % of decoding time). No LoRA, no training afterwards.
    pub fn into_inference(mut self) -> Result<Self> {
        anyhow::ensure!(
            self.lora.is_empty() && self.vars.is_empty(),
            "into_inference needs a frozen model without adapters"
        );
        if self.transposed {
            return Ok(self);
        }
        let head = self.head()?.t()?.contiguous()?;
        for (name, w) in self.weights.iter_mut() {
            if name.starts_with("model.layers.") && name.ends_with("_proj.weight") {
                *w = w.t()?.contiguous()?;
            }
        }
        self.weights.insert("lm_head.weight.T".into(), head);
        if self.shape.tie_word_embeddings {
            self.weights.remove("lm_head.weight");
        }
        self.transposed = true;
        Ok(self)
    }

    /// The vocabulary head `[vocab, hidden]` (the embeddings when tied).
    fn head(&self) -> Result<&Tensor> {
        if self.shape.tie_word_embeddings {
            self.w("model.embed_tokens.weight")
        } else {
            self.w("lm_head.weight")
        }
    }

    /// Logits for final hidden states `[..., hidden]`.
    pub(super) fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(if self.transposed {
            matmul_rows(x, self.w("lm_head.weight.T")?)?
        } else {
            matmul_t_in(x, self.head()?, self.precision)?
        })
    }

    /// Positions the model can attend over (its RoPE table, capped at 32,768).
    pub fn context_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Add LoRA adapters to every target linear layer; they become the trainable
    /// variables (named as PEFT names them, `<layer>.lora_A.weight` / `lora_B`). A is
    /// drawn uniformly from ±1/√in with a seeded generator, B is zero. Build the decoder
    /// with nothing trainable first: the base weights stay frozen.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        use rand::{Rng, SeedableRng};
        anyhow::ensure!(cfg.rank > 0, "[finetune] lora rank must be at least 1");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let scale = cfg.alpha / cfg.rank as f64;
        let prefixes: Vec<String> = self
            .weights
            .keys()
            .filter_map(|n| n.strip_suffix(".weight"))
            .filter(|p| {
                p.starts_with("model.layers.")
                    && cfg.targets.iter().any(|t| p.ends_with(&format!(".{t}")))
            })
            .map(str::to_string)
            .collect();
        anyhow::ensure!(
            !prefixes.is_empty(),
            "[finetune] lora targets {:?} match no linear layer of the student",
            cfg.targets
        );
        for p in prefixes {
            let (out, inp) = self.w(&format!("{p}.weight"))?.dims2()?;
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..cfg.rank * inp)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, inp), &self.device)?)?;
            let b = Var::zeros((out, cfg.rank), DType::F32, &self.device)?;
            self.lora.insert(
                p.clone(),
                Lora {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale,
                },
            );
            self.vars.push((format!("{p}.lora_A.weight"), a));
            self.vars.push((format!("{p}.lora_B.weight"), b));
        }
        self.lora_dropout = cfg.dropout;
        Ok(())
    }

    /// The arithmetic of the training products from now on (`[finetune] precision`);
    /// fails where the device cannot run it.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        super::mixed::check(precision, &self.device)?;
        self.precision = precision;
        Ok(())
    }

    /// Training passes set a key (from seed, step and micro-batch) so LoRA dropout draws
    /// reproducible masks; evaluation passes set None: no dropout.
    pub fn set_dropout_key(&self, key: Option<u64>) {
        self.dropout_key.set(key);
    }

    /// Every weight, by Hugging Face name (current values, trained ones included), with
    /// LoRA adapters merged into their layers: `W + (alpha / r)·B·A`.
    pub fn weights(&self) -> Result<BTreeMap<String, Tensor>> {
        anyhow::ensure!(
            !self.transposed,
            "an inference-only model has no exportable weights"
        );
        let mut out = self.weights.clone();
        for (p, l) in &self.lora {
            let name = format!("{p}.weight");
            let merged = (&out[&name] + (l.b.matmul(&l.a)? * l.scale)?)?;
            out.insert(name, merged);
        }
        Ok(out)
    }

    pub(super) fn w(&self, name: &str) -> Result<&Tensor> {
        self.weights
            .get(name)
            .with_context(|| format!("student weights lack {name} (missing tensor)"))
    }

    pub(super) fn linear(&self, prefix: &str) -> Result<Linear<'_>> {
        let lora = self.lora.get(prefix);
        // Only adapters in a training pass drop out; each layer's mask key mixes in a hash
        // of its name.
        let dropout = match (lora, self.dropout_key.get()) {
            (Some(_), Some(key)) if self.lora_dropout > 0.0 => {
                let layer = crate::io::atomic::text_sha256(prefix);
                let salt = u64::from_str_radix(&layer[..15], 16).unwrap_or(0);
                Some((self.lora_dropout, key ^ salt))
            }
            _ => None,
        };
        Ok(Linear {
            weight: self.w(&format!("{prefix}.weight"))?,
            transposed: self.transposed,
            bias: self.weights.get(&format!("{prefix}.bias")),
            lora,
            dropout,
            precision: self.precision,
        })
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`; `mask` `[batch, seq]` is 1
    /// for real tokens and 0 for padding (right-padded).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let s = &self.shape;
        let embed = self.w("model.embed_tokens.weight")?;
        let mut x = embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, s.hidden_size))?;
        let keys: Vec<u8> = mask
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|m| u8::from(*m > 0.5))
            .collect();
        let keys = std::sync::Arc::new(keys);
        for l in 0..s.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let h = rms_norm(
                &x,
                self.w(&format!("{p}.input_layernorm.weight"))?,
                s.rms_norm_eps,
            )?;
            x = (x + self.attention(&h, &p, &keys, mask)?)?;
            let h = rms_norm(
                &x,
                self.w(&format!("{p}.post_attention_layernorm.weight"))?,
                s.rms_norm_eps,
            )?;
            x = (x + self.mlp(&h, &p)?)?;
        }
        let x = rms_norm(&x, self.w("model.norm.weight")?, s.rms_norm_eps)?;
        self.logits(&x)
    }

    /// Queries and keys `[batch, heads, seq, head_dim]` of `x`, RoPE applied for positions
    /// starting at `offset`, and the value projection `[batch, seq, kv_heads · head_dim]`
    /// (`value_heads` splits it); the queries come scaled by 1/√head_dim (cheaper on them
    /// than on the scores, and free inside the fused RoPE).
    fn qkv(&self, x: &Tensor, p: &str, offset: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let s = &self.shape;
        let t = x.dim(1)?;
        let project = |name: &str| -> Result<Tensor> {
            Ok(self.linear(&format!("{p}.self_attn.{name}"))?.forward(x)?)
        };
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let scale = 1.0 / (s.head_dim() as f64).sqrt();
        let q = rope_heads(
            &project("q_proj")?,
            s.num_attention_heads,
            &cos,
            &sin,
            scale,
        )?;
        let k = rope_heads(&project("k_proj")?, s.num_key_value_heads, &cos, &sin, 1.0)?;
        Ok((q, k, project("v_proj")?))
    }

    /// The value projection `[batch, seq, kv_heads · head_dim]` as `[batch, kv_heads, seq,
    /// head_dim]`.
    fn value_heads(&self, v: &Tensor) -> Result<Tensor> {
        let s = &self.shape;
        let (b, t, _) = v.dims3()?;
        Ok(v.reshape((b, t, s.num_key_value_heads, s.head_dim()))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    fn attention(
        &self,
        x: &Tensor,
        p: &str,
        keys: &std::sync::Arc<Vec<u8>>,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let s = &self.shape;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (s.num_attention_heads, s.num_key_value_heads, s.head_dim());
        let (q, k, v) = self.qkv(x, p, 0)?;
        let o_proj = self.linear(&format!("{p}.self_attn.o_proj"))?;
        let bf16 = self.precision == Precision::Bf16;
        if let Some(out) = super::attention::causal_attention(&q, &k, &v, keys.clone(), bf16)? {
            return Ok(o_proj.forward(&out)?);
        }
        let v = self.value_heads(&v)?;
        // Grouped-query attention without copying keys and values for every query head:
        // the `rep` query heads that share a key/value head (heads kv·rep … kv·rep + rep − 1,
        // as transformers' repeat_kv pairs them) are stacked along the sequence axis, a
        // free reshape, and multiply that head's keys in one product.
        let rep = nh / nkv;
        let scores = q
            .reshape((b, nkv, rep * t, hd))?
            .matmul(&k.t()?.contiguous()?)?
            .reshape((b, nh, t, t))?;
        let probs = candle_nn::ops::softmax(
            &scores.broadcast_add(&attention_bias(mask, t, &self.device)?)?,
            D::Minus1,
        )?;
        let out = probs
            .reshape((b, nkv, rep * t, t))?
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, nh * hd))?;
        Ok(o_proj.forward(&out)?)
    }

    pub(super) fn mlp(&self, x: &Tensor, p: &str) -> Result<Tensor> {
        let gate = self.linear(&format!("{p}.mlp.gate_proj"))?.forward(x)?;
        let up = self.linear(&format!("{p}.mlp.up_proj"))?.forward(x)?;
        Ok(self
            .linear(&format!("{p}.mlp.down_proj"))?
            .forward(&silu_mul(&gate, &up)?)?)
    }

    /// Greedy decoding of one prompt, up to `max_new` tokens or `stop`.
    pub fn greedy(&self, prompt: &[u32], max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
        self.greedy_with(prompt, max_new, stop, |_| Ok(vec![]))
    }

    /// Greedy decoding in which, after each generated token, `insert` may append tokens of
    /// its own to the output (it sees the output so far); the model reads them and goes on.
    pub fn greedy_with(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        mut insert: impl FnMut(&[u32]) -> Result<Vec<u32>>,
    ) -> Result<Vec<u32>> {
        let mut cache = KvCache::default();
        let mut out = Vec::new();
        let mut logits = self.forward_cached(prompt, &mut cache)?;
        while out.len() < max_new {
            let n = logits.dim(0)?;
            let next = logits.get(n - 1)?.argmax(0)?.to_scalar::<u32>()?;
            if stop.contains(&next) {
                break;
            }
            out.push(next);
            let mut feed = vec![next];
            let extra = insert(&out)?;
            let room = max_new - out.len();
            feed.extend(extra.iter().take(room));
            out.extend(extra.iter().take(room));
            if out.len() < max_new {
                logits = self.forward_cached(&feed, &mut cache)?;
            }
        }
        Ok(out)
    }

    /// Logits `[new, vocab]` for `new` token ids that continue the sequence held in
    /// `cache` (empty: a fresh sequence); their keys and values are appended to it.
    /// Inference only: no padding, one sequence, no gradients needed.
    pub fn forward_cached(&self, new: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let s = &self.shape;
        let (n, past) = (new.len(), cache.len);
        if n == 0 {
            anyhow::bail!("forward_cached needs at least one token");
        }
        if past + n > self.cos.dim(0)? {
            anyhow::bail!(
                "sequence of {} tokens is longer than the model's {} positions",
                past + n,
                self.cos.dim(0)?
            );
        }
        cache.layers.resize(s.num_hidden_layers, None);
        let embed = self.w("model.embed_tokens.weight")?;
        let ids = Tensor::from_vec(new.to_vec(), n, &self.device)?;
        let mut x = embed
            .index_select(&ids, 0)?
            .reshape((1, n, s.hidden_size))?;
        for l in 0..s.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let h = rms_norm(
                &x,
                self.w(&format!("{p}.input_layernorm.weight"))?,
                s.rms_norm_eps,
            )?;
            x = (x + self.attention_cached(&h, &p, &mut cache.layers[l], past)?)?;
            let h = rms_norm(
                &x,
                self.w(&format!("{p}.post_attention_layernorm.weight"))?,
                s.rms_norm_eps,
            )?;
            x = (x + self.mlp(&h, &p)?)?;
        }
        cache.len += n;
        let x = rms_norm(&x, self.w("model.norm.weight")?, s.rms_norm_eps)?;
        Ok(self.logits(&x)?.reshape((n, s.vocab_size))?)
    }

    fn attention_cached(
        &self,
        x: &Tensor,
        p: &str,
        layer: &mut Option<(Tensor, Tensor)>,
        past: usize,
    ) -> Result<Tensor> {
        let s = &self.shape;
        let (_, n, _) = x.dims3()?;
        let (nh, nkv, hd) = (s.num_attention_heads, s.num_key_value_heads, s.head_dim());
        let (q, k, v) = self.qkv(x, p, past)?;
        let v = self.value_heads(&v)?;
        let (k, v) = match layer.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *layer = Some((k.clone(), v.clone()));
        let total = past + n;
        let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?);
        let mut scores = q.matmul(&k.t()?.contiguous()?)?;
        if n > 1 {
            // New token i sits at position past + i and sees keys up to there.
            let mut bias = vec![0f32; n * total];
            for i in 0..n {
                for j in past + i + 1..total {
                    bias[i * total + j] = -1e9;
                }
            }
            let bias = Tensor::from_vec(bias, (1, 1, n, total), &self.device)?;
            scores = scores.broadcast_add(&bias)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((1, n, nh * hd))?;
        Ok(self
            .linear(&format!("{p}.self_attn.o_proj"))?
            .forward(&out)?)
    }
}

/// Keys and values (after RoPE, before they are repeated for grouped-query attention) of
/// every layer for the tokens a sequence has seen so far.
#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Every weight the decoder reads is there with the shape the config implies.
pub fn check_weights(s: &ModelShape, weights: &BTreeMap<String, Tensor>) -> Result<()> {
    let (h, kv) = (s.hidden_size, s.num_key_value_heads * s.head_dim());
    let check_shape = |name: &str, dims: &[usize]| -> Result<()> {
        let got = weights
            .get(name)
            .with_context(|| format!("student weights lack {name} (missing tensor)"))?
            .dims()
            .to_vec();
        anyhow::ensure!(
            got == dims,
            "student weight {name} has shape {got:?}, the config says {dims:?}"
        );
        Ok(())
    };
    check_shape("model.embed_tokens.weight", &[s.vocab_size, h])?;
    for l in 0..s.num_hidden_layers {
        let p = format!("model.layers.{l}");
        check_shape(&format!("{p}.self_attn.q_proj.weight"), &[h, h])?;
        check_shape(&format!("{p}.self_attn.k_proj.weight"), &[kv, h])?;
        check_shape(&format!("{p}.self_attn.v_proj.weight"), &[kv, h])?;
        check_shape(&format!("{p}.self_attn.o_proj.weight"), &[h, h])?;
        check_shape(
            &format!("{p}.mlp.gate_proj.weight"),
            &[s.intermediate_size, h],
        )?;
        check_shape(
            &format!("{p}.mlp.up_proj.weight"),
            &[s.intermediate_size, h],
        )?;
        check_shape(
            &format!("{p}.mlp.down_proj.weight"),
            &[h, s.intermediate_size],
        )?;
    }
    if !s.tie_word_embeddings {
        check_shape("lm_head.weight", &[s.vocab_size, h])?;
    }
    Ok(())
}

/// cos / sin tables `[max_pos, head_dim / 2]` for rotate-half RoPE.
fn rope_tables(s: &ModelShape, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = s.head_dim();
    let n = s.max_position_embeddings.clamp(1, 32768);
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / (s.rope_theta as f32).powf(2.0 * i as f32 / hd as f32))
        .collect();
    let mut angles = Vec::with_capacity(n * hd / 2);
    for pos in 0..n {
        angles.extend(inv.iter().map(|f| pos as f32 * f));
    }
    let a = Tensor::from_vec(angles, (n, hd / 2), device)?;
    Ok((a.cos()?, a.sin()?))
}

/// Additive attention bias `[batch, 1, seq, seq]`: 0 where query i may see key j (j ≤ i and
/// j is a real token), a large negative number elsewhere.
fn attention_bias(mask: &Tensor, t: usize, device: &Device) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let b = mask.len();
    let mut bias = vec![0f32; b * t * t];
    for (bi, m) in mask.iter().enumerate() {
        for i in 0..t {
            for j in 0..t {
                if j > i || m[j] < 0.5 {
                    bias[(bi * t + i) * t + j] = -1e9;
                }
            }
        }
    }
    Ok(Tensor::from_vec(bias, (b, 1, t, t), device)?)
}

fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, nkv, t, hd) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, nkv, n_rep, t, hd))?
        .contiguous()?
        .reshape((b, nkv * n_rep, t, hd))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::student::max_diff;

    /// A random two-layer Qwen2-shaped decoder (GQA, q/k/v bias, tied embeddings).
    pub(in crate::student) fn tiny_decoder() -> Decoder {
        let s = tiny_shape();
        Decoder::new(s.clone(), tiny_weights(&s), &Device::Cpu, |_| false).unwrap()
    }

    /// The same shape with weights drawn from a seeded generator (reproducible).
    pub(in crate::student) fn tiny_decoder_with_seed(seed: u64) -> Decoder {
        let s = tiny_shape();
        Decoder::new(s.clone(), seeded_weights(&s, seed), &Device::Cpu, |_| false).unwrap()
    }

    /// `tiny_weights`' shapes, drawn uniformly from ±0.5 with a seeded generator.
    fn seeded_weights(s: &ModelShape, seed: u64) -> BTreeMap<String, Tensor> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        tiny_weights(s)
            .into_iter()
            .map(|(name, w)| {
                let v: Vec<f32> = (0..w.elem_count())
                    .map(|_| rng.random_range(-0.5f32..0.5))
                    .collect();
                (name, Tensor::from_vec(v, w.shape(), &Device::Cpu).unwrap())
            })
            .collect()
    }

    fn tiny_shape() -> ModelShape {
        ModelShape {
            model_type: "qwen2".into(),
            vocab_size: 11,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            max_position_embeddings: 32,
            tie_word_embeddings: true,
            attention_bias: true,
            bos_token_id: None,
            eos_token_id: Some(0),
        }
    }

    fn tiny_weights(s: &ModelShape) -> BTreeMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut w = BTreeMap::new();
        let mut add = |name: String, dims: &[usize]| {
            w.insert(name, Tensor::randn(0f32, 0.3, dims, &dev).unwrap());
        };
        let (h, kv, f) = (
            s.hidden_size,
            s.num_key_value_heads * s.head_dim(),
            s.intermediate_size,
        );
        add("model.embed_tokens.weight".into(), &[s.vocab_size, h]);
        add("model.norm.weight".into(), &[h]);
        for l in 0..s.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (n, d) in [
                ("self_attn.q_proj", [h, h]),
                ("self_attn.k_proj", [kv, h]),
                ("self_attn.v_proj", [kv, h]),
                ("self_attn.o_proj", [h, h]),
                ("mlp.gate_proj", [f, h]),
                ("mlp.up_proj", [f, h]),
                ("mlp.down_proj", [h, f]),
            ] {
                add(format!("{p}.{n}.weight"), &d);
            }
            for (n, d) in [
                ("self_attn.q_proj.bias", h),
                ("self_attn.k_proj.bias", kv),
                ("self_attn.v_proj.bias", kv),
                ("input_layernorm.weight", h),
                ("post_attention_layernorm.weight", h),
            ] {
                add(format!("{p}.{n}"), &[d]);
            }
        }
        w
    }

    #[test]
    fn every_trainable_weight_gets_a_gradient() {
        let s = tiny_shape();
        let ids = Tensor::new(&[[1u32, 2, 3, 4], [5, 6, 7, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1., 1.], [1., 1., 1., 0.]], &Device::Cpu).unwrap();
        let mut f32_grads: Vec<Tensor> = Vec::new();
        let weights = tiny_weights(&s); // random: the same draw for both precisions
        for precision in [Precision::F32, Precision::Bf16] {
            if precision == Precision::Bf16
                && !super::super::bf16_gemm::testable(
                    "model::every_trainable_weight_gets_a_gradient",
                )
            {
                continue;
            }
            let mut d = Decoder::new(s.clone(), weights.clone(), &Device::Cpu, |_| true).unwrap();
            d.set_precision(precision).unwrap();
            let loss = d
                .forward(&ids, &mask)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            for (i, (name, var)) in d.vars.iter().enumerate() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {name} in {precision:?}"));
                let norm = |t: &Tensor| {
                    t.sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        .sqrt()
                };
                assert!(norm(g) > 0.0, "zero gradient for {name} in {precision:?}");
                match f32_grads.get(i) {
                    // bf16 gradients are the f32 ones to within bf16 rounding.
                    Some(g32) if precision == Precision::Bf16 => {
                        let rel = norm(&(g - g32).unwrap()) / norm(g32);
                        assert!(rel < 0.05, "{name}: bf16 gradient off by {rel} of its norm");
                    }
                    _ => f32_grads.push(g.clone()),
                }
            }
        }
    }

    /// A few AdamW steps on one batch lower the loss in bf16 as far as in f32.
    #[test]
    fn bf16_training_lowers_the_loss_like_f32() {
        use crate::finetune::{loss::token_nll, optim::AdamW};
        let s = tiny_shape();
        let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]], &Device::Cpu).unwrap();
        let mask = Tensor::ones((2, 6), DType::F32, &Device::Cpu).unwrap();
        let mut curves = Vec::new();
        let weights = seeded_weights(&s, 7);
        for precision in [Precision::F32, Precision::Bf16] {
            if precision == Precision::Bf16
                && !super::super::bf16_gemm::testable(
                    "model::bf16_training_lowers_the_loss_like_f32",
                )
            {
                return;
            }
            let mut d = Decoder::new(s.clone(), weights.clone(), &Device::Cpu, |_| true).unwrap();
            d.set_precision(precision).unwrap();
            let mut opt = AdamW::new(d.vars.clone(), 3e-2, 0.0).unwrap();
            let mut losses = Vec::new();
            for _ in 0..30 {
                let loss = token_nll(&d.forward(&ids, &mask).unwrap(), &ids)
                    .unwrap()
                    .mean_all()
                    .unwrap();
                losses.push(loss.to_scalar::<f32>().unwrap());
                let mut acc = opt.accumulator();
                opt.accumulate(&mut acc, &loss.backward().unwrap()).unwrap();
                opt.step(acc, Some(1.0)).unwrap();
            }
            curves.push(losses);
        }
        let (f32_curve, bf16_curve) = (&curves[0], &curves[1]);
        let (first, last) = (bf16_curve[0], bf16_curve[29]);
        assert!(last < 0.5 * first, "bf16 {bf16_curve:?}, f32 {f32_curve:?}");
        assert!(
            (last - f32_curve[29]).abs() < 0.1 * f32_curve[29].max(0.1),
            "bf16 {bf16_curve:?}, f32 {f32_curve:?}"
        );
    }

    #[test]
    fn lora_dropout_is_seeded_and_off_without_a_key() {
        let s = tiny_shape();
        let mut d = Decoder::new(s.clone(), tiny_weights(&s), &Device::Cpu, |_| false).unwrap();
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: vec!["q_proj".into(), "up_proj".into()],
            dropout: 0.5,
        };
        d.add_lora(&cfg, 3).unwrap();
        // B starts at zero; give it values so the adapters (and their dropout) matter.
        for (name, var) in &d.vars {
            if name.contains("lora_B") {
                var.set(&Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, 4), DType::F32, &Device::Cpu).unwrap();
        let run = |key: Option<u64>| {
            d.set_dropout_key(key);
            let y = d.forward(&ids, &mask).unwrap();
            d.set_dropout_key(None);
            y
        };
        let (plain, again) = (run(None), run(None));
        let (k1, k1_again, k2) = (run(Some(1)), run(Some(1)), run(Some(2)));
        assert_eq!(max_diff(&plain, &again), 0.0);
        assert_eq!(
            max_diff(&k1, &k1_again),
            0.0,
            "the same key draws the same masks"
        );
        assert!(max_diff(&k1, &plain) > 1e-4, "dropout changed nothing");
        assert!(max_diff(&k1, &k2) > 1e-4, "two keys drew the same masks");
    }

    #[test]
    fn cached_forward_matches_the_full_forward() {
        let s = tiny_shape();
        let d = Decoder::new(s.clone(), tiny_weights(&s), &Device::Cpu, |_| false).unwrap();
        let ids = [1u32, 2, 3, 4, 5, 6, 7];
        let full = d
            .forward(
                &Tensor::new(&[ids], &Device::Cpu).unwrap(),
                &Tensor::ones((1, ids.len()), DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        // A 4-token prompt, then one token at a time.
        let mut cache = KvCache::default();
        let mut parts = vec![d.forward_cached(&ids[..4], &mut cache).unwrap()];
        for id in &ids[4..] {
            parts.push(d.forward_cached(&[*id], &mut cache).unwrap());
        }
        assert_eq!(cache.len(), ids.len());
        let cached = Tensor::cat(&parts, 0).unwrap();
        let diff = max_diff(&full, &cached);
        assert!(diff < 1e-4, "cached logits differ by {diff}");
    }

    #[test]
    fn padding_does_not_change_real_positions() {
        let s = tiny_shape();
        let d = Decoder::new(s.clone(), tiny_weights(&s), &Device::Cpu, |_| false).unwrap();
        let short = d
            .forward(
                &Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap(),
                &Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let padded = d
            .forward(
                &Tensor::new(&[[1u32, 2, 3, 9, 9]], &Device::Cpu).unwrap(),
                &Tensor::new(&[[1f32, 1., 1., 0., 0.]], &Device::Cpu).unwrap(),
            )
            .unwrap()
            .narrow(1, 0, 3)
            .unwrap();
        let diff = max_diff(&short, &padded);
        assert!(diff < 1e-5, "padding changed logits by {diff}");
    }
}
