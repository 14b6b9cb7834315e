//! The llama-family decoder (SmolLM2, Llama, Qwen2 shapes): token embeddings, the blocks,
//! a final RMSNorm and the vocabulary head, as per-layer structs built once from the
//! weights. `forward` gives full-sequence logits for training; the inference path
//! (`super::infer`) runs the same blocks over key/value caches. Every op has a backward
//! pass: candle's fused softmax / rms_norm / rope drop gradients silently (docs/STACK.md),
//! so training uses kdpipe's own kernels or candle's composed ops.

use super::block::{Block, BlockWeights};
use super::causal::CausalAttention;
use super::linear::{Linear, Pass, Weight};
use super::ModelShape;
use crate::config::{LoraConfig, Precision};
use crate::kernels::kv_attention::KvPrecision;
use crate::kernels::quant::QMatrix;
use crate::kernels::{bf16_gemm, rms_norm};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The token embeddings `[vocab, hidden]`: dense, or in a GGUF block format (inference).
#[derive(Clone)]
pub(super) enum Embeddings {
    Dense(Tensor),
    Quantized(Arc<QMatrix>),
}

impl Embeddings {
    /// The rows of `ids` (`[n]`, u32) as `[n, hidden]`.
    pub(super) fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embeddings::Dense(e) => Ok(e.index_select(ids, 0)?),
            Embeddings::Quantized(q) => {
                let ids_v = ids.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids_v.len() * q.cols];
                for (row, &id) in out.chunks_exact_mut(q.cols).zip(&ids_v) {
                    anyhow::ensure!(
                        (id as usize) < q.rows,
                        "token id {id} is outside the vocabulary ({} tokens)",
                        q.rows
                    );
                    q.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids_v.len(), q.cols), ids.device())?)
            }
        }
    }

    fn dense(&self) -> Result<&Tensor> {
        match self {
            Embeddings::Dense(e) => Ok(e),
            Embeddings::Quantized(_) => {
                anyhow::bail!("an inference-only model has no exportable embeddings")
            }
        }
    }
}

/// The weights of an inference-only decoder: linear layers and embeddings kept in GGUF
/// block formats where the kernels compute on them, the rest dense.
struct InferenceWeights {
    dense: BTreeMap<String, Tensor>,
    quantized: BTreeMap<String, Arc<QMatrix>>,
}

impl BlockWeights for InferenceWeights {
    fn take(&mut self, name: &str) -> Option<Tensor> {
        self.dense.remove(name)
    }

    /// Quantized as stored, or dense `[in, out]` (`Weight::InOut`).
    fn take_weight(&mut self, name: &str) -> Result<Weight> {
        if let Some(q) = self.quantized.remove(name) {
            return Ok(Weight::Quantized(q));
        }
        let w = self
            .dense
            .remove(name)
            .with_context(|| format!("model weights lack {name} (missing tensor)"))?;
        Ok(Weight::InOut(w.to_dtype(DType::F32)?.t()?.contiguous()?))
    }
}

/// Hidden states of one forward pass (`Decoder::forward_hidden`).
pub struct HiddenStates {
    /// `[batch, seq, hidden]` after each requested layer.
    pub layers: Vec<Tensor>,
    /// `[batch, seq, hidden]` after the last block and the final norm.
    pub last: Tensor,
}

pub struct Decoder {
    pub shape: ModelShape,
    pub(super) embed: Embeddings,
    pub(super) blocks: Vec<Block>,
    pub(super) norm: Tensor,
    /// The vocabulary head `[vocab, hidden]`: the embeddings themselves when they are tied
    /// (training), a transposed copy for inference.
    pub(super) head: Linear,
    /// The trainable weights, by Hugging Face name (PEFT's names for adapters).
    pub vars: Vec<(String, Var)>,
    /// The arithmetic of the training products (`[finetune] precision`).
    precision: Precision,
    /// The key of this training pass's LoRA dropout masks (None: no dropout). A lock, not
    /// a cell, so that the decoder is `Sync` and an inference step can run in the pool.
    dropout_key: std::sync::Mutex<Option<u64>>,
    /// How inference's key/value caches store their numbers (f16 unless set).
    kv_precision: KvPrecision,
    /// RoPE tables `[positions, head_dim / 2]`.
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    device: Device,
}

