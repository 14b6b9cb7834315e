//! One linear layer of the decoder: its weight (trainable or frozen, stored `[out, in]`
//! for training or `[in, out]` for inference), its optional bias, and its optional LoRA
//! adapter (Hu et al., 2021). The forward pass picks the fused CPU op where it applies
//! (`kernels::linear`) and candle's products elsewhere.

use crate::config::{LoraConfig, Precision};
use crate::kernels;
use crate::kernels::quant::QMatrix;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;

/// How a weight is stored.
#[derive(Clone)]
pub enum Weight {
    /// `[out, in]`, as Hugging Face stores it: what training reads and updates.
    OutIn(Tensor),
    /// `[in, out]`: the matrix kernel reads it in place; `[out, in]` it would copy (pack)
    /// the whole weight at every call, which for the few rows of a batched decoding step
    /// cost more than the product itself (perf: 42 % of decoding time). Inference only.
    InOut(Tensor),
    /// `[out, in]` in its GGUF block format (`kernels::quant`): the file's bytes a
    /// parameter instead of 4. Inference only, on the CPU.
    Quantized(Arc<QMatrix>),
}

impl Weight {
    /// Whether this is a weight stored for inference only.
    pub fn is_inference(&self) -> bool {
        !matches!(self, Weight::OutIn(_))
    }
}

/// A low-rank adapter on a frozen linear layer: `W x + s·B(A x)` with A `[r, in]`, B
/// `[out, r]`, s = alpha / r. B starts at zero, so training starts from the base model.
#[derive(Clone)]
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    /// Input dropout rate (applied only in passes that carry a dropout key).
    pub dropout: f64,
}

#[derive(Clone)]
pub struct Linear {
    /// The Hugging Face name of the layer (`model.layers.0.self_attn.q_proj`): the export
    /// names its tensors from it, and LoRA dropout salts its masks with it.
    pub name: String,
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

/// What one forward pass asks of every layer: the products' arithmetic, and the key of
/// this pass's LoRA dropout masks (None: no dropout, as in evaluation).
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    pub precision: Precision,
    pub dropout_key: Option<u64>,
}

impl Pass {
    /// Inference: f32, no dropout.
    pub const INFERENCE: Pass = Pass {
        precision: Precision::F32,
        dropout_key: None,
    };
}

impl Linear {
    /// A layer with an `[out, in]` weight, as training reads it.
    pub fn new(name: String, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::with_weight(name, Weight::OutIn(weight), bias)
    }

    pub fn with_weight(name: String, weight: Weight, bias: Option<Tensor>) -> Self {
        Linear {
            name,
            weight,
            bias,
            lora: None,
        }
    }

    /// Rows of the output (`out`), whatever the storage.
    pub fn out_features(&self) -> Result<usize> {
        Ok(match &self.weight {
            Weight::OutIn(w) => w.dim(0)?,
            Weight::InOut(w) => w.dim(1)?,
            Weight::Quantized(q) => q.rows,
        })
    }

    /// The `[out, in]` weight training reads; an error for inference-only storage.
    fn out_in(&self) -> Result<&Tensor> {
        match &self.weight {
            Weight::OutIn(w) => Ok(w),
            _ => anyhow::bail!(
                "{}: an inference-only layer has no trainable or exportable weight",
                self.name
            ),
        }
    }

    /// Store the weight for inference: `[in, out]` (a quantized weight stays as it is).
    pub fn make_inference(&mut self) -> Result<()> {
        anyhow::ensure!(
            self.lora.is_none(),
            "{}: a layer with an adapter cannot be served (merge it first)",
            self.name
        );
        if let Weight::OutIn(w) = &self.weight {
            self.weight = Weight::InOut(w.t()?.contiguous()?);
        }
        Ok(())
    }

