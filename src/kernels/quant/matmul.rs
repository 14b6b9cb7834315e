//! `x · Wᵀ` with `W` kept in a block-quantized format: the activations are quantized per
//! 32 values (`activations`), each weight row is unpacked once per task into byte codes
//! with a scale and offset per 16 weights (`formats`), and every output is one integer
//! dot product per group of 16, scaled and summed in f32.
//!
//! Each output depends only on its weight row and its activation row, summed in a fixed
//! order: a row's result is bit-identical alone and in any batch.

use super::activations::{Q8Row, Q8Rows};
use super::formats::{Format, GROUP};
use rayon::prelude::*;

/// A weight matrix `[rows (out), cols (in)]` in a block-quantized format, rows stored one
/// after another as in the GGUF file.
#[derive(Clone)]
pub struct QMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
}

/// A weight row unpacked: codes, and per group of 16 a scale and an offset; the scales
/// also once per 4 codes (`lane_scale`), the layout of the AVX-512 kernel's lanes.
struct Unpacked {
    codes: Vec<u8>,
    scale: Vec<f32>,
    offset: Vec<f32>,
    lane_scale: Vec<f32>,
}

/// Weight rows a task unpacks and keeps while every activation row passes by.
const ROWS_PER_TASK: usize = 16;

impl QMatrix {
    pub fn new(
        format: Format,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> candle_core::Result<QMatrix> {
        if !cols.is_multiple_of(format.block_len()) {
            candle_core::bail!(
                "a {format:?} matrix needs rows of a multiple of {} weights, got {cols}",
                format.block_len()
            );
        }
        let want = rows * format.row_bytes(cols);
        if data.len() != want {
            candle_core::bail!(
                "a {rows}×{cols} {format:?} matrix takes {want} bytes, got {} (truncated file?)",
                data.len()
            );
        }
        Ok(QMatrix {
            format,
            rows,
            cols,
            data,
        })
    }

    fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.cols)
    }

    fn unpacked(&self) -> Unpacked {
        Unpacked {
            codes: vec![0; self.cols],
            scale: vec![0.0; self.cols / GROUP],
            offset: vec![0.0; self.cols / GROUP],
            lane_scale: vec![0.0; self.cols / 4],
        }
    }

    fn unpack_row(&self, r: usize, out: &mut Unpacked) {
        let row = &self.data[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        self.format
            .unpack_row(row, &mut out.codes, &mut out.scale, &mut out.offset);
        for (lanes, &s) in out.lane_scale.chunks_exact_mut(GROUP / 4).zip(&out.scale) {
            lanes.fill(s);
        }
    }

    /// Row `r` as f32 (`out` holds `cols` values): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let mut u = self.unpacked();
        self.unpack_row(r, &mut u);
        for (g, (w, c)) in out
            .chunks_exact_mut(GROUP)
            .zip(u.codes.chunks_exact(GROUP))
            .enumerate()
        {
            for (w, &c) in w.iter_mut().zip(c) {
                *w = u.scale[g] * f32::from(c) - u.offset[g];
            }
        }
    }

    /// The whole matrix as f32, `rows × cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, o)| self.dequantize_row(r, o));
        out
    }

    /// `x · Wᵀ` for `x` `[m, cols]` (row-major): `[m, rows]`.
    pub fn matmul(&self, x: &[f32]) -> candle_core::Result<Vec<f32>> {
        if !x.len().is_multiple_of(self.cols) {
            candle_core::bail!(
                "a product with a {}×{} quantized matrix needs rows of {} values, got {} values",
                self.rows,
                self.cols,
                self.cols,
                x.len()
            );
        }
        Ok(self.matmul_with(x, dot_kernel(), dot4_kernel()))
    }

    fn matmul_with(
        &self,
        x: &[f32],
        dot: fn(&Unpacked, Q8Row) -> f32,
        dot4: Option<Dot4>,
    ) -> Vec<f32> {
        if x.is_empty() || self.rows == 0 {
            return Vec::new();
        }
        let acts = Q8Rows::quantize(x, self.cols);
        let m = acts.rows();
        // Computed as [rows, m] so that a task owns a contiguous slice, then transposed.
        let mut yt = vec![0f32; self.rows * m];
        yt.par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * ROWS_PER_TASK;
                let unpacked: Vec<Unpacked> = (first..first + out.len() / m)
                    .map(|r| {
                        let mut u = self.unpacked();
                        self.unpack_row(r, &mut u);
                        u
                    })
                    .collect();
                // Four activation rows at a time where a four-row kernel runs; it gives
                // each row the bits the one-row kernel gives, so a row's result does not
                // depend on how many rows share the step.
                let mut i = 0;
                if let Some(dot4) = dot4 {
                    while i + 4 <= m {
                        let a = [
                            acts.row(i),
                            acts.row(i + 1),
                            acts.row(i + 2),
                            acts.row(i + 3),
                        ];
                        for (j, w) in unpacked.iter().enumerate() {
                            out[j * m + i..j * m + i + 4].copy_from_slice(&dot4(w, a));
                        }
                        i += 4;
                    }
                }
                for i in i..m {
                    let a = acts.row(i);
                    for (j, w) in unpacked.iter().enumerate() {
                        out[j * m + i] = dot(w, a);
                    }
                }
            });
        // Transposed a task's block at a time: each output row gets 16 adjacent values
        // (one cache line) per block, read from 16 × m values that stay in L1.
        let mut y = vec![0f32; m * self.rows];
        for (task, block) in yt.chunks(ROWS_PER_TASK * m).enumerate() {
            let first = task * ROWS_PER_TASK;
            let n = block.len() / m;
            for i in 0..m {
                let dst = &mut y[i * self.rows + first..i * self.rows + first + n];
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = block[j * m + i];
                }
            }
        }
        y
    }
}

