//! Fused CPU kernels, with backward passes, for the hot spots of a training step: the
//! linear layers (plain and LoRA), the next-token cross-entropy over the vocabulary,
//! RMSNorm, RoPE and the SwiGLU product (attention is in `super::attention`). candle's composed versions make several passes over memory and
//! keep every intermediate until the backward pass ends (measured: 2.3 s of a 20 s step
//! for the loss, 3.7 s for 30 layers of attention softmax, SmolLM2, 4 × 256 tokens).
//! These make one pass a row, rows in parallel, and keep no intermediate. Other devices
//! and dtypes use candle's composed ops.

use super::bf16_gemm::View;
use super::fastmath::exp;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

pub(super) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("{what}: f32 only"),
    }
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [u32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: targets must be contiguous")))?;
    match s {
        CpuStorage::U32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("{what}: u32 targets only"),
    }
}

/// Whether `x` can go through the fused kernels (a CPU f32 tensor).
pub(super) fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

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

/// `x · wᵀ` for `x` `[..., in]` and `w` `[out, in]` on the CPU (f32 tensors), in f32 or,
/// with `bf16`, in bf16 operands with f32 sums (`super::mixed`). The backward pass computes
/// the weight's gradient only when `w` is a variable: candle's matmul backward also
/// computes it for a frozen weight (and adds it into a zero tensor), a third of the
/// backward matrix work in LoRA mode and for a frozen tied lm_head. Leading dimensions are
/// read as rows in place: a reshape around the product would be two more tensors in the
/// graph, each given a zero tensor and an add by candle's backward pass. `None` on other
/// devices or dtypes.
pub fn linear(x: &Tensor, w: &Tensor, bf16: bool) -> candle_core::Result<Option<Tensor>> {
    if !(fused(x) && fused(w)) || x.rank() < 2 {
        return Ok(None);
    }
    let op = LinearOp {
        bf16,
        weight_grad: w.is_variable(),
    };
    Ok(Some(x.contiguous()?.apply_op2(&w.contiguous()?, op)?))
}

/// `[..., k]` as (rows, k), and the shape `[..., n]` of a product with `n` columns.
fn rows_of(x: &Shape, n: usize) -> candle_core::Result<((usize, usize), Shape)> {
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last().filter(|_| dims.len() >= 2) else {
        candle_core::bail!("a linear layer's input needs rows: got {x:?}");
    };
    let out: Vec<usize> = lead.iter().copied().chain([n]).collect();
    Ok(((lead.iter().product(), k), Shape::from(out)))
}

/// `c (+)= scale · a · b` in f32 (the gemm crate, as candle's matmul) for strided views,
/// `c` row-major with row stride `ldc`; `accumulate` adds to what `c` holds. On every
/// rayon thread when `parallel`, else on the calling thread.
pub(super) fn f32_product(
    c: &mut [f32],
    ldc: usize,
    (a, b): (View, View),
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    super::bf16_gemm::assert_product_fits(c, ldc, &a, &b, "f32 product");
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: c spans m rows of stride ldc ≥ n and both views fit their data (asserted);
    // the gemm crate reads element (i, j) of a view at i·row_stride + j·col_stride.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `c (+)= a · b` into a row-major `c` `[a.rows, b.cols]`, in f32 or, with `bf16`, in
/// bf16 operands with f32 sums (`super::bf16_gemm`), on every rayon thread.
pub(super) fn product(c: &mut [f32], (a, b): (View, View), accumulate: bool, bf16: bool) {
    if bf16 {
        super::bf16_gemm::gemm(c, a, b, accumulate);
    } else {
        f32_product(c, b.cols, (a, b), accumulate, 1.0, true);
    }
}

/// The f32 data of a contiguous CPU tensor's storage.
pub(super) fn cpu_f32<'a>(
    s: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(cpu) => f32_slice(cpu, l, what),
        _ => candle_core::bail!("{what}: tensors must be on the CPU"),
    }
}

/// `x ⊙ mask`, elementwise.
fn masked(x: &[f32], mask: &[f32]) -> Vec<f32> {
    x.par_iter().zip(mask).map(|(x, m)| x * m).collect()
}

/// A linear layer with a frozen weight `w` `[out, in]` and a LoRA adapter `a` `[r, in]`,
/// `b` `[out, r]`: `x·wᵀ + scale·(x⊙mask)·aᵀ·bᵀ` for `x` `[..., in]`, `mask` the
/// adapter's dropout (None: no dropout). One output-sized tensor instead of four (the
/// base product, the adapter's product, their sum, and the dropped input); the backward
/// pass recomputes the rank-width product. Gradients flow to `x`, `a` and `b` only.
pub fn lora_linear(
    x: &Tensor,
    (w, bf16): (&Tensor, bool),
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let all_fused = fused(x) && fused(w) && fused(a) && fused(b);
    if !all_fused || w.is_variable() || x.rank() < 2 {
        return Ok(None);
    }
    let op = LoraLinear {
        w: w.contiguous()?,
        bf16,
        mask: mask.map(|m| m.contiguous()).transpose()?,
        scale: scale as f32,
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        op,
    )?))
}

