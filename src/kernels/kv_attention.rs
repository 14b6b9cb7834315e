//! Attention for inference: the new rows of a decoding step, each a query of some
//! sequence at some position, against that sequence's cached keys and values. Grouped-
//! query heads read their shared key/value head in place. In parallel over (row, head);
//! no backward pass (nothing trains through a cache).
//!
//! The cache holds f16 (the default: half the memory, and the half the memory traffic of
//! a long context's decoding step; llama.cpp's default too) or f32; rows are converted to
//! f32 as they are read, and every product and sum is in f32.

use super::fastmath::{dot, dot_with};
use half::f16;
use rayon::prelude::*;

/// How a key/value cache stores its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvPrecision {
    F32,
    #[default]
    F16,
}

impl KvPrecision {
    pub fn bytes(self) -> usize {
        match self {
            KvPrecision::F32 => 4,
            KvPrecision::F16 => 2,
        }
    }
}

/// One sequence's cached keys and values of one layer: `[position][kv_head][head_dim]`.
#[derive(Clone, Copy)]
pub enum KvView<'a> {
    F32 { keys: &'a [f32], values: &'a [f32] },
    F16 { keys: &'a [f16], values: &'a [f16] },
}

/// A cached number: the two products attention takes with a cached row, in f32.
trait Cached: Copy + Sync {
    /// q · row.
    fn dot(q: &[f32], row: &[Self]) -> f32;
    /// out += w · row.
    fn add_scaled(out: &mut [f32], w: f32, row: &[Self]);
}

impl Cached for f32 {
    fn dot(q: &[f32], row: &[f32]) -> f32 {
        dot(q, row)
    }

    fn add_scaled(out: &mut [f32], w: f32, row: &[f32]) {
        out.iter_mut().zip(row).for_each(|(o, v)| *o += w * v);
    }
}

impl Cached for f16 {
    fn dot(q: &[f32], row: &[f16]) -> f32 {
        match F16Simd::get() {
            // SAFETY: `get` picked it because the CPU has AVX-512 F.
            #[cfg(target_arch = "x86_64")]
            F16Simd::Avx512 => unsafe { dot_f16_avx512(q, row) },
            // SAFETY: `get` picked it because the CPU has AVX2, FMA and F16C.
            #[cfg(target_arch = "x86_64")]
            F16Simd::Avx2 => unsafe { dot_f16_avx2(q, row) },
            F16Simd::Portable => dot_f16_portable(q, row),
        }
    }

    fn add_scaled(out: &mut [f32], w: f32, row: &[f16]) {
        match F16Simd::get() {
            // SAFETY: as in `dot`.
            #[cfg(target_arch = "x86_64")]
            F16Simd::Avx512 => unsafe { add_scaled_f16_avx512(out, w, row) },
            // SAFETY: as in `dot`.
            #[cfg(target_arch = "x86_64")]
            F16Simd::Avx2 => unsafe { add_scaled_f16_avx2(out, w, row) },
            F16Simd::Portable => add_scaled_f16_portable(out, w, row),
        }
    }
}

/// The widest vector path this CPU has for f16 rows, decided once (the products are
/// called for every cached position of every head).
#[derive(Clone, Copy)]
enum F16Simd {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl F16Simd {
    fn get() -> F16Simd {
        static PICKED: std::sync::OnceLock<F16Simd> = std::sync::OnceLock::new();
        *PICKED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    return F16Simd::Avx512;
                }
                if has_avx2_f16c() {
                    return F16Simd::Avx2;
                }
            }
            F16Simd::Portable
        })
    }
}

/// `Cached::dot` for f16 rows on any CPU, in independent sums (a single running sum is a
/// chain of dependent adds, which took a quarter of a prompt step on an AVX2 CPU before
/// the AVX2 path).
fn dot_f16_portable(q: &[f32], row: &[f16]) -> f32 {
    dot_with(q, row, f16::to_f32)
}

fn add_scaled_f16_portable(out: &mut [f32], w: f32, row: &[f16]) {
    out.iter_mut()
        .zip(row)
        .for_each(|(o, v)| *o += w * v.to_f32());
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_f16c() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// `Cached::dot` for f16 rows, 8 at a time, for CPUs without AVX-512.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(q: &[f32], row: &[f16]) -> f32 {
    use std::arch::x86_64::*;
    let n = q.len().min(row.len());
    let whole = n / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for i in (0..whole).step_by(8) {
        let k = _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(i) as *const _));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), k, acc);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let tail: f32 = (whole..n).map(|i| q[i] * row[i].to_f32()).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `Cached::add_scaled` for f16 rows, 8 at a time, for CPUs without AVX-512.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_scaled_f16_avx2(out: &mut [f32], w: f32, row: &[f16]) {
    use std::arch::x86_64::*;
    let n = out.len().min(row.len());
    let whole = n / 8 * 8;
    let wv = _mm256_set1_ps(w);
    for i in (0..whole).step_by(8) {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(i) as *const _));
        let o = out.as_mut_ptr().add(i);
        _mm256_storeu_ps(o, _mm256_fmadd_ps(wv, v, _mm256_loadu_ps(o)));
    }
    for i in whole..n {
        out[i] += w * row[i].to_f32();
    }
}

