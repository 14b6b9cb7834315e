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
use half::slice::HalfFloatSliceExt;
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

/// A cached number, read as f32.
trait Cached: Copy + Sync {
    /// `out` ← the values of `row` as f32 (`out` as long as `row`).
    fn read(row: &[Self], out: &mut [f32]);
}

impl Cached for f32 {
    fn read(row: &[f32], out: &mut [f32]) {
        out.copy_from_slice(row);
    }
}

impl Cached for f16 {
    fn read(row: &[f16], out: &mut [f32]) {
        // `half` converts with F16C where the CPU has it.
        row.convert_to_f32_slice(out);
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
    let mut row = vec![0f32; hd];
    let at = |t: usize| t * stride + offset..t * stride + offset + hd;
    let mut scores: Vec<f32> = (0..visible)
        .map(|t| {
            T::read(&keys[at(t)], &mut row);
            dot(q, &row) * scale
        })
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for (t, w) in scores.iter().enumerate() {
        T::read(&values[at(t)], &mut row);
        let w = w / sum;
        out.iter_mut().zip(&row).for_each(|(o, v)| *o += w * v);
    }
}