struct LoraLinear {
    w: Tensor,
    /// The frozen weight's products in bf16 with f32 sums (`super::mixed`).
    bf16: bool,
    mask: Option<Tensor>,
    scale: f32,
}

impl LoraLinear {
    /// The dropout mask, flattened (None: no dropout).
    fn mask(&self) -> candle_core::Result<Option<Vec<f32>>> {
        self.mask
            .as_ref()
            .map(|m| m.flatten_all()?.to_vec1::<f32>())
            .transpose()
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "kdpipe-lora-linear"
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
        let a = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let (r, k2) = l2.shape().dims2()?;
        let (n, r2) = l3.shape().dims2()?;
        let ((m, k), out_shape) = rows_of(l1.shape(), n)?;
        let (n2, k3) = self.w.dims2()?;
        if k != k2 || k != k3 || r != r2 || n != n2 {
            candle_core::bail!(
                "{}: x {:?}, a {:?}, b {:?}, w {:?} do not fit",
                self.name(),
                l1.shape(),
                l2.shape(),
                l3.shape(),
                self.w.shape()
            );
        }
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let w = cpu_f32(&w_storage, w_layout, self.name())?;
        let mut dst = vec![0f32; m * n];
        let xv = View::row_major(x, m, k);
        product(
            &mut dst,
            (xv, View::row_major(w, n, k).t()),
            false,
            self.bf16,
        );
        let mask = self.mask()?;
        let dropped = mask.as_ref().map(|mask| masked(x, mask));
        let x_in = View::row_major(dropped.as_deref().unwrap_or(x), m, k);
        let mut low = vec![0f32; m * r];
        let (av, bv) = (View::row_major(a, r, k), View::row_major(b, n, r));
        f32_product(&mut low, r, (x_in, av.t()), false, self.scale, true);
        let low = View::row_major(&low, m, r);
        f32_product(&mut dst, n, (low, bv.t()), true, 1.0, true);
        Ok((CpuStorage::F32(dst), out_shape))
    }

    /// With h = scale·(x⊙mask)·aᵀ and gb = g·b:  d x = g·w + scale·(gb·a)⊙mask,
    /// d a = scale·gbᵀ·(x⊙mask),  d b = gᵀ·h. On slices: candle ops here would add
    /// element-wise passes that candle runs on one thread.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let g = g.contiguous()?;
        let ((r, k), n) = (a.dims2()?, b.dim(0)?);
        let m = x.elem_count() / k.max(1);
        let (xs, xl) = x.storage_and_layout();
        let (a_s, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (ws, wl) = self.w.storage_and_layout();
        let xd = cpu_f32(&xs, xl, name)?;
        let gv = View::row_major(cpu_f32(&gs, gl, name)?, m, n);
        let av = View::row_major(cpu_f32(&a_s, al, name)?, r, k);
        let bv = View::row_major(cpu_f32(&bs, bl, name)?, n, r);
        let wv = View::row_major(cpu_f32(&ws, wl, name)?, n, k);
        let scale = self.scale;
        let mut gb = vec![0f32; m * r];
        f32_product(&mut gb, r, (gv, bv), false, 1.0, true);
        let gbv = View::row_major(&gb, m, r);
        let mut dx = vec![0f32; m * k];
        product(&mut dx, (gv, wv), false, self.bf16);
        let mask = self.mask()?;
        match &mask {
            None => f32_product(&mut dx, k, (gbv, av), true, scale, true),
            Some(mask) => {
                let mut adapter = vec![0f32; m * k];
                f32_product(&mut adapter, k, (gbv, av), false, scale, true);
                dx.par_iter_mut()
                    .zip(adapter.par_iter().zip(mask.par_iter()))
                    .for_each(|(d, (t, keep))| *d += t * keep);
            }
        }
        let dropped = mask.as_ref().map(|mask| masked(xd, mask));
        let x_in = View::row_major(dropped.as_deref().unwrap_or(xd), m, k);
        let mut da = vec![0f32; r * k];
        f32_product(&mut da, k, (gbv.t(), x_in), false, scale, true);
        let mut h = vec![0f32; m * r];
        f32_product(&mut h, r, (x_in, av.t()), false, scale, true);
        let mut db = vec![0f32; n * r];
        f32_product(
            &mut db,
            r,
            (gv.t(), View::row_major(&h, m, r)),
            false,
            1.0,
            true,
        );
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(da, (r, k), device)?),
            Some(Tensor::from_vec(db, (n, r), device)?),
        ))
    }
}

