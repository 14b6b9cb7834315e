//! Attention for inference: the new rows of a decoding step, each a query of some
//! sequence at some position, against that sequence's cached keys and values. Grouped-
//! query heads read their shared key/value head in place. In parallel over (row, head);
//! no backward pass (nothing trains through a cache).
//!
//! The cache holds f16 (the default: half the memory, and the half the memory traffic of
//! a long context's decoding step; llama.cpp's default too) or f32; rows are converted to
//! f32 as they are read, and every product and sum is in f32.

use super::fastmath::dot;
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
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { dot_f16_avx512(q, row) };
        }
        q.iter().zip(row).map(|(q, k)| q * k.to_f32()).sum()
    }

    fn add_scaled(out: &mut [f32], w: f32, row: &[f16]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { add_scaled_f16_avx512(out, w, row) };
        }
        out.iter_mut()
            .zip(row)
            .for_each(|(o, v)| *o += w * v.to_f32());
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
