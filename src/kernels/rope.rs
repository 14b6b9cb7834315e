//! Rotary position embeddings (the half-rotation form of Llama and Qwen2): the training op
//! on tensors, with its backward pass, and the inference rotation of rows in place.

use super::{f32_slice, fused};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// RoPE (the half-rotation form of Llama and Qwen2) of a projection `y`
/// `[batch, seq, heads · head_dim]`, returned as `[batch, heads, seq, head_dim]` times
/// `scale`: the split into heads, the transpose, the rotation and the scaling in one pass.
/// `cos`, `sin` `[seq, head_dim / 2]`. The backward pass is the inverse rotation and
/// transpose, in one pass too.
pub fn rope_heads(
    y: &Tensor,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, t, width) = y.dims3()?;
    let hd = width / heads;
    if fused(y) && fused(cos) && fused(sin) {
        let op = RopeHeads {
            heads,
            scale: scale as f32,
            inverse: false,
        };
        y.contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)
    } else {
        let x = y
            .reshape((b, t, heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        candle_nn::rotary_emb::rope_slow(&x, cos, sin)? * scale
    }
}

/// Forward: `[b, t, n·hd]` → `[b, n, t, hd]`, rotated by +θ. Inverse (the backward pass):
/// `[b, n, t, hd]` → `[b, t, n·hd]`, rotated by −θ. Both times `scale`.
struct RopeHeads {
    heads: usize,
    scale: f32,
    inverse: bool,
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "kdpipe-rope-heads"
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
        let cos = f32_slice(s2, l2, self.name())?;
        let sin = f32_slice(s3, l3, self.name())?;
        let n = self.heads;
        let (b, t, hd, out_shape) = if self.inverse {
            let (b, n2, t, hd) = l1.shape().dims4()?;
            if n2 != n {
                candle_core::bail!("{}: {n2} heads, expected {n}", self.name());
            }
            (b, t, hd, Shape::from((b, t, n * hd)))
        } else {
            let (b, t, width) = l1.shape().dims3()?;
            if width % n != 0 {
                candle_core::bail!("{}: width {width} is not {n} heads", self.name());
            }
            (b, t, width / n, Shape::from((b, n, t, width / n)))
        };
        let half = hd / 2;
        if hd % 2 != 0 || cos.len() != t * half || sin.len() != t * half {
            candle_core::bail!(
                "{}: head_dim {hd}, seq {t}: cos/sin must be [{t}, {half}]",
                self.name()
            );
        }
        let (scale, sign) = (self.scale, if self.inverse { -1f32 } else { 1f32 });
        // (position, head) → offset of that head's vector in the [b, t, n·hd] and the
        // [b, n, t, hd] layouts, within one batch row.
        let seq_major = |i: usize, h: usize| (i * n + h) * hd;
        let head_major = |i: usize, h: usize| (h * t + i) * hd;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * n * hd)
            .zip(x.par_chunks(t * n * hd))
            .for_each(|(dst, src)| {
                for h in 0..n {
                    for i in 0..t {
                        let (from, to) = if self.inverse {
                            (head_major(i, h), seq_major(i, h))
                        } else {
                            (seq_major(i, h), head_major(i, h))
                        };
                        let (c, s) = (&cos[i * half..][..half], &sin[i * half..][..half]);
                        let (x1, x2) = src[from..from + hd].split_at(half);
                        let (y1, y2) = dst[to..to + hd].split_at_mut(half);
                        for j in 0..half {
                            let sj = sign * s[j];
                            y1[j] = (x1[j] * c[j] - x2[j] * sj) * scale;
                            y2[j] = (x2[j] * c[j] + x1[j] * sj) * scale;
                        }
                    }
                }
            });
        debug_assert_eq!(out.len(), b * t * n * hd);
        Ok((CpuStorage::F32(out), out_shape))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = RopeHeads {
            heads: self.heads,
            scale: self.scale,
            inverse: !self.inverse,
        };
        let dy = g.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dy), None, None))
    }
}
/// Rotate-half RoPE in place on rows of `heads × hd` floats (inference: each row a token
/// at its own position); `cos` / `sin` hold `hd / 2` floats a row, for that row's position.
pub fn rope_rows(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_diff, weighted_grads};
    use candle_core::{Device, Var};

    #[test]
    fn fused_rope_heads_matches_transpose_then_rope_slow_with_gradients() {
        let dev = Device::Cpu;
        let (b, t, n, hd) = (2, 5, 3, 8);
        let y = Var::randn(0f32, 1.0, (b, t, n * hd), &dev).unwrap();
        let cos = Tensor::randn(0f32, 1.0, (t, hd / 2), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (t, hd / 2), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (b, n, t, hd), &dev).unwrap();
        let ours = rope_heads(y.as_tensor(), n, &cos, &sin, 0.25).unwrap();
        let x = y
            .as_tensor()
            .reshape((b, t, n, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let theirs = (candle_nn::rotary_emb::rope_slow(&x, &cos, &sin).unwrap() * 0.25).unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        assert!(max_diff(&ours, &theirs) < 1e-6);
        let g1 = weighted_grads(&ours, &up);
        let g2 = weighted_grads(&theirs, &up);
        let d = max_diff(
            g1.get(y.as_tensor()).unwrap(),
            g2.get(y.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
    }
}
