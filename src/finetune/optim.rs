//! AdamW with decoupled weight decay (Loshchilov & Hutter, 2019), as PyTorch's
//! `torch.optim.AdamW` computes it, with its state in the open so a checkpoint can hold it:
//!
//! ```text
//! θ ← θ − lr·λ·θ
//! m ← β₁·m + (1 − β₁)·g          v ← β₂·v + (1 − β₂)·g²
//! θ ← θ − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
//! ```
//!
//! plus clipping of the gradients' global L2 norm and accumulation over micro-batches.

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

pub struct AdamW {
    vars: Vec<(String, Var)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    /// Steps taken (t in the bias corrections).
    pub step: usize,
    pub lr: f64,
    pub weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

/// Gradients summed over the micro-batches of one optimizer step.
pub struct Accumulated {
    grads: Vec<Option<Tensor>>,
    pub micro_batches: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, lr: f64, weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let first = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        let second = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            vars,
            first,
            second,
            step: 0,
            lr,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    pub fn accumulator(&self) -> Accumulated {
        Accumulated {
            grads: vec![None; self.vars.len()],
            micro_batches: 0,
        }
    }

    /// Add one micro-batch's gradients.
    pub fn accumulate(&self, acc: &mut Accumulated, grads: &GradStore) -> Result<()> {
        for (slot, (_, var)) in acc.grads.iter_mut().zip(&self.vars) {
            if let Some(g) = grads.get(var.as_tensor()) {
                // Detached: a gradient computed from variables carries the backward graph
                // (and through it every activation of the step); kept, it would leak.
                let g = g.detach();
                *slot = Some(match slot.take() {
                    Some(sum) => (sum + g)?,
                    None => g,
                });
            }
        }
        acc.micro_batches += 1;
        Ok(())
    }

    /// One update from the mean of the accumulated gradients, clipped to a global L2 norm
    /// of `max_norm` (none: no clipping). Returns the norm before clipping.
    pub fn step(&mut self, acc: Accumulated, max_norm: Option<f64>) -> Result<f64> {
        let scale = 1.0 / acc.micro_batches.max(1) as f64;
        // Gradients can arrive as strided views (a tied lm_head's is a transpose): copy
        // those once; the update reads them in order.
        let grads: Vec<Option<Tensor>> = acc
            .grads
            .into_iter()
            .map(|g| g.map(|g| g.contiguous()).transpose())
            .collect::<candle_core::Result<_>>()?;
        let mut sq = 0f64;
        for g in grads.iter().flatten() {
            sq += sum_of_squares(g)?;
        }
        let norm = sq.sqrt() * scale;
        let clip = match max_norm {
            Some(m) if norm > m => m / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let hyper = fused_adamw::Hyper {
            grad_scale: (scale * clip) as f32,
            beta1: b1 as f32,
            beta2: b2 as f32,
            correction1: (1.0 - b1.powi(t)) as f32,
            correction2: (1.0 - b2.powi(t)) as f32,
            lr: self.lr as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            eps: self.eps as f32,
        };
        for (i, g) in grads.into_iter().enumerate() {
            let Some(g) = g else { continue };
            let var = &self.vars[i].1;
            if fused_adamw::applies(var.as_tensor(), &g) {
                fused_adamw::update(var.as_tensor(), &g, &self.first[i], &self.second[i], &hyper)?;
                continue;
            }
            // Other devices and dtypes: the same formula in tensor operations.
            let g = (g * (scale * clip))?;
            let m = ((&self.first[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.second[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let decayed = (var.as_tensor() * (1.0 - self.lr * self.weight_decay))?;
            let update = ((&m / hyper.correction1 as f64)?
                / ((&v / hyper.correction2 as f64)?.sqrt()? + self.eps)?)?;
            var.set(&(decayed - (update * self.lr)?)?)?;
            self.first[i] = m.detach();
            self.second[i] = v.detach();
        }
        Ok(norm)
    }

    /// Write the moments (one safetensors file) for a checkpoint.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            tensors.insert(format!("m.{name}"), self.first[i].clone());
            tensors.insert(format!("v.{name}"), self.second[i].clone());
        }
        candle_core::safetensors::save(&tensors, path)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Read the moments back; every trainable tensor must be there with its shape.
    pub fn load(&mut self, path: &Path, step: usize) -> Result<()> {
        let device = self.first.first().map(|t| t.device().clone());
        let Some(device) = device else { return Ok(()) };
        let tensors = candle_core::safetensors::load(path, &device)
            .with_context(|| format!("cannot read optimizer state {}", path.display()))?;
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.first[i]), ("v", &mut self.second[i])] {
                let t = tensors
                    .get(&format!("{prefix}.{name}"))
                    .with_context(|| format!("{}: no state for {name}", path.display()))?;
                anyhow::ensure!(
                    t.dims() == var.dims(),
                    "{}: state for {name} has shape {:?}, the model {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                );
                *slot = t.clone();
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Σ g², in f64 over f32 partial sums, without a temporary tensor on the CPU.
fn sum_of_squares(g: &Tensor) -> candle_core::Result<f64> {
    if g.device().is_cpu() && g.dtype() == candle_core::DType::F32 {
        let (storage, layout) = g.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            // Chunk sums in parallel, added in chunk order: the same norm on every run.
            let chunks: Vec<f64> = v[a..b]
                .par_chunks(4096)
                .map(|c| crate::student::fastmath::dot(c, c) as f64)
                .collect();
            return Ok(chunks.iter().sum());
        }
    }
    Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)
}

/// The AdamW update in place, one pass over the moments and one over the weights, with no
/// temporary tensors: the composed version allocates and walks about ten weight-sized
/// tensors a step.
mod fused_adamw {
    use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor};
    use rayon::prelude::*;

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn one_step_matches_the_formula() {
        // θ = [1, -2], loss = 3θ₀ + θ₁² → g = [3, -4]. lr 0.1, λ 0.01, step 1:
        // m = 0.1·g, v = 0.001·g²; m̂ = g, v̂ = g²; update = g / (|g| + ε) = sign(g).
        // θ₀ = 1·(1 − 0.001) − 0.1·1 = 0.899; θ₁ = −2·0.999 + 0.1 = −1.898.
        let dev = Device::Cpu;
        let theta = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("t".into(), theta.clone())], 0.1, 0.01).unwrap();
        let t = theta.as_tensor();
        let loss = ((t.narrow(0, 0, 1).unwrap() * 3.0)
            .unwrap()
            .sum_all()
            .unwrap()
            + t.narrow(0, 1, 1).unwrap().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let mut acc = opt.accumulator();
        opt.accumulate(&mut acc, &loss.backward().unwrap()).unwrap();
        let norm = opt.step(acc, None).unwrap();
        assert!((norm - 5.0).abs() < 1e-5, "|[3, -4]| = 5, got {norm}");
        let got = theta.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.899).abs() < 1e-5 && (got[1] + 1.898).abs() < 1e-5,
            "{got:?}"
        );
    }

