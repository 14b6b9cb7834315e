//! CPU kernels with their backward passes, and no knowledge of any model: each file one
//! op family, each op a candle custom op that makes one pass over a row, rows in
//! parallel, keeping no intermediate for the backward pass. candle's composed versions
//! make several passes over memory and keep every intermediate until the backward pass
//! ends (measured: 2.3 s of a 20 s step for the loss, 3.7 s for 30 layers of attention
//! softmax, SmolLM2, 4 × 256 tokens; docs/STACK.md). Other devices and dtypes take
//! candle's composed ops: every entry point says what it does there.
//!
//! x86-64 code paths (AVX-512 BF16) are behind `cfg(target_arch)` and picked at run time;
//! every op has a portable path.

pub mod adamw;
pub mod attention;
pub mod bf16_gemm;
pub mod cross_entropy;
pub mod fastmath;
pub mod gemm;
pub mod kv_attention;
pub mod linear;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod swiglu;

use candle_core::{CpuStorage, Layout, Tensor};

pub use cross_entropy::cross_entropy_rows;
pub use linear::{linear, linear_bf16_cast, lora_linear};
pub use norm::rms_norm;
pub use rope::rope_heads;
pub use swiglu::silu_mul;

/// Calls `f` with an f32 tensor's values in row-major order: borrowed from the storage
/// where the tensor is contiguous on the CPU (no copy of a large activation or logits
/// matrix), else copied first.
pub fn with_f32_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            if let Ok(values) = f32_slice(cpu, layout, "with_f32_values") {
                return Ok(f(values));
            }
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

pub(crate) fn f32_slice<'a>(
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

pub(crate) fn u32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [u32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: targets must be contiguous")))?;
    match s {
        CpuStorage::U32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("{what}: u32 targets only"),
    }
}

/// Whether `x` can go through the fused kernels (a CPU f32 tensor).
pub(crate) fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// The f32 data of a contiguous CPU tensor's storage.
pub(crate) fn cpu_f32<'a>(
    s: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(cpu) => f32_slice(cpu, l, what),
        _ => candle_core::bail!("{what}: tensors must be on the CPU"),
    }
}

/// Largest absolute difference between two tensors of one shape (unit tests).
#[cfg(test)]
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A tensor of values drawn uniformly from [-1, 1) by a seeded generator (unit tests: the
/// same values every run, so a check against a precision bound neither passes nor fails by
/// luck of the draw).
#[cfg(test)]
pub(crate) fn seeded_uniform(shape: impl Into<candle_core::Shape>, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let shape = shape.into();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// The gradients of Σ y ⊙ w, a fixed random weighting of an op's output (unit tests that
/// compare an op's backward pass with a reference's).
#[cfg(test)]
pub(crate) fn weighted_grads(y: &Tensor, w: &Tensor) -> candle_core::backprop::GradStore {
    (y * w).unwrap().sum_all().unwrap().backward().unwrap()
}
