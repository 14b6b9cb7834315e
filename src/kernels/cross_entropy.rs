//! The next-token cross-entropy over a vocabulary, row by row: the loss of a training
//! step's largest tensor (rows × vocabulary logits), in one pass a row.

use super::fastmath::exp;
use super::{f32_slice, fused, u32_slice};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Cross-entropy of each row of `logits` `[n, vocab]` against `targets` `[n]` (u32):
/// `logsumexp(row) − row[target]`, shape `[n]`.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if fused(logits) {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropy)
    } else {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        logp.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)?
            .neg()
    }
}

struct CrossEntropy;

/// logsumexp of a row.
fn lse(x: &[f32]) -> f32 {
    let max = super::fastmath::max(x);
    max + super::fastmath::sum_exp(x, max).ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "kdpipe-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let t = u32_slice(s2, l2, self.name())?;
        let (n, v) = l1.shape().dims2()?;
        if t.len() != n {
            candle_core::bail!("{}: {} targets for {n} rows", self.name(), t.len());
        }
        let out: Vec<f32> = x
            .par_chunks(v)
            .zip(t.par_iter())
            .map(|(row, &t)| lse(row) - row.get(t as usize).copied().unwrap_or(0.0))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(t, &g.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(dx), None))
    }
}

/// d logits = g_i · (softmax(row) − onehot(target)), row by row.
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "kdpipe-cross-entropy-grad"
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
        let t = u32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let (_, v) = l1.shape().dims2()?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(t.par_iter().zip(g.par_iter()))
            .for_each(|((dx, row), (&t, &g))| {
                if g == 0.0 {
                    return; // masked position: its gradient stays zero
                }
                let l = lse(row);
                for (d, x) in dx.iter_mut().zip(row) {
                    *d = g * exp(x - l);
                }
                if let Some(d) = dx.get_mut(t as usize) {
                    *d -= g;
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
    fn fused_cross_entropy_matches_log_softmax_and_gather() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 3.0, (6, 11), &dev).unwrap();
        let t = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &dev).unwrap();
        let w = Tensor::new(&[1f32, 0.5, 0.0, 2.0, 1.0, 0.25], &dev).unwrap();
        let ours = cross_entropy_rows(x.as_tensor(), &t).unwrap();
        let logp = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1).unwrap();
        let theirs = logp
            .gather(&t.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let g1 = weighted_grads(&ours, &w);
        let g2 = weighted_grads(&theirs, &w);
        let (a, b) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(max_diff(a, b) < 1e-5, "{}", max_diff(a, b));
    }
}
