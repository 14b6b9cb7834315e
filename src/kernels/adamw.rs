//! The AdamW update (Loshchilov & Hutter, 2019) in place on CPU f32 tensors: one pass over
//! the moments and one over the weights, no temporary tensors (the composed version
//! allocates and walks about ten weight-sized tensors a step), split across threads. And
//! the squared L2 norm of a gradient for clipping, summed in a fixed order so every run
//! gets the same norm (exact resume depends on it).

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor};
use rayon::prelude::*;

/// Σ g², in f64 over f32 partial sums, without a temporary tensor on the CPU.
pub fn sum_of_squares(g: &Tensor) -> candle_core::Result<f64> {
    if g.device().is_cpu() && g.dtype() == candle_core::DType::F32 {
        let (storage, layout) = g.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            // Chunk sums in parallel, added in chunk order: the same norm on every run.
            let chunks: Vec<f64> = v[a..b]
                .par_chunks(4096)
                .map(|c| super::fastmath::dot(c, c) as f64)
                .collect();
            return Ok(chunks.iter().sum());
        }
    }
    Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)
}

/// Elements per parallel task: element-wise work, split across the threads.
const CHUNK: usize = 1 << 16;

pub struct Hyper {
    /// Multiplies the gradient: 1 / micro-batches, times the clipping factor.
    pub grad_scale: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub correction1: f32,
    pub correction2: f32,
    pub lr: f32,
    /// 1 − lr·λ.
    pub decay: f32,
    pub eps: f32,
}

pub fn applies(var: &Tensor, g: &Tensor) -> bool {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    cpu_f32(var) && cpu_f32(g) && var.is_contiguous() && g.is_contiguous()
}

pub fn update(
    var: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: &Hyper,
) -> candle_core::Result<()> {
    m.inplace_op2(g, &Moments { h, second: false })?;
    v.inplace_op2(g, &Moments { h, second: true })?;
    var.inplace_op3(m, v, &Weights { h })
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("fused AdamW: contiguous f32 only"),
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("fused AdamW: contiguous f32 only"),
    }
}

/// m ← β₁·m + (1 − β₁)·ĝ, or v ← β₂·v + (1 − β₂)·ĝ², with ĝ = grad_scale·g.
struct Moments<'a> {
    h: &'a Hyper,
    second: bool,
}

impl InplaceOp2 for Moments<'_> {
    fn name(&self) -> &'static str {
        "kdpipe-adamw-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = slice(s2, l2)?;
        let m = slice_mut(s1, l1)?;
        if m.len() != g.len() {
            candle_core::bail!("fused AdamW: moment and gradient sizes differ");
        }
        let (k, second) = (self.h.grad_scale, self.second);
        let b = if second { self.h.beta2 } else { self.h.beta1 };
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, g) in m.iter_mut().zip(g) {
                    let g = g * k;
                    let term = if second { g * g } else { g };
                    *m = *m * b + term * (1.0 - b);
                }
            });
        Ok(())
    }
}

/// θ ← θ·(1 − lr·λ) − lr·(m / c₁) / (√(v / c₂) + ε).
struct Weights<'a> {
    h: &'a Hyper,
}

impl InplaceOp3 for Weights<'_> {
    fn name(&self) -> &'static str {
        "kdpipe-adamw-weights"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (m, v) = (slice(s2, l2)?, slice(s3, l3)?);
        let w = slice_mut(s1, l1)?;
        if w.len() != m.len() || w.len() != v.len() {
            candle_core::bail!("fused AdamW: weight and moment sizes differ");
        }
        let h = self.h;
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(w, (m, v))| {
                for ((w, m), v) in w.iter_mut().zip(m).zip(v) {
                    let update = (m / h.correction1) / ((v / h.correction2).sqrt() + h.eps);
                    *w = *w * h.decay - update * h.lr;
                }
            });
        Ok(())
    }
}