/// The fastest dot product this CPU runs: AVX-512 VNNI where present, else portable.
fn dot_kernel() -> fn(&Unpacked, Q8Row) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vnni_available() {
        // SAFETY: the CPU has the features `dot_vnni` is compiled for.
        return |w, a| unsafe { dot_vnni(w, a) };
    }
    dot_portable
}

/// Whether this CPU has AVX-512 F, BW and VNNI (the integer dot-product kernel).
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Σ w·x over one row: per group of 16, the integer dot product of codes and bytes times
/// both scales, minus the weight offset times the activations' scaled sum.
fn dot_portable(w: &Unpacked, a: Q8Row) -> f32 {
    let mut products = 0f32;
    let mut offsets = 0f32;
    for ((((c, q), ws), (wo, asc)), asum) in w
        .codes
        .chunks_exact(GROUP)
        .zip(a.qs.chunks_exact(GROUP))
        .zip(&w.scale)
        .zip(w.offset.iter().zip(a.scale))
        .zip(a.sum)
    {
        products += ws * asc * group_dot(c, q) as f32;
        offsets += wo * asum;
    }
    products - offsets
}

/// Σ code·byte over a group of 16 (fits i32: 16 × 255 × 128).
#[inline(always)]
fn group_dot(codes: &[u8], qs: &[i8]) -> i32 {
    codes
        .iter()
        .zip(qs)
        .map(|(&c, &q)| i32::from(c) * i32::from(q))
        .sum()
}

/// `dot_portable` with AVX-512: `vpdpbusd` multiplies 64 unsigned codes by 64 signed
/// bytes and sums each 4 adjacent products into one of 16 i32 lanes, so lanes 4g … 4g + 3
/// hold group g's partial sums; each lane is scaled by its group's weight and activation
/// scales and accumulated in f32, and the 16 lanes are summed once at the end.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI (`vnni_available`); `w` and `a` describe rows of
/// the same length, a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_vnni(w: &Unpacked, a: Q8Row) -> f32 {
    dot_vnni_rows::<1>(w, [a])[0]
}