    /// Add a LoRA adapter; A is drawn uniformly from ±1/√in with `rng`, B is zero. Returns
    /// the new trainable variables, named as PEFT names them.
    pub fn add_lora(
        &mut self,
        cfg: &LoraConfig,
        rng: &mut impl rand::Rng,
        device: &Device,
    ) -> Result<Vec<(String, Var)>> {
        let (out, inp) = self.out_in()?.dims2()?;
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..cfg.rank * inp)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, inp), device)?)?;
        let b = Var::zeros((out, cfg.rank), DType::F32, device)?;
        let vars = vec![
            (format!("{}.lora_A.weight", self.name), a.clone()),
            (format!("{}.lora_B.weight", self.name), b.clone()),
        ];
        self.lora = Some(Lora {
            a,
            b,
            scale: cfg.alpha / cfg.rank as f64,
            dropout: cfg.dropout,
        });
        Ok(vars)
    }

    /// The weight with the adapter merged in: `W + s·B·A` (`[out, in]`).
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = self.out_in()?;
        Ok(match &self.lora {
            Some(l) => (w + (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?)?,
            None => w.clone(),
        })
    }

    /// The dropout of this pass on the adapter's input: rate and mask key (each layer's
    /// key mixes in a hash of its name), or None.
    fn dropout(&self, pass: &Pass) -> Option<(f64, u64)> {
        let l = self.lora.as_ref()?;
        let key = pass.dropout_key?;
        (l.dropout > 0.0).then(|| {
            (
                l.dropout,
                key ^ crate::io::atomic::seed_from_text(&self.name),
            )
        })
    }

    /// `x · Wᵀ (+ bias) (+ adapter)` for `x` `[..., in]`.
    pub fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let bf16 = pass.precision == Precision::Bf16;
        let dropout = self.dropout(pass);
        let y = match (&self.lora, &self.weight) {
            (Some(l), Weight::OutIn(w)) => {
                let mask = dropout
                    .map(|(p, key)| dropout_mask(x, p, key))
                    .transpose()?;
                let fused = kernels::lora_linear(
                    x,
                    (w, bf16),
                    l.a.as_tensor(),
                    l.b.as_tensor(),
                    l.scale,
                    mask.clone(),
                )?;
                match fused {
                    Some(y) => y,
                    None => {
                        let xa = match &mask {
                            Some(m) => (x * m)?,
                            None => x.clone(),
                        };
                        // Scaled at rank width, not at the output's: one fewer output-sized
                        // tensor.
                        let low = (product_t(&xa, l.a.as_tensor(), false)? * l.scale)?;
                        (product_t(x, w, bf16)? + product_t(&low, l.b.as_tensor(), false)?)?
                    }
                }
            }
            (None, Weight::OutIn(w)) => product_t(x, w, bf16)?,
            (_, Weight::InOut(w)) => product_rows(x, w)?,
            (_, Weight::Quantized(q)) => quantized_product(x, q)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// `forward` for inference, row i of the result (`out` floats) written into `out[i]`:
    /// a quantized weight without a bias computes straight into those rows, anything else
    /// through `forward` and a copy.
    pub fn forward_into(&self, x: &Tensor, out: &mut [&mut [f32]]) -> Result<()> {
        if let (Weight::Quantized(q), None, None) = (&self.weight, &self.bias, &self.lora) {
            return Ok(kernels::with_f32_values(x, |x| q.matmul_into(x, out))??);
        }
        let y = self.forward(x, &Pass::INFERENCE)?;
        let width = self.out_features()?;
        kernels::with_f32_values(&y, |y| {
            anyhow::ensure!(
                y.len() == out.len() * width,
                "{}: {} rows of output for {} buffers",
                self.name,
                y.len() / width.max(1),
                out.len()
            );
            for (row, values) in out.iter_mut().zip(y.chunks_exact(width)) {
                row.copy_from_slice(values);
            }
            Ok(())
        })?
    }
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

/// `x · wᵀ` for `x` `[..., in]` and `w` `[out, in]`: the fused linear op on the CPU,
/// elsewhere one 2-D product (a batched matmul against a broadcast weight is several
/// times slower, forward and backward, measured on the CPU backend).
pub fn product_t(x: &Tensor, w: &Tensor, bf16: bool) -> candle_core::Result<Tensor> {
    if let Some(y) = kernels::linear(x, w, bf16)? {
        return Ok(y);
    }
    let dims = x.dims().to_vec();
    let x2 = x.reshape(((), dims[dims.len() - 1]))?;
    let y = if bf16 {
        kernels::linear_bf16_cast(&x2, w)?
    } else {
        x2.matmul(&w.t()?)?
    };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    y.reshape(out)
}

/// `x · w` for `x` `[..., in]` and `w` `[in, out]` (inference weights), as one 2-D
/// product. A single row is padded to two: for one row the matrix kernel takes a
/// matrix-vector path that sums in another order, so a sequence decoded alone would get
/// logits differing in the last bits from the same sequence in a batch, and a resumed run
/// could write a different reply than an uninterrupted one. From two rows on, every row's
/// result is independent of the others (the kernel's k blocking depends on k only).
pub fn product_rows(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
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

/// `x · wᵀ` for `x` `[..., in]` (f32, CPU) and a block-quantized `w` `[out, in]`.
fn quantized_product(x: &Tensor, w: &QMatrix) -> candle_core::Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let y = crate::kernels::with_f32_values(x, |x| w.matmul(x))??;
    if let Some(last) = dims.last_mut() {
        *last = w.rows;
    }
    Tensor::from_vec(y, dims, x.device())
}