    #[test]
    fn accumulation_averages_and_clipping_bounds_the_norm() {
        let dev = Device::Cpu;
        let theta = Var::from_tensor(&Tensor::new(&[0f32, 0.0], &dev).unwrap()).unwrap();
        let opt = AdamW::new(vec![("t".into(), theta.clone())], 0.1, 0.0).unwrap();
        let mut acc = opt.accumulator();
        for k in [2f32, 4.0] {
            // loss = k·(θ₀ + θ₁): gradient [k, k]
            let loss = (theta.as_tensor().sum_all().unwrap() * k as f64).unwrap();
            opt.accumulate(&mut acc, &loss.backward().unwrap()).unwrap();
        }
        assert_eq!(acc.micro_batches, 2);
        let mut opt = opt;
        // Mean gradient [3, 3]: norm 3√2 ≈ 4.243, reported before clipping to 1.
        let norm = opt.step(acc, Some(1.0)).unwrap();
        assert!((norm - 18f64.sqrt()).abs() < 1e-4, "{norm}");
        // The clipped gradient has norm 1: m̂/√v̂ is still its sign, so θ moves by lr.
        let got = theta.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] + 0.1).abs() < 1e-4, "{got:?}");
        let m = opt.first[0].to_vec1::<f32>().unwrap();
        assert!(
            (m[0] - 0.1 * (3.0 / 18f32.sqrt())).abs() < 1e-4,
            "first moment of the clipped gradient: {m:?}"
        );
    }

    #[test]
    fn kept_state_holds_no_autograd_graph() {
        // A gradient that flowed through a variable is itself tracked; the optimizer must
        // keep only detached values, or every step's graph stays alive.
        let dev = Device::Cpu;
        // d(w·x)/dw = x: the stored gradient of w is built from the variable x.
        let w = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
        let x = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0], &dev).unwrap()).unwrap();
        let loss = (w.as_tensor() * x.as_tensor()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(w.as_tensor()).unwrap().track_op(),
            "the raw gradient is tracked"
        );
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], 0.1, 0.0).unwrap();
        let mut acc = opt.accumulator();
        opt.accumulate(&mut acc, &grads).unwrap();
        assert!(acc.grads.iter().flatten().all(|g| !g.track_op()));
        opt.step(acc, Some(1.0)).unwrap();
        assert!(opt.first.iter().chain(&opt.second).all(|t| !t.track_op()));
    }

    #[test]
    fn state_round_trips_through_a_file() {
        let dev = Device::Cpu;
        let theta = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), theta.clone())], 0.1, 0.0).unwrap();
        let loss = theta.as_tensor().sqr().unwrap().sum_all().unwrap();
        let mut acc = opt.accumulator();
        opt.accumulate(&mut acc, &loss.backward().unwrap()).unwrap();
        opt.step(acc, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&path).unwrap();
        let mut fresh = AdamW::new(vec![("w".into(), theta)], 0.1, 0.0).unwrap();
        fresh.load(&path, 1).unwrap();
        assert_eq!(fresh.step, 1);
        assert_eq!(
            fresh.second[0].to_vec1::<f32>().unwrap(),
            opt.second[0].to_vec1::<f32>().unwrap()
        );
    }
}
