//! Activations quantized on the fly for the integer dot products: each block of a row
//! becomes signed bytes and one f32 scale (max |x| / 127, rounded to nearest): blocks of
//! 32 values (llama.cpp's q8_0) or 256 (its q8_K), as `Format::activation_block` picks
//! for the weights. Each group of 16 keeps the sum of its bytes, as an integer and
//! scaled, which the weights' offsets multiply.

use super::formats::GROUP;
use rayon::prelude::*;

/// Rows of `cols` activations, quantized.
pub struct Q8Rows {
    pub cols: usize,
    /// `rows × cols` signed bytes.
    pub qs: Vec<i8>,
    /// Per group of 16: the scale of its block (repeated for each group of the block).
    pub scale: Vec<f32>,
    /// Per group of 16: scale × Σ of its bytes.
    pub sum: Vec<f32>,
    /// Per group of 16: Σ of its bytes (at most 16 · 127 in magnitude).
    pub int_sum: Vec<i16>,
}

/// One quantized row, borrowed.
#[derive(Clone, Copy)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8],
    pub scale: &'a [f32],
    pub sum: &'a [f32],
    pub int_sum: &'a [i16],
}

impl Q8Rows {
    /// Quantize `x` (`rows × cols`, `cols` a multiple of `block`, `block` of 32 or 256)
    /// in blocks of `block` values, rows in parallel.
    pub fn quantize(x: &[f32], cols: usize, block: usize) -> Q8Rows {
        debug_assert!(
            block.is_multiple_of(GROUP)
                && cols.is_multiple_of(block)
                && x.len().is_multiple_of(cols)
        );
        let groups = cols / GROUP;
        let rows = x.len() / cols;
        let mut qs = vec![0i8; x.len()];
        let mut scale = vec![0f32; rows * groups];
        let mut sum = vec![0f32; rows * groups];
        let mut int_sum = vec![0i16; rows * groups];
        qs.par_chunks_mut(cols)
            .zip(scale.par_chunks_mut(groups))
            .zip(sum.par_chunks_mut(groups))
            .zip(int_sum.par_chunks_mut(groups))
            .zip(x.par_chunks(cols))
            .for_each(|((((q, s), t), i), x)| {
                quantize_row(
                    x,
                    block,
                    Row {
                        qs: q,
                        scale: s,
                        sum: t,
                        int_sum: i,
                    },
                )
            });
        Q8Rows {
            cols,
            qs,
            scale,
            sum,
            int_sum,
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
            int_sum: &self.int_sum[i * groups..(i + 1) * groups],
        }
    }
}

/// One row's parts, to be written.
struct Row<'a> {
    qs: &'a mut [i8],
    scale: &'a mut [f32],
    sum: &'a mut [f32],
    int_sum: &'a mut [i16],
}

fn quantize_row(x: &[f32], block: usize, row: Row) {
    let groups = block / GROUP;
    for ((((x, q), s), t), i) in x
        .chunks_exact(block)
        .zip(row.qs.chunks_exact_mut(block))
        .zip(row.scale.chunks_exact_mut(groups))
        .zip(row.sum.chunks_exact_mut(groups))
        .zip(row.int_sum.chunks_exact_mut(groups))
    {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * inv).round() as i8;
        }
        s.fill(d);
        for ((t, i), q) in t.iter_mut().zip(i).zip(q.chunks_exact(GROUP)) {
            let total: i32 = q.iter().map(|&v| i32::from(v)).sum();
            // |total| ≤ 16 · 127 = 2,032.
            *i = total as i16;
            *t = d * total as f32;
        }
    }
}