/// `Cached::dot` for f16 rows, 16 at a time (`vcvtph2ps`: exact).
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_f16_avx512(q: &[f32], row: &[f16]) -> f32 {
    use std::arch::x86_64::*;
    let n = q.len().min(row.len());
    let whole = n / 16 * 16;
    let mut acc = _mm512_setzero_ps();
    for i in (0..whole).step_by(16) {
        let k = _mm512_cvtph_ps(_mm256_loadu_si256(row.as_ptr().add(i) as *const _));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(i)), k, acc);
    }
    let tail: f32 = (whole..n).map(|i| q[i] * row[i].to_f32()).sum();
    _mm512_reduce_add_ps(acc) + tail
}

/// `Cached::add_scaled` for f16 rows, 16 at a time.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_scaled_f16_avx512(out: &mut [f32], w: f32, row: &[f16]) {
    use std::arch::x86_64::*;
    let n = out.len().min(row.len());
    let whole = n / 16 * 16;
    let wv = _mm512_set1_ps(w);
    for i in (0..whole).step_by(16) {
        let v = _mm512_cvtph_ps(_mm256_loadu_si256(row.as_ptr().add(i) as *const _));
        let o = out.as_mut_ptr().add(i);
        _mm512_storeu_ps(o, _mm512_fmadd_ps(wv, v, _mm512_loadu_ps(o)));
    }
    for i in whole..n {
        out[i] += w * row[i].to_f32();
    }
}

/// softmax(q·kᵀ × scale)·v for every row and query head of `q` (`rows × heads × hd`
/// floats): row r belongs to `caches[seq_of[r]]` and sees its first `visible[r]`
/// positions. Returns `rows × heads × hd` floats.
pub fn attend_rows(
    q: &[f32],
    caches: &[KvView],
    seq_of: &[usize],
    visible: &[usize],
    (heads, kv_heads, hd): (usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    let stride = kv_heads * hd;
    let group = heads / kv_heads;
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(hd).enumerate().for_each(|(rh, o)| {
        let (r, head) = (rh / heads, rh % heads);
        let place = (stride, (head / group) * hd);
        let q = &q[rh * hd..(rh + 1) * hd];
        match caches[seq_of[r]] {
            KvView::F32 { keys, values } => attend(q, keys, values, visible[r], place, scale, o),
            KvView::F16 { keys, values } => attend(q, keys, values, visible[r], place, scale, o),
        }
    });
    out
}

/// One query head against the first `visible` cached positions, into `out`.
/// `(stride, offset)` locate the head's keys and values in a cache row.
fn attend<T: Cached>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    visible: usize,
    (stride, offset): (usize, usize),
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    let at = |t: usize| t * stride + offset..t * stride + offset + hd;
    let mut scores: Vec<f32> = (0..visible)
        .map(|t| T::dot(q, &keys[at(t)]) * scale)
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for (t, w) in scores.iter().enumerate() {
        T::add_scaled(out, w / sum, &values[at(t)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every f16 path this CPU runs (and the portable one) against f64 sums of the same
    /// f16 values, at head sizes with and without a tail past the vector width.
    #[test]
    fn f16_products_match_f64_sums_of_the_same_values() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for n in [5, 64, 67, 128] {
            let q: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let row: Vec<f16> = (0..n)
                .map(|_| f16::from_f32(rng.random_range(-3.0..3.0)))
                .collect();
            let exact: f64 = q
                .iter()
                .zip(&row)
                .map(|(q, k)| f64::from(*q) * f64::from(k.to_f32()))
                .sum();
            let bound = 1e-5
                * q.iter()
                    .zip(&row)
                    .map(|(q, k)| (q * k.to_f32()).abs())
                    .sum::<f32>();
            let mut dots = vec![
                ("dispatched", <f16 as Cached>::dot(&q, &row)),
                ("portable", dot_f16_portable(&q, &row)),
            ];
            #[cfg(target_arch = "x86_64")]
            if has_avx2_f16c() {
                // SAFETY: checked just above.
                dots.push(("avx2", unsafe { dot_f16_avx2(&q, &row) }));
            }
            for (path, got) in dots {
                assert!(
                    (f64::from(got) - exact).abs() <= f64::from(bound),
                    "{path} dot, n = {n}: {got} vs {exact}"
                );
            }
            let start: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w = 0.37f32;
            let mut sums = vec![("dispatched", start.clone()), ("portable", start.clone())];
            <f16 as Cached>::add_scaled(&mut sums[0].1, w, &row);
            add_scaled_f16_portable(&mut sums[1].1, w, &row);
            #[cfg(target_arch = "x86_64")]
            if has_avx2_f16c() {
                let mut out = start.clone();
                // SAFETY: checked just above.
                unsafe { add_scaled_f16_avx2(&mut out, w, &row) };
                sums.push(("avx2", out));
            }
            for i in 0..n {
                let exact = f64::from(start[i]) + f64::from(w) * f64::from(row[i].to_f32());
                for (path, got) in sums.iter().map(|(p, v)| (p, v[i])) {
                    assert!(
                        (f64::from(got) - exact).abs() <= 1e-6 * exact.abs().max(1.0),
                        "{path} add_scaled, n = {n}, i = {i}: {got} vs {exact}"
                    );
                }
            }
        }
    }
}
