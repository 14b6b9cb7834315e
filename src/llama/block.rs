//! One transformer block of the llama family, written once for training and inference:
//! RMSNorm, the query/key/value projections, attention, the output projection and a
//! residual; RMSNorm, the SwiGLU feed-forward layer and a residual. Only attention's core
//! differs between a training pass (the whole sequence at once, causal and padding masks,
//! `super::causal`) and an inference step (new rows against each sequence's key/value
//! cache, `super::infer`): the caller hands the block the one it needs.

use super::linear::{Linear, Pass, Weight};
use super::ModelShape;
use crate::kernels::{rms_norm, silu_mul};
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;

/// How attention turns a layer's projections into its output: RoPE at the right
/// positions, the keys and values each query may see, softmax, the weighted values.
pub trait Attend {
    /// `q` `[..., heads · head_dim]`, `k` and `v` `[..., kv_heads · head_dim]` (bias
    /// added, RoPE not yet applied) → the attention output `[..., heads · head_dim]`.
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;
}

#[derive(Clone)]
pub struct Block {
    pub input_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    eps: f64,
}

/// The linear layers of a block, by their Hugging Face suffix.
pub const LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Where a block's tensors come from, by Hugging Face name: dense tensors (norms,
/// biases) and the linear layers' weights, each taken once.
pub trait BlockWeights {
    /// A dense tensor; None when there is none of that name.
    fn take(&mut self, name: &str) -> Option<Tensor>;
    /// A linear layer's weight (`<layer>.weight`).
    fn take_weight(&mut self, name: &str) -> Result<Weight>;
}

/// Dense weights by name, `[out, in]` as training reads them.
impl BlockWeights for BTreeMap<String, Tensor> {
    fn take(&mut self, name: &str) -> Option<Tensor> {
        self.remove(name)
    }

    fn take_weight(&mut self, name: &str) -> Result<Weight> {
        self.remove(name)
            .map(Weight::OutIn)
            .with_context(|| format!("student weights lack {name} (missing tensor)"))
    }
}

impl Block {
    /// Take layer `l`'s tensors out of `weights` (Hugging Face names).
    pub fn load(shape: &ModelShape, l: usize, weights: &mut impl BlockWeights) -> Result<Self> {
        let p = format!("model.layers.{l}");
        let mut norm = |name: String| -> Result<Tensor> {
            weights
                .take(&name)
                .with_context(|| format!("student weights lack {name} (missing tensor)"))
        };
        let input_norm = norm(format!("{p}.input_layernorm.weight"))?;
        let post_norm = norm(format!("{p}.post_attention_layernorm.weight"))?;
        let mut linear = |suffix: &str| -> Result<Linear> {
            let name = format!("{p}.{suffix}");
            let weight = weights.take_weight(&format!("{name}.weight"))?;
            let bias = weights.take(&format!("{name}.bias"));
            Ok(Linear::with_weight(name, weight, bias))
        };
        Ok(Block {
            q: linear("self_attn.q_proj")?,
            k: linear("self_attn.k_proj")?,
            v: linear("self_attn.v_proj")?,
            o: linear("self_attn.o_proj")?,
            gate: linear("mlp.gate_proj")?,
            up: linear("mlp.up_proj")?,
            down: linear("mlp.down_proj")?,
            input_norm,
            post_norm,
            eps: shape.rms_norm_eps,
        })
    }

    pub fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    pub fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }

    /// `x` `[..., hidden]` through the block; `layer` is this block's index, for `attn`.
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        attn: &mut dyn Attend,
        pass: &Pass,
    ) -> Result<Tensor> {
        let h = rms_norm(x, &self.input_norm, self.eps)?;
        let (q, k, v) = (
            self.q.forward(&h, pass)?,
            self.k.forward(&h, pass)?,
            self.v.forward(&h, pass)?,
        );
        let out = attn.attend(layer, &q, &k, &v)?;
        let x = (x + self.o.forward(&out, pass)?)?;
        let h = rms_norm(&x, &self.post_norm, self.eps)?;
        let gate = self.gate.forward(&h, pass)?;
        let up = self.up.forward(&h, pass)?;
        Ok((&x + self.down.forward(&silu_mul(&gate, &up)?, pass)?)?)
    }
}
