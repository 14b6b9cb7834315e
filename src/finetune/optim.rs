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

use crate::kernels::adamw::{self, sum_of_squares};
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

pub struct AdamW {
    vars: Vec<(String, Var)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    /// Steps taken (t in the bias corrections).
    pub step: usize,
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
    /// The learning rate is given at each step (the schedule's), not here.
    pub fn new(vars: Vec<(String, Var)>, weight_decay: f64) -> Result<Self> {
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

    /// One update at learning rate `lr` from the mean of the accumulated gradients,
    /// clipped to a global L2 norm of `max_norm` (none: no clipping). Returns the norm
    /// before clipping.
    pub fn step(&mut self, acc: Accumulated, lr: f64, max_norm: Option<f64>) -> Result<f64> {
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
        let hyper = adamw::Hyper {
            grad_scale: (scale * clip) as f32,
            beta1: b1 as f32,
            beta2: b2 as f32,
            correction1: (1.0 - b1.powi(t)) as f32,
            correction2: (1.0 - b2.powi(t)) as f32,
            lr: lr as f32,
            decay: (1.0 - lr * self.weight_decay) as f32,
            eps: self.eps as f32,
        };
        for (i, g) in grads.into_iter().enumerate() {
            let Some(g) = g else { continue };
            let var = &self.vars[i].1;
            if adamw::applies(var.as_tensor(), &g) {
                adamw::update(var.as_tensor(), &g, &self.first[i], &self.second[i], &hyper)?;
                continue;
            }
            // Other devices and dtypes: the same formula in tensor operations.
            let g = (g * (scale * clip))?;
            let m = ((&self.first[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.second[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            let update = ((&m / hyper.correction1 as f64)?
                / ((&v / hyper.correction2 as f64)?.sqrt()? + self.eps)?)?;
            var.set(&(decayed - (update * lr)?)?)?;
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
        let mut opt = AdamW::new(vec![("t".into(), theta.clone())], 0.01).unwrap();
        let t = theta.as_tensor();
        let loss = ((t.narrow(0, 0, 1).unwrap() * 3.0)
            .unwrap()
            .sum_all()
            .unwrap()
            + t.narrow(0, 1, 1).unwrap().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let mut acc = opt.accumulator();
        opt.accumulate(&mut acc, &loss.backward().unwrap()).unwrap();
        let norm = opt.step(acc, 0.1, None).unwrap();
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
        let opt = AdamW::new(vec![("t".into(), theta.clone())], 0.0).unwrap();
        let mut acc = opt.accumulator();
        for k in [2f32, 4.0] {
            // loss = k·(θ₀ + θ₁): gradient [k, k]
            let loss = (theta.as_tensor().sum_all().unwrap() * k as f64).unwrap();
            opt.accumulate(&mut acc, &loss.backward().unwrap()).unwrap();
        }
        assert_eq!(acc.micro_batches, 2);
        let mut opt = opt;
        // Mean gradient [3, 3]: norm 3√2 ≈ 4.243, reported before clipping to 1.
        let norm = opt.step(acc, 0.1, Some(1.0)).unwrap();
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
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], 0.0).unwrap();
        let mut acc = opt.accumulator();
        opt.accumulate(&mut acc, &grads).unwrap();
        assert!(acc.grads.iter().flatten().all(|g| !g.track_op()));
        opt.step(acc, 0.1, Some(1.0)).unwrap();
        assert!(opt.first.iter().chain(&opt.second).all(|t| !t.track_op()));
    }

    #[test]
    fn state_round_trips_through_a_file() {
        let dev = Device::Cpu;
        let theta = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), theta.clone())], 0.0).unwrap();
        let loss = theta.as_tensor().sqr().unwrap().sum_all().unwrap();
        let mut acc = opt.accumulator();
        opt.accumulate(&mut acc, &loss.backward().unwrap()).unwrap();
        opt.step(acc, 0.1, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        opt.save(&path).unwrap();
        let mut fresh = AdamW::new(vec![("w".into(), theta)], 0.0).unwrap();
        fresh.load(&path, 1).unwrap();
        assert_eq!(fresh.step, 1);
        assert_eq!(
            fresh.second[0].to_vec1::<f32>().unwrap(),
            opt.second[0].to_vec1::<f32>().unwrap()
        );
    }

    /// A few AdamW steps on one batch of a tiny decoder lower the loss in bf16 as far as
    /// in f32.
    mod bf16 {
        use super::super::AdamW;
        use crate::config::Precision;
        use crate::finetune::loss::token_nll;
        use crate::llama::tests::{seeded_weights, tiny_shape};
        use crate::llama::Decoder;
        use candle_core::{DType, Device, Tensor};

        /// A few AdamW steps on one batch lower the loss in bf16 as far as in f32.
        #[test]
        fn bf16_training_lowers_the_loss_like_f32() {
            let s = tiny_shape();
            let ids =
                Tensor::new(&[[1u32, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]], &Device::Cpu).unwrap();
            let mask = Tensor::ones((2, 6), DType::F32, &Device::Cpu).unwrap();
            let mut curves = Vec::new();
            let weights = seeded_weights(&s, 7);
            for precision in [Precision::F32, Precision::Bf16] {
                if precision == Precision::Bf16
                    && !crate::kernels::bf16_gemm::testable(
                        "optim::bf16_training_lowers_the_loss_like_f32",
                    )
                {
                    return;
                }
                let mut d =
                    Decoder::new(s.clone(), weights.clone(), &Device::Cpu, |_| true).unwrap();
                d.set_precision(precision).unwrap();
                let mut opt = AdamW::new(d.vars.clone(), 0.0).unwrap();
                let mut losses = Vec::new();
                for _ in 0..30 {
                    let loss = token_nll(&d.forward(&ids, &mask).unwrap(), &ids)
                        .unwrap()
                        .mean_all()
                        .unwrap();
                    losses.push(loss.to_scalar::<f32>().unwrap());
                    let mut acc = opt.accumulator();
                    opt.accumulate(&mut acc, &loss.backward().unwrap()).unwrap();
                    opt.step(acc, 3e-2, Some(1.0)).unwrap();
                }
                curves.push(losses);
            }
            let (f32_curve, bf16_curve) = (&curves[0], &curves[1]);
            let (first, last) = (bf16_curve[0], bf16_curve[29]);
            assert!(last < 0.5 * first, "bf16 {bf16_curve:?}, f32 {f32_curve:?}");
            assert!(
                (last - f32_curve[29]).abs() < 0.1 * f32_curve[29].max(0.1),
                "bf16 {bf16_curve:?}, f32 {f32_curve:?}"
            );
        }
    }
}
