//! Activations quantized on the fly for the integer dot products: each run of 32 values
//! of a row becomes 32 signed bytes and one f32 scale (max |x| / 127, rounded to nearest:
//! llama.cpp's q8_0), and each group of 16 keeps the scaled sum of its bytes, which the
//! weights' offsets multiply. A scale per 32 values (llama.cpp uses one per 256 for its
//! K formats) costs one multiply per 16 weights and is never less accurate.

use super::formats::GROUP;
use rayon::prelude::*;

/// Values sharing one activation scale.
pub const BLOCK: usize = 32;

/// Rows of `cols` activations, quantized.
pub struct Q8Rows {
    pub cols: usize,
    /// `rows × cols` signed bytes.
    pub qs: Vec<i8>,
    /// Per group of 16: the scale of its block of 32 (repeated for both groups).
    pub scale: Vec<f32>,
    /// Per group of 16: scale × Σ of its bytes.
    pub sum: Vec<f32>,
}

/// One quantized row, borrowed.
#[derive(Clone, Copy)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8],
    pub scale: &'a [f32],
    pub sum: &'a [f32],
}

impl Q8Rows {
    /// Quantize `x` (`rows × cols`, `cols` a multiple of 32), rows in parallel.
    pub fn quantize(x: &[f32], cols: usize) -> Q8Rows {
        debug_assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols));
        let groups = cols / GROUP;
        let rows = x.len() / cols;
        let mut qs = vec![0i8; x.len()];
        let mut scale = vec![0f32; rows * groups];
        let mut sum = vec![0f32; rows * groups];
        qs.par_chunks_mut(cols)
            .zip(scale.par_chunks_mut(groups))
            .zip(sum.par_chunks_mut(groups))
            .zip(x.par_chunks(cols))
            .for_each(|(((q, s), t), x)| quantize_row(x, q, s, t));
        Q8Rows {
            cols,
            qs,
            scale,
            sum,
        }
    }

    pub fn rows(&self) -> usize {
        self.qs.len() / self.cols
    }

    pub fn row(&self, i: usize) -> Q8Row<'_> {
        let groups = self.cols / GROUP;
        Q8Row {
            qs: &self.qs[i * self.cols..(i + 1) * self.cols],
            scale: &self.scale[i * groups..(i + 1) * groups],
            sum: &self.sum[i * groups..(i + 1) * groups],
        }
    }
}

fn quantize_row(x: &[f32], qs: &mut [i8], scale: &mut [f32], sum: &mut [f32]) {
    for (((x, q), s), t) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .zip(scale.chunks_exact_mut(2))
        .zip(sum.chunks_exact_mut(2))
    {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * inv).round() as i8;
        }
        s.fill(d);
        for (t, q) in t.iter_mut().zip(q.chunks_exact(GROUP)) {
            *t = d * q.iter().map(|&v| i32::from(v)).sum::<i32>() as f32;
        }
    }
}