impl Decoder {
    /// Build from weights by Hugging Face name; names for which `trainable` is true become
    /// variables.
    pub fn new(
        shape: ModelShape,
        weights: BTreeMap<String, Tensor>,
        device: &Device,
        trainable: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        check_weights(&shape, &weights)?;
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
        let mut take = |name: &str| -> Result<Tensor> {
            map.remove(name)
                .with_context(|| format!("student weights lack {name} (missing tensor)"))
        };
        let embed = take("model.embed_tokens.weight")?;
        let norm = take("model.norm.weight")?;
        let head_weight = if shape.tie_word_embeddings {
            embed.clone()
        } else {
            take("lm_head.weight")?
        };
        let blocks = (0..shape.num_hidden_layers)
            .map(|l| Block::load(&shape, l, &mut map))
            .collect::<Result<_>>()?;
        let (cos, sin) = rope_tables(&shape, device)?;
        Ok(Decoder {
            kv_precision: KvPrecision::default(),
            head: Linear::new("lm_head".into(), head_weight, None),
            shape,
            embed: Embeddings::Dense(embed),
            blocks,
            norm,
            vars,
            precision: Precision::F32,
            dropout_key: std::sync::Mutex::new(None),
            cos,
            sin,
            device: device.clone(),
        })
    }