/// `x · wᵀ` for `x` `[..., in]` and `w` `[out, in]`, the product in f32 or, with `bf16`,
/// in bf16 operands with f32 sums (`super::mixed`). The backward pass computes the weight's
/// gradient only with `weight_grad`.
pub(super) struct LinearOp {
    pub bf16: bool,
    pub weight_grad: bool,
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "kdpipe-linear"
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
        let (n, k2) = l2.shape().dims2()?;
        let ((m, k), out_shape) = rows_of(l1.shape(), n)?;
        if k != k2 {
            candle_core::bail!("{}: x {:?} and w {:?}", self.name(), l1.shape(), l2.shape());
        }
        let mut dst = vec![0f32; m * n];
        let (xv, wv) = (View::row_major(x, m, k), View::row_major(w, n, k));
        product(&mut dst, (xv, wv.t()), false, self.bf16);
        Ok((CpuStorage::F32(dst), out_shape))
    }

    /// d x = g · w, d w = gᵀ · x, both in the forward pass's precision.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let g = g.contiguous()?;
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let gv = View::row_major(cpu_f32(&gs, gl, name)?, m, n);
        let mut dx = vec![0f32; m * k];
        product(
            &mut dx,
            (gv, View::row_major(cpu_f32(&ws, wl, name)?, n, k)),
            false,
            self.bf16,
        );
        let dw = if self.weight_grad {
            let xv = View::row_major(cpu_f32(&xs, xl, name)?, m, k);
            let mut dw = vec![0f32; n * k];
            product(&mut dw, (gv.t(), xv), false, self.bf16);
            Some(Tensor::from_vec(dw, (n, k), w.device())?)
        } else {
            None
        };
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), dw))
    }
}

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
    use crate::student::{max_diff, weighted_grads};
    use candle_core::{Device, Var};

    #[test]
    fn linear_reads_leading_dims_as_rows_and_gives_a_frozen_weight_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 5, 7), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (2, 5, 3), &dev).unwrap();
        let frozen = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        let trainable = Var::from_tensor(&frozen).unwrap();
        for w in [&frozen, trainable.as_tensor()] {
            let ours = linear(x.as_tensor(), w, false).unwrap().unwrap();
            assert_eq!(ours.dims(), &[2, 5, 3]);
            let theirs = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-5);
            let g1 = weighted_grads(&ours, &up);
            let g2 = weighted_grads(&theirs, &up);
            let (ours_dx, theirs_dx) = (
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            assert_eq!(ours_dx.dims(), &[2, 5, 7]);
            assert!(max_diff(ours_dx, theirs_dx) < 1e-5);
            match (g1.get(w), w.is_variable()) {
                (None, false) => {}
                (Some(dw), true) => {
                    let d = max_diff(dw, g2.get(w).unwrap());
                    assert!(d < 1e-5, "dw differs by {d}");
                }
                (got, trained) => panic!(
                    "weight gradient {:?} for a weight trained: {trained}",
                    got.is_some()
                ),
            }
        }
    }

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

    #[test]
    fn fused_lora_linear_matches_the_composed_adapter_with_gradients() {
        let dev = Device::Cpu;
        let (rows, inp, out, r) = (6, 10, 7, 3);
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (rows, out), &dev).unwrap();
        let mask = Tensor::from_vec(
            (0..rows * inp)
                .map(|i| if i % 3 == 0 { 0f32 } else { 1.5 })
                .collect::<Vec<_>>(),
            (rows, inp),
            &dev,
        )
        .unwrap();
        // The base product in f32, and in bf16 (operands rounded: a looser tolerance).
        let cases = [
            (None, false),
            (Some(mask.clone()), false),
            (Some(mask), true),
        ];
        for (mask, bf16) in cases {
            if bf16
                && !super::super::bf16_gemm::testable(
                    "ops::fused_lora_linear_matches_the_composed_adapter_with_gradients",
                )
            {
                continue;
            }
            let (tol, grad_tol) = if bf16 { (5e-2, 5e-2) } else { (1e-5, 1e-4) };
            let x = Var::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
            let a = Var::randn(0f32, 0.5, (r, inp), &dev).unwrap();
            let b = Var::randn(0f32, 0.5, (out, r), &dev).unwrap();
            let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
            let ours = lora_linear(xt, (&w, bf16), at, bt, 2.0, mask.clone())
                .unwrap()
                .unwrap();
            let xin = match &mask {
                Some(m) => (xt * m).unwrap(),
                None => xt.clone(),
            };
            let adapter = xin
                .matmul(&at.t().unwrap())
                .unwrap()
                .matmul(&bt.t().unwrap())
                .unwrap();
            let theirs = (xt.matmul(&w.t().unwrap()).unwrap() + (adapter * 2.0).unwrap()).unwrap();
            let d = max_diff(&ours, &theirs);
            assert!(d < tol && (d > 0.0 || !bf16), "{d}");
            let g1 = weighted_grads(&ours, &up);
            let g2 = weighted_grads(&theirs, &up);
            for v in [xt, at, bt] {
                let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(d < grad_tol, "{d}");
            }
            assert!(g1.get(&w).is_none(), "the frozen weight gets no gradient");
        }
    }

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
