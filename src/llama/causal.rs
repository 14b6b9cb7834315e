//! Attention in a training pass: every position of a right-padded batch at once, each
//! query seeing the real keys at or before it. RoPE and the fused attention op
//! (`kernels::attention`, with its backward pass) on the CPU; candle's composed ops
//! elsewhere.

use super::block::Attend;
use super::ModelShape;
use crate::config::Precision;
use crate::kernels::{attention::causal_attention, rope_heads};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;

pub struct CausalAttention<'a> {
    shape: &'a ModelShape,
    cos: Tensor,
    sin: Tensor,
    /// 1 for a real token, 0 for padding, `[batch · seq]` row-major (the fused op).
    keys: Arc<Vec<u8>>,
    /// The same as a `[batch, seq]` tensor (the composed path).
    mask: &'a Tensor,
    precision: Precision,
}

impl<'a> CausalAttention<'a> {
    /// For token ids of `seq` positions and their padding `mask` `[batch, seq]`; `cos` /
    /// `sin` the model's RoPE tables.
    pub fn new(
        shape: &'a ModelShape,
        (cos, sin): (&Tensor, &Tensor),
        mask: &'a Tensor,
        precision: Precision,
    ) -> Result<Self> {
        let t = mask.dim(1)?;
        let keys: Vec<u8> = mask
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|m| u8::from(*m > 0.5))
            .collect();
        Ok(CausalAttention {
            shape,
            cos: cos.narrow(0, 0, t)?,
            sin: sin.narrow(0, 0, t)?,
            keys: Arc::new(keys),
            mask,
            precision,
        })
    }
}

impl Attend for CausalAttention<'_> {
    fn attend(&mut self, _layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let s = self.shape;
        let (b, t, _) = q.dims3()?;
        let (nh, nkv, hd) = (s.num_attention_heads, s.num_key_value_heads, s.head_dim());
        // Queries come scaled by 1/√head_dim: cheaper on them than on the scores, and free
        // inside the fused RoPE.
        let scale = 1.0 / (hd as f64).sqrt();
        let q = rope_heads(q, nh, &self.cos, &self.sin, scale)?;
        let k = rope_heads(k, nkv, &self.cos, &self.sin, 1.0)?;
        let bf16 = self.precision == Precision::Bf16;
        if let Some(out) = causal_attention(&q, &k, v, self.keys.clone(), bf16)? {
            return Ok(out);
        }
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
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
            &scores.broadcast_add(&attention_bias(self.mask, t, q.device())?)?,
            D::Minus1,
        )?;
        Ok(probs
            .reshape((b, nkv, rep * t, t))?
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, nh * hd))?)
    }
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