    /// An inference-only decoder on the CPU whose linear layers, embeddings and vocabulary
    /// head stay in their GGUF block formats (`quantized`, by Hugging Face name); norms,
    /// biases and weights in other formats come from `dense`.
    pub fn quantized(
        shape: ModelShape,
        dense: BTreeMap<String, Tensor>,
        quantized: BTreeMap<String, Arc<QMatrix>>,
    ) -> Result<Self> {
        check_dims(&shape, |name| {
            quantized
                .get(name)
                .map(|q| vec![q.rows, q.cols])
                .or_else(|| dense.get(name).map(|t| t.dims().to_vec()))
        })?;
        let device = Device::Cpu;
        let mut weights = InferenceWeights { dense, quantized };
        let embed_name = "model.embed_tokens.weight";
        let embed = match weights.quantized.get(embed_name) {
            Some(q) => Embeddings::Quantized(q.clone()),
            None => Embeddings::Dense(
                weights
                    .take(embed_name)
                    .with_context(|| format!("model weights lack {embed_name}"))?
                    .to_dtype(DType::F32)?,
            ),
        };
        let head = if shape.tie_word_embeddings {
            match &embed {
                Embeddings::Quantized(q) => Weight::Quantized(q.clone()),
                Embeddings::Dense(e) => Weight::InOut(e.t()?.contiguous()?),
            }
        } else {
            weights.take_weight("lm_head.weight")?
        };
        let norm = weights
            .take("model.norm.weight")
            .context("model weights lack model.norm.weight")?
            .to_dtype(DType::F32)?;
        let blocks = (0..shape.num_hidden_layers)
            .map(|l| Block::load(&shape, l, &mut weights))
            .collect::<Result<Vec<_>>>()?;
        let (cos, sin) = rope_tables(&shape, &device)?;
        Ok(Decoder {
            kv_precision: KvPrecision::default(),
            head: Linear::with_weight("lm_head".into(), head, None),
            shape,
            embed,
            blocks,
            norm,
            vars: Vec::new(),
            precision: Precision::F32,
            dropout_key: std::sync::Mutex::new(None),
            cos,
            sin,
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same model for inference only: every linear weight and the vocabulary head
    /// stored `[in, out]` (see `Layout::InOut`). No LoRA, no training afterwards.
    pub fn into_inference(mut self) -> Result<Self> {
        anyhow::ensure!(
            self.vars.is_empty(),
            "into_inference needs a frozen model without adapters"
        );
        for block in &mut self.blocks {
            for linear in block.linears_mut() {
                linear.make_inference()?;
            }
        }
        self.head.make_inference()?;
        Ok(self)
    }

    /// A frozen inference copy of the current weights (LoRA adapters merged), for sampling
    /// while this decoder trains on: every tensor copied, so later updates do not reach
    /// it. Same key/value precision.
    pub fn inference_copy(&self) -> Result<Self> {
        let weights = self
            .weights()?
            .into_iter()
            .map(|(name, w)| Ok((name, w.detach().copy()?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let mut copy =
            Decoder::new(self.shape.clone(), weights, &self.device, |_| false)?.into_inference()?;
        copy.kv_precision = self.kv_precision;
        Ok(copy)
    }

    /// A frozen inference copy of the current weights (LoRA adapters merged) with every
    /// matrix quantized to Q8_0 (blocks of 32 with one scale, llama.cpp's `q8_0`): a
    /// quarter of `inference_copy`'s bytes, and decoding, which reads every weight once a
    /// token, runs on the quantized kernels. Norms and biases stay f32; a matrix whose
    /// rows do not split into blocks stays f32 too. CPU only. Same key/value precision.
    pub fn quantized_copy(&self) -> Result<Self> {
        use crate::kernels::quant::Format;
        use candle_core::quantized::{GgmlDType, QTensor};
        use rayon::prelude::*;
        anyhow::ensure!(
            self.device.is_cpu(),
            "a Q8_0 inference copy runs on the CPU only"
        );
        enum Stored {
            Quantized(Arc<QMatrix>),
            Dense(Tensor),
        }
        let block = Format::Q8_0.block_len();
        let converted = self
            .weights()?
            .into_iter()
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(name, w)| -> Result<(String, Stored)> {
                let w = w.detach().to_dtype(DType::F32)?;
                let stored = match *w.dims() {
                    [rows, cols] if cols % block == 0 => {
                        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
                        let m = QMatrix::new(Format::Q8_0, rows, cols, &q.data()?)?;
                        Stored::Quantized(Arc::new(m))
                    }
                    _ => Stored::Dense(w.copy()?),
                };
                Ok((name, stored))
            })
            .collect::<Result<Vec<_>>>()?;
        let (mut dense, mut quantized) = (BTreeMap::new(), BTreeMap::new());
        for (name, stored) in converted {
            match stored {
                Stored::Quantized(q) => {
                    quantized.insert(name, q);
                }
                Stored::Dense(t) => {
                    dense.insert(name, t);
                }
            }
        }
        let mut copy = Decoder::quantized(self.shape.clone(), dense, quantized)?;
        copy.kv_precision = self.kv_precision;
        Ok(copy)
    }

    /// Whether every weight is stored for inference.
    pub fn is_inference(&self) -> bool {
        self.head.weight.is_inference()
    }

    /// How inference's key/value caches store keys and values.
    pub fn kv_precision(&self) -> KvPrecision {
        self.kv_precision
    }

    /// Store the key/value caches made from now on in `precision` (f32: inference
    /// bit-for-bit as the training forward computes it, for tests).
    pub fn set_kv_precision(&mut self, precision: KvPrecision) {
        self.kv_precision = precision;
    }

    /// Bytes a cached token takes (keys and values, every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        let s = &self.shape;
        2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim() * self.kv_precision.bytes()
    }

    /// Positions the model can attend over (its RoPE table, capped at 32,768).
    pub fn context_len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Add LoRA adapters to every target linear layer; they become the trainable
    /// variables (named as PEFT names them, `<layer>.lora_A.weight` / `lora_B`). A is
    /// drawn uniformly from ±1/√in with a seeded generator, in the order of the layers'
    /// names; B is zero. Build the decoder with nothing trainable first: the base weights
    /// stay frozen.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        anyhow::ensure!(cfg.rank > 0, "[finetune] lora rank must be at least 1");
        let mut targets: Vec<&mut Linear> = self
            .blocks
            .iter_mut()
            .flat_map(|b| b.linears_mut())
            .filter(|l| {
                cfg.targets
                    .iter()
                    .any(|t| l.name.ends_with(&format!(".{t}")))
            })
            .collect();
        anyhow::ensure!(
            !targets.is_empty(),
            "[finetune] lora targets {:?} match no linear layer of the student",
            cfg.targets
        );
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for linear in targets {
            let vars = linear.add_lora(cfg, &mut rng, &self.device)?;
            self.vars.extend(vars);
        }
        Ok(())
    }

    /// The arithmetic of the training products from now on (`[finetune] precision`);
    /// fails where the device cannot run it, saying what to change.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if precision == Precision::Bf16 && self.device.is_cpu() && !bf16_gemm::available() {
            anyhow::bail!(
                "[finetune] precision = \"bf16\" needs a CPU with AVX512-BF16 (Intel Cooper Lake or \
                 Sapphire Rapids, AMD Zen 4 or later) or a CUDA device, and this CPU lacks it\n\
                 hint: set precision = \"f32\" (the default)"
            );
        }
        self.precision = precision;
        Ok(())
    }

    /// Training passes set a key (from seed, step and micro-batch) so LoRA dropout draws
    /// reproducible masks; evaluation passes set None: no dropout.
    pub fn set_dropout_key(&self, key: Option<u64>) {
        *self.dropout_key.lock().unwrap_or_else(|e| e.into_inner()) = key;
    }

    fn pass(&self) -> Pass {
        Pass {
            precision: self.precision,
            dropout_key: *self.dropout_key.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Every weight, by Hugging Face name (current values, trained ones included), with
    /// LoRA adapters merged into their layers: `W + (alpha / r)·B·A`. A tied vocabulary
    /// head is left out: it is the embeddings.
    pub fn weights(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        out.insert(
            "model.embed_tokens.weight".into(),
            self.embed.dense()?.clone(),
        );
        out.insert("model.norm.weight".into(), self.norm.clone());
        if !self.shape.tie_word_embeddings {
            out.insert("lm_head.weight".into(), self.head.merged_weight()?);
        }
        for (l, block) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.insert(
                format!("{p}.input_layernorm.weight"),
                block.input_norm.clone(),
            );
            out.insert(
                format!("{p}.post_attention_layernorm.weight"),
                block.post_norm.clone(),
            );
            for linear in block.linears() {
                out.insert(format!("{}.weight", linear.name), linear.merged_weight()?);
                if let Some(b) = &linear.bias {
                    out.insert(format!("{}.bias", linear.name), b.clone());
                }
            }
        }
        Ok(out)
    }

    /// The LoRA adapters, by layer name: (A `[r, in]`, B `[out, r]`, scale alpha / r).
    /// Empty when the model trains (or trained) without them.
    pub fn adapters(&self) -> Vec<(String, Tensor, Tensor, f64)> {
        self.blocks
            .iter()
            .flat_map(|b| b.linears())
            .chain(std::iter::once(&self.head))
            .filter_map(|l| {
                let a = l.lora.as_ref()?;
                Some((
                    l.name.clone(),
                    a.a.as_tensor().detach(),
                    a.b.as_tensor().detach(),
                    a.scale,
                ))
            })
            .collect()
    }

    /// Logits for final hidden states `[..., hidden]` (after the final norm).
    pub(super) fn logits(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let x = rms_norm(x, &self.norm, self.shape.rms_norm_eps)?;
        self.head.forward(&x, pass)
    }

    /// `logits` for inference, row i of `x` `[rows, hidden]` into `out[i]` (`vocab`
    /// floats): the vocabulary head's output, the largest of a step, is written where
    /// the caller keeps it instead of into a tensor that is then copied.
    pub(super) fn logits_into(&self, x: &Tensor, out: &mut [&mut [f32]]) -> Result<()> {
        let x = rms_norm(x, &self.norm, self.shape.rms_norm_eps)?;
        self.head.forward_into(&x, out)
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`; `mask` `[batch, seq]` is 1
    /// for real tokens and 0 for padding (right-padded).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let pass = self.pass();
        let (x, _) = self.run_blocks(ids, mask, &[], &pass)?;
        self.logits(&x, &pass)
    }

    /// The hidden states of a forward pass: the output of the first l blocks for each l
    /// of `layers` (1 ≤ l ≤ the layer count; Hugging Face's `hidden_states[l]`), and the
    /// final hidden state after the final norm (what the vocabulary head reads), each
    /// `[batch, seq, hidden]`; with the logits when `logits` is set. Same inputs as
    /// `forward`.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        layers: &[usize],
        logits: bool,
    ) -> Result<(Option<Tensor>, HiddenStates)> {
        let n = self.shape.num_hidden_layers;
        if let Some(l) = layers.iter().find(|&&l| l == 0 || l > n) {
            anyhow::bail!("layer {l} is outside 1..={n}, the model's blocks");
        }
        let pass = self.pass();
        let (x, layers) = self.run_blocks(ids, mask, layers, &pass)?;
        let last = rms_norm(&x, &self.norm, self.shape.rms_norm_eps)?;
        let logits = match logits {
            true => Some(self.head.forward(&last, &pass)?),
            false => None,
        };
        Ok((logits, HiddenStates { layers, last }))
    }

    /// Embeddings, then every block; the output after the blocks and the hidden state
    /// after each `keep` layer count, in `keep`'s order.
    fn run_blocks(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        keep: &[usize],
        pass: &Pass,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, t) = ids.dims2()?;
        let mut x =
            self.embed
                .lookup(&ids.flatten_all()?)?
                .reshape((b, t, self.shape.hidden_size))?;
        let mut attn =
            CausalAttention::new(&self.shape, (&self.cos, &self.sin), mask, pass.precision)?;
        let mut kept = vec![None; keep.len()];
        for (l, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, l, &mut attn, pass)?;
            for (slot, _) in kept.iter_mut().zip(keep).filter(|(_, &k)| k == l + 1) {
                *slot = Some(x.clone());
            }
        }
        let kept = kept
            .into_iter()
            .map(|s| s.context("a requested layer was not reached"))
            .collect::<Result<_>>()?;
        Ok((x, kept))
    }
}

/// Every weight the decoder reads is there with the shape the config implies.
pub fn check_weights(s: &ModelShape, weights: &BTreeMap<String, Tensor>) -> Result<()> {
    check_dims(s, |name| weights.get(name).map(|t| t.dims().to_vec()))
}

/// `check_weights` for weights stored any way: `dims` gives a name's shape, None when
/// the weight is missing.
pub fn check_dims(s: &ModelShape, dims: impl Fn(&str) -> Option<Vec<usize>>) -> Result<()> {
    let (h, kv) = (s.hidden_size, s.num_key_value_heads * s.head_dim());
    let check_shape = |name: &str, want: &[usize]| -> Result<()> {
        let got =
            dims(name).with_context(|| format!("student weights lack {name} (missing tensor)"))?;
        anyhow::ensure!(
            got == want,
            "student weight {name} has shape {got:?}, the config says {want:?}"
        );
        Ok(())
    };
    check_shape("model.embed_tokens.weight", &[s.vocab_size, h])?;
    check_shape("model.norm.weight", &[h])?;
    let f = s.intermediate_size;
    for l in 0..s.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, want) in [
            ("self_attn.q_proj", [h, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, h]),
            ("mlp.gate_proj", [f, h]),
            ("mlp.up_proj", [f, h]),
            ("mlp.down_proj", [h, f]),
        ] {
            check_shape(&format!("{p}.{name}.weight"), &want)?;
        }
        check_shape(&format!("{p}.input_layernorm.weight"), &[h])?;
        check_shape(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
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
