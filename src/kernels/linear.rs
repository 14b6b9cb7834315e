//! Linear layers: `x · wᵀ` in f32 or in bf16 operands with f32 sums, and a frozen weight
//! with a LoRA adapter (Hu et al., 2021) in one op; both with backward passes that skip
//! the frozen weight's gradient. On other devices, `linear_bf16_cast` is the mixed-precision
//! product through casts.

use super::bf16_gemm::View;
use super::gemm::{f32_product, product};
use super::{cpu_f32, f32_slice, fused};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `x · wᵀ` for `x` `[..., in]` and `w` `[out, in]` on the CPU (f32 tensors), in f32 or,
/// with `bf16`, in bf16 operands with f32 sums (`super::bf16_gemm`). The backward pass computes
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
    /// The frozen weight's products in bf16 with f32 sums (`super::bf16_gemm`).
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
/// in bf16 operands with f32 sums (`super::bf16_gemm`). The backward pass computes the weight's
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

/// `x · wᵀ` for `x` `[..., in]` and `w` `[out, in]` with bf16 operands and f32 sums, on
/// devices without the fused CPU op (`linear`, which callers try first): candle's bf16
/// matmul between casts. Gradients flow to `x`, and to `w` when it is a variable.
pub fn linear_bf16_cast(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let bf16 = DType::BF16;
    x.to_dtype(bf16)?
        .broadcast_matmul(&w.to_dtype(bf16)?.t()?)?
        .to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_diff, seeded_uniform as random, weighted_grads};
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
    fn fused_lora_linear_matches_the_composed_adapter_with_gradients() {
        let (rows, inp, out, r) = (6, 10, 7, 3);
        // Seeded inputs: the bf16 case's error depends on the values, so a fresh draw per
        // run would make its check a lottery.
        let w = random((out, inp), 11);
        let up = random((rows, out), 12);
        let mask = Tensor::from_vec(
            (0..rows * inp)
                .map(|i| if i % 3 == 0 { 0f32 } else { 1.5 })
                .collect::<Vec<_>>(),
            (rows, inp),
            &Device::Cpu,
        )
        .unwrap();
        let cases = [
            (None, false),
            (Some(mask.clone()), false),
            (Some(mask), true),
        ];
        for (case, (mask, bf16)) in cases.into_iter().enumerate() {
            if bf16
                && !super::super::bf16_gemm::testable(
                    "linear::fused_lora_linear_matches_the_composed_adapter_with_gradients",
                )
            {
                continue;
            }
            let seed = 20 + 3 * case as u64;
            let x = Var::from_tensor(&random((rows, inp), seed)).unwrap();
            let a = Var::from_tensor(&(random((r, inp), seed + 1) * 0.5).unwrap()).unwrap();
            let b = Var::from_tensor(&(random((out, r), seed + 2) * 0.5).unwrap()).unwrap();
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
            // The frozen weight's products: exact up to f32 sums, or (bf16) each operand
            // rounded to 8 significant bits, so each term is off by at most 2⁻⁷ of itself.
            let base_bound = |p: &Tensor, q: &Tensor| {
                let abs_product = p.abs().unwrap().matmul(&q.abs().unwrap()).unwrap();
                (abs_product * if bf16 { 1.01 / 128.0 } else { 0.0 }).unwrap() + 1e-5
            };
            let within = |ours: &Tensor, theirs: &Tensor, bound: Tensor| {
                let excess = ((ours - theirs).unwrap().abs().unwrap() - bound).unwrap();
                excess.max_all().unwrap().to_scalar::<f32>().unwrap()
            };
            let excess = within(&ours, &theirs, base_bound(xt, &w.t().unwrap()).unwrap());
            assert!(excess <= 0.0, "output past its bound by {excess}");
            let d = max_diff(&ours, &theirs);
            assert!(d > 0.0 || !bf16, "the base product was not rounded to bf16");
            let g1 = weighted_grads(&ours, &up);
            let g2 = weighted_grads(&theirs, &up);
            // dx goes through the frozen weight (up · w); the adapter's gradients are f32.
            let dx_bound = base_bound(&up, &w).unwrap();
            let excess = within(g1.get(xt).unwrap(), g2.get(xt).unwrap(), dx_bound);
            assert!(excess <= 0.0, "dx past its bound by {excess}");
            for v in [at, bt] {
                let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(d < 1e-4, "adapter gradient differs by {d}");
            }
            assert!(g1.get(&w).is_none(), "the frozen weight gets no gradient");
        }
    }

    /// Largest |a − b| relative to the largest |b|.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        (diff / scale).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn bf16_linear_matches_f32_values_and_gradients_to_bf16_precision() {
        if !super::super::bf16_gemm::testable(
            "linear::bf16_linear_matches_f32_values_and_gradients_to_bf16_precision",
        ) {
            return;
        }
        let x = Var::from_tensor(&random((37, 70), 1)).unwrap();
        let w = Var::from_tensor(&random((45, 70), 2)).unwrap();
        let up = random((37, 45), 3); // a fixed upstream gradient through the sum below
        let y16 = linear(x.as_tensor(), w.as_tensor(), true).unwrap().unwrap();
        let y32 = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        // Operands rounded to 8 mantissa bits: errors near 2⁻⁸ of each product, which
        // partly cancel over 70 terms.
        assert!(
            rel_err(&y16, &y32) < 1e-2,
            "forward {}",
            rel_err(&y16, &y32)
        );
        assert!(
            rel_err(&y16, &y32) > 0.0,
            "the products were not rounded to bf16"
        );
        let g16 = (&y16 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g32 = (&y32 * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &x), ("w", &w)] {
            let (a, b) = (g16.get(v).unwrap(), g32.get(v).unwrap());
            assert_eq!(a.dims(), b.dims(), "{name}");
            assert!(rel_err(a, b) < 1e-2, "d{name}: {}", rel_err(a, b));
        }
    }
}
