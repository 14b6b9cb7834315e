//! The SwiGLU product `silu(gate) · up` of the feed-forward layers, with its backward pass.

use super::fastmath::exp;
use super::{f32_slice, fused};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The SwiGLU product `silu(gate) · up`, elementwise. The backward pass recomputes the
/// sigmoid instead of keeping `silu(gate)`.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if fused(gate) && fused(up) && gate.shape() == up.shape() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
    } else {
        gate.silu()? * up
    }
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "kdpipe-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, u) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(4096)
            .zip(a.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(y, (a, u))| {
                for ((y, a), u) in y.iter_mut().zip(a).zip(u) {
                    *y = a / (1.0 + exp(-a)) * u;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// d gate = g · up · σ(a)(1 + a(1 − σ(a))),  d up = g · a σ(a).
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &g.contiguous()?, &SiluMulGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// Both gradients of `silu_mul` in one pass: `[2, ...]`, d gate then d up.
struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "kdpipe-silu-mul-grad"
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
        let a = f32_slice(s1, l1, self.name())?;
        let u = f32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let n = a.len();
        let mut out = vec![0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        d_gate
            .par_chunks_mut(4096)
            .zip(d_up.par_chunks_mut(4096))
            .zip(
                a.par_chunks(4096)
                    .zip(u.par_chunks(4096))
                    .zip(g.par_chunks(4096)),
            )
            .for_each(|((dg, du), ((a, u), g))| {
                for i in 0..a.len() {
                    let sig = 1.0 / (1.0 + exp(-a[i]));
                    dg[i] = g[i] * u[i] * sig * (1.0 + a[i] * (1.0 - sig));
                    du[i] = g[i] * a[i] * sig;
                }
            });
        let mut dims = vec![2];
        dims.extend(l1.shape().dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_diff, weighted_grads};
    use candle_core::{Device, Var};

    #[test]
    fn fused_silu_mul_matches_silu_times_up_with_gradients() {
        let dev = Device::Cpu;
        let a = Var::randn(0f32, 3.0, (3, 4, 9), &dev).unwrap();
        let u = Var::randn(0f32, 1.0, (3, 4, 9), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 4, 9), &dev).unwrap();
        let ours = silu_mul(a.as_tensor(), u.as_tensor()).unwrap();
        let theirs = (a.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let g1 = weighted_grads(&ours, &w);
        let g2 = weighted_grads(&theirs, &w);
        for v in [a.as_tensor(), u.as_tensor()] {
            let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(d < 1e-5, "{d}");
        }
    }
}
