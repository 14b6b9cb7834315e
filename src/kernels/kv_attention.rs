//! Attention for inference: the new rows of a decoding step, each a query of some
//! sequence at some position, against that sequence's cached keys and values. Grouped-
//! query heads read their shared key/value head in place. In parallel over (row, head);
//! no backward pass (nothing trains through a cache).

use super::fastmath::dot;
use rayon::prelude::*;

/// One sequence's cached keys and values of one layer: `[position][kv_head][head_dim]`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
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
        let cache = caches[seq_of[r]];
        let offset = (head / group) * hd;
        attend(
            &q[rh * hd..(rh + 1) * hd],
            cache,
            visible[r],
            (stride, offset),
            scale,
            o,
        );
    });
    out
}

/// One query head against the first `visible` cached positions, into `out`.
/// `(stride, offset)` locate the head's keys and values in a cache row.
fn attend(
    q: &[f32],
    cache: KvView,
    visible: usize,
    (stride, offset): (usize, usize),
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    let mut scores: Vec<f32> = (0..visible)
        .map(|t| {
            dot(
                q,
                &cache.keys[t * stride + offset..t * stride + offset + hd],
            ) * scale
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
        let v = &cache.values[t * stride + offset..t * stride + offset + hd];
        let w = w / sum;
        out.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
    }
}