/// `dot_vnni` of one weight row with R activation rows at once: the weight's codes and
/// scales are loaded once for all R, and the R accumulators are independent chains. Each
/// row's result takes exactly the operations `dot_vnni` takes, so it has the same bits.
///
/// # Safety
/// As `dot_vnni`, for every row of `a`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_vnni_rows<const R: usize>(w: &Unpacked, a: [Q8Row; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let n = w.codes.len();
    debug_assert!(a
        .iter()
        .all(|a| a.qs.len() == n && a.lane_scale.len() == n / 4));
    debug_assert!(w.lane_scale.len() == n / 4);
    let full = n / 64 * 64;
    let (codes, wls) = (w.codes.as_ptr(), w.lane_scale.as_ptr());
    let mut acc = [_mm512_setzero_ps(); R];
    let mut k = 0;
    while k < full {
        let c = _mm512_loadu_si512(codes.add(k) as *const _);
        let ws = _mm512_loadu_ps(wls.add(k / 4));
        for (acc, a) in acc.iter_mut().zip(&a) {
            let q = _mm512_loadu_si512(a.qs.as_ptr().add(k) as *const _);
            let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, q);
            let scale = _mm512_mul_ps(ws, _mm512_loadu_ps(a.lane_scale.as_ptr().add(k / 4)));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, *acc);
        }
        k += 64;
    }
    let groups = n / GROUP;
    let mut out = [0f32; R];
    for ((out, acc), a) in out.iter_mut().zip(acc).zip(&a) {
        let mut products = _mm512_reduce_add_ps(acc);
        // A last run of 32 (rows of an odd number of 32-blocks).
        for g in k / GROUP..groups {
            let range = g * GROUP..(g + 1) * GROUP;
            products +=
                w.scale[g] * a.scale[g] * group_dot(&w.codes[range.clone()], &a.qs[range]) as f32;
        }
        // Σ offset·sum over the groups, 16 at a time; the last, partial 16 by a masked load
        // (zeros beyond the end).
        let mut off = _mm512_setzero_ps();
        let mut g = 0;
        while g < groups {
            let mask: __mmask16 = if groups - g >= 16 {
                0xFFFF
            } else {
                (1u16 << (groups - g)) - 1
            };
            off = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(mask, w.offset.as_ptr().add(g)),
                _mm512_maskz_loadu_ps(mask, a.sum.as_ptr().add(g)),
                off,
            );
            g += 16;
        }
        *out = products - _mm512_reduce_add_ps(off);
    }
    out
}

/// Four activation rows against one weight row at a time, where the CPU has VNNI.
type Dot4 = fn(&Unpacked, [Q8Row; 4]) -> [f32; 4];

fn dot4_kernel() -> Option<Dot4> {
    #[cfg(target_arch = "x86_64")]
    if vnni_available() {
        // SAFETY: the CPU has the features `dot_vnni_rows` is compiled for.
        return Some(|w, a| unsafe { dot_vnni_rows::<4>(w, a) });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_avx512_kernel_sums_as_the_portable_one() {
        if !crate::test_skip::can_run(
            "the_avx512_kernel_sums_as_the_portable_one",
            "avx512-vnni",
            vnni_available(),
            "this CPU lacks AVX512-VNNI (Intel Ice Lake or later, AMD Zen 4 or later)",
        ) {
            return;
        }
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        // 800 columns: 12 runs of 64 and a last run of 32.
        let (rows, cols) = (20, 800);
        let data: Vec<u8> = (0..rows * Format::Q8_0.row_bytes(cols))
            .map(|i| if i % 34 == 1 { 0x20 } else { rng.random() })
            .collect();
        let w = QMatrix::new(Format::Q8_0, rows, cols, data).unwrap();
        let x: Vec<f32> = (0..6 * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let fast = w.matmul(&x).unwrap();
        let portable = w.matmul_with(&x, dot_portable, None);
        for (a, b) in fast.iter().zip(&portable) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
