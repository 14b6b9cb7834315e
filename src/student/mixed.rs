//! Mixed-precision products for training (`[finetune] precision = "bf16"`): a linear
//! layer's products, forward and backward, take bf16 operands and sum in f32. The weights
//! the optimizer updates, its moments, the activations and every other op stay f32, as in
//! PyTorch's CPU autocast (which also keeps norms, softmax and losses in f32). Attention's
//! two products follow the same precision inside `super::attention`.
//!
//! On the CPU the products run on `bf16_gemm` (AVX512-BF16); elsewhere candle's bf16
//! matmul runs between casts, whose backward passes cast the gradients back.

use super::bf16_gemm;
use crate::config::Precision;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// Whether `device` can train in `precision`; the error says what to change.
pub fn check(precision: Precision, device: &Device) -> Result<()> {
    if precision == Precision::Bf16 && device.is_cpu() && !bf16_gemm::available() {
        anyhow::bail!(
            "[finetune] precision = \"bf16\" needs a CPU with AVX512-BF16 (Intel Cooper Lake or \
             Sapphire Rapids, AMD Zen 4 or later) or a CUDA device, and this CPU lacks it\n\
             hint: set precision = \"f32\" (the default)"
        );
    }
    Ok(())
}

/// `x · wᵀ` for `x` `[..., in]` and `w` `[out, in]` with bf16 operands and f32 sums, on
/// devices without the fused CPU op (`super::ops::linear`, which callers try first):
/// candle's bf16 matmul between casts. Gradients flow to `x`, and to `w` when it is a
/// variable.
pub fn linear_bf16(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let bf16 = DType::BF16;
    x.to_dtype(bf16)?
        .broadcast_matmul(&w.to_dtype(bf16)?.t()?)?
        .to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Largest |a − b| relative to the largest |b|.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        (diff / scale).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn bf16_linear_matches_f32_values_and_gradients_to_bf16_precision() {
        if !bf16_gemm::testable(
            "mixed::bf16_linear_matches_f32_values_and_gradients_to_bf16_precision",
        ) {
            return;
        }
        let x = Var::from_tensor(&random((37, 70), 1)).unwrap();
        let w = Var::from_tensor(&random((45, 70), 2)).unwrap();
        let up = random((37, 45), 3); // a fixed upstream gradient through the sum below
        let y16 = super::super::ops::linear(x.as_tensor(), w.as_tensor(), true)
            .unwrap()
            .unwrap();
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

    #[test]
    fn bf16_needs_the_cpu_feature_or_says_what_to_set() {
        assert!(check(Precision::F32, &Device::Cpu).is_ok());
        match check(Precision::Bf16, &Device::Cpu) {
            Ok(()) => assert!(bf16_gemm::available()),
            Err(e) => assert!(e.to_string().contains("precision = \"f32\""), "{e}"),
        }
    }
}
