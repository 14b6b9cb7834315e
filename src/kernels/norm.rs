//! RMSNorm over the last dimension, with its backward pass.

use super::{f32_slice, fused};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// RMSNorm over the last dimension: `x / √(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if fused(x) && fused(w) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
    } else {
        let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?.broadcast_mul(w)
    }
}

struct RmsNorm {
    eps: f32,
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "kdpipe-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(y, x)| {
                let r = inv_rms(x, self.eps);
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// dx_k = r·g_k·w_k − (r³·x_k / d)·Σ_j g_j·w_j·x_j;  dw_j = Σ_rows g_j·x_j·r.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &RmsNormGrad { eps: self.eps })?;
        let dw = if w.is_variable() {
            let d = w.dim(0)?;
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?
                .sqrt()?
                .recip()?;
            let gx = (g * x)?.broadcast_mul(&r)?;
            // Detached: built from x, it would otherwise carry the forward graph.
            Some(gx.reshape(((), d))?.sum(0)?.detach())
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "kdpipe-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(dx, (x, g))| {
                let r = inv_rms(x, self.eps);
                let dot: f32 = g.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
                let c = r * r * r * dot / d as f32;
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    *dx = r * g * w - c * x;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_diff, weighted_grads};
    use candle_core::{Device, Var};

    #[test]
    fn fused_rms_norm_matches_the_composed_one_with_gradients() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.5, (3, 5, 8), &dev).unwrap();
        let w = Var::randn(1f32, 0.2, 8, &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (3, 5, 8), &dev).unwrap();
        let ours = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let ms = x
            .as_tensor()
            .sqr()
            .unwrap()
            .mean_keepdim(D::Minus1)
            .unwrap();
        let theirs = x
            .as_tensor()
            .broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let g1 = weighted_grads(&ours, &up);
        let g2 = weighted_grads(&theirs, &up);
        for v in [x.as_tensor(), w.as_tensor()] {
            let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(d < 1e-4, "{d}");
        }
    }
}
