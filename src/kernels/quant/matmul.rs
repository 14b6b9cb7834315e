//! `x · Wᵀ` with `W` kept in a block-quantized format: the activations are quantized per
//! 32 values (`activations`), and a task unpacks 16 weight rows at a time (`formats`) into
//! one interleaved tile: for every 4 columns, the 4 byte codes of each of the 16 rows in
//! turn, so one 512-bit register holds 4 columns of all 16 rows. The AVX-512 kernel
//! broadcasts 4 activation bytes against such a register (`vpdpbusd`: 16 rows' 4-term
//! integer dot products at once), sums a group of 16 columns in integers, and scales each
//! group once, in f32: the 16 rows' scales are one register. The result for 16 rows is
//! one register, stored as is.
//!
//! Each output depends only on its weight row and its activation row, summed in a fixed
//! order: a row's result is bit-identical alone and in any batch.

use super::activations::{Q8Row, Q8Rows};
use super::formats::{Format, GROUP};
use rayon::prelude::*;
use std::cell::RefCell;

/// A weight matrix `[rows (out), cols (in)]` in a block-quantized format, rows stored one
/// after another as in the GGUF file.
#[derive(Clone)]
pub struct QMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
}

/// Weight rows unpacked together: the 16 f32 lanes of one AVX-512 register.
const TILE: usize = 16;

/// `TILE` weight rows unpacked and interleaved (see the module comment); rows past the
/// matrix's last are zeros.
#[derive(Default)]
struct Tile {
    /// `cols / 4` runs of 64 bytes: run q holds columns 4q … 4q + 3 of row 0, then of
    /// row 1, … row 15.
    codes: Vec<u8>,
    /// Per group of 16 columns, the 16 rows' scales, then (in `offset`) their offsets.
    scale: Vec<f32>,
    offset: Vec<f32>,
    /// The 16 rows as `formats` unpacks them, one after another, before interleaving.
    row_codes: Vec<u8>,
    row_scale: Vec<f32>,
    row_offset: Vec<f32>,
}

thread_local! {
    /// Each thread's tile, kept between products (a fresh one per task was a tenth of a
    /// decoding step in allocation and zeroed pages).
    static TILE_BUFFER: RefCell<Tile> = RefCell::new(Tile::default());
}

impl Tile {
    fn fill(&mut self, m: &QMatrix, first: usize) {
        let (cols, groups) = (m.cols, m.cols / GROUP);
        for v in [&mut self.codes, &mut self.row_codes] {
            v.resize(cols * TILE, 0);
        }
        for v in [
            &mut self.scale,
            &mut self.offset,
            &mut self.row_scale,
            &mut self.row_offset,
        ] {
            v.resize(groups * TILE, 0.0);
        }
        let n = (m.rows - first).min(TILE);
        for (j, ((codes, scale), offset)) in self
            .row_codes
            .chunks_exact_mut(cols)
            .zip(self.row_scale.chunks_exact_mut(groups))
            .zip(self.row_offset.chunks_exact_mut(groups))
            .enumerate()
        {
            if j < n {
                m.format.unpack_row(m.row(first + j), codes, scale, offset);
            } else {
                codes.fill(0);
                scale.fill(0.0);
                offset.fill(0.0);
            }
        }
        // Codes as 4-byte runs, scales and offsets as they are: 16 rows of 4-byte units
        // transposed into runs of 16.
        let units = cols / 4;
        let codes = self.codes.as_mut_ptr() as *mut u32;
        // SAFETY: the buffers hold 16 rows of `units` (codes) or `groups` (scales) 4-byte
        // values, as resized above; u32 reads of bytes are unaligned.
        unsafe {
            transpose_rows(self.row_codes.as_ptr() as *const u32, units, codes);
            for (from, to) in [
                (&self.row_scale, &mut self.scale),
                (&self.row_offset, &mut self.offset),
            ] {
                transpose_rows(
                    from.as_ptr() as *const u32,
                    groups,
                    to.as_mut_ptr() as *mut u32,
                );
            }
        }
    }
}

/// `dst[q·16 + j] = src[j·n + q]` for the 16 rows j of `n` 4-byte values each: with
/// AVX-512 a 16 × 16 block at a time in registers, the rest one value at a time.
///
/// # Safety
/// `src` and `dst` hold `16 × n` values (any alignment).
unsafe fn transpose_rows(src: *const u32, n: usize, dst: *mut u32) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        done = n / TILE * TILE;
        for q in (0..done).step_by(TILE) {
            transpose_block_avx512(src.add(q), n, dst.add(q * TILE));
        }
    }
    for q in done..n {
        for j in 0..TILE {
            dst.add(q * TILE + j)
                .write_unaligned(src.add(j * n + q).read_unaligned());
        }
    }
}

/// One 16 × 16 block of `transpose_rows`: row j's 16 values from `src + j·stride`, column
/// q's into `dst + 16q`. Three rounds of shuffles: 32-bit pairs, 64-bit pairs, then
/// 128-bit lanes across four registers.
///
/// # Safety
/// The CPU has AVX-512 F; the reads and writes stay in the callers' buffers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_block_avx512(src: *const u32, stride: usize, dst: *mut u32) {
    use std::arch::x86_64::*;
    let r: [__m512i; TILE] =
        std::array::from_fn(|j| _mm512_loadu_si512(src.add(j * stride) as *const _));
    // t: rows 2i and 2i + 1 interleaved by 32 bits.
    let mut t = [_mm512_setzero_si512(); TILE];
    for i in 0..TILE / 2 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + k]: in 128-bit lane L, value 4L + k of rows 4i … 4i + 3.
    let mut u = [_mm512_setzero_si512(); TILE];
    for i in 0..TILE / 4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        u[4 * i] = _mm512_unpacklo_epi64(a, c);
        u[4 * i + 1] = _mm512_unpackhi_epi64(a, c);
        u[4 * i + 2] = _mm512_unpacklo_epi64(b, d);
        u[4 * i + 3] = _mm512_unpackhi_epi64(b, d);
    }
    // Column 4L + k: lane L of u[k], u[4 + k], u[8 + k], u[12 + k].
    for k in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x88>(u[k], u[4 + k]);
        let v1 = _mm512_shuffle_i32x4::<0xDD>(u[k], u[4 + k]);
        let v2 = _mm512_shuffle_i32x4::<0x88>(u[8 + k], u[12 + k]);
        let v3 = _mm512_shuffle_i32x4::<0xDD>(u[8 + k], u[12 + k]);
        let out = [
            _mm512_shuffle_i32x4::<0x88>(v0, v2),
            _mm512_shuffle_i32x4::<0x88>(v1, v3),
            _mm512_shuffle_i32x4::<0xDD>(v0, v2),
            _mm512_shuffle_i32x4::<0xDD>(v1, v3),
        ];
        for (l, o) in out.into_iter().enumerate() {
            _mm512_storeu_si512(dst.add((4 * l + k) * TILE) as *mut _, o);
        }
    }
}

/// A tile's products with activation rows: for each row, the 16 outputs of the tile.
type TileKernel = fn(&Tile, &[Q8Row]) -> Vec<[f32; TILE]>;

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

    /// Row `r`'s blocks.
    fn row(&self, r: usize) -> &[u8] {
        let bytes = self.format.row_bytes(self.cols);
        &self.data[r * bytes..(r + 1) * bytes]
    }

    /// Row `r` as f32 (`out` holds `cols` values): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let groups = self.cols / GROUP;
        let (mut codes, mut scale, mut offset) =
            (vec![0u8; self.cols], vec![0f32; groups], vec![0f32; groups]);
        self.format
            .unpack_row(self.row(r), &mut codes, &mut scale, &mut offset);
        for (g, (w, c)) in out
            .chunks_exact_mut(GROUP)
            .zip(codes.chunks_exact(GROUP))
            .enumerate()
        {
            for (w, &c) in w.iter_mut().zip(c) {
                *w = scale[g] * f32::from(c) - offset[g];
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
        Ok(self.matmul_with(x, tile_kernel()))
    }

    fn matmul_with(&self, x: &[f32], kernel: TileKernel) -> Vec<f32> {
        if x.is_empty() || self.rows == 0 {
            return Vec::new();
        }
        let acts = Q8Rows::quantize(x, self.cols);
        let m = acts.rows();
        let rows: Vec<Q8Row> = (0..m).map(|i| acts.row(i)).collect();
        // Computed as [tile, m, 16] so that a task owns a contiguous slice, then copied
        // into place 16 outputs at a time.
        let tiles = self.rows.div_ceil(TILE);
        let mut by_tile = vec![[0f32; TILE]; tiles * m];
        by_tile.par_chunks_mut(m).enumerate().for_each(|(t, out)| {
            TILE_BUFFER.with_borrow_mut(|tile| {
                tile.fill(self, t * TILE);
                out.copy_from_slice(&kernel(tile, &rows));
            })
        });
        let mut y = vec![0f32; m * self.rows];
        for (t, block) in by_tile.chunks_exact(m).enumerate() {
            let first = t * TILE;
            let n = (self.rows - first).min(TILE);
            for (i, outputs) in block.iter().enumerate() {
                y[i * self.rows + first..i * self.rows + first + n].copy_from_slice(&outputs[..n]);
            }
        }
        y
    }
}

/// The fastest tile kernel this CPU runs: AVX-512 VNNI where present, else portable.
fn tile_kernel() -> TileKernel {
    #[cfg(target_arch = "x86_64")]
    if vnni_available() {
        return tile_vnni;
    }
    tile_portable
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

/// Σ w·x for each of the tile's rows: per group of 16 columns, the integer dot product of
/// codes and bytes times both scales, minus the weight offset times the activations'
/// scaled sum.
fn tile_portable(tile: &Tile, acts: &[Q8Row]) -> Vec<[f32; TILE]> {
    acts.iter()
        .map(|a| {
            let mut out = [0f32; TILE];
            for (j, out) in out.iter_mut().enumerate() {
                let (mut products, mut offsets) = (0f32, 0f32);
                for (g, (q, (&asc, &asum))) in
                    a.qs.chunks_exact(GROUP)
                        .zip(a.scale.iter().zip(a.sum))
                        .enumerate()
                {
                    let runs = &tile.codes[g * GROUP * TILE..(g + 1) * GROUP * TILE];
                    let dot: i32 = runs
                        .chunks_exact(4 * TILE)
                        .zip(q.chunks_exact(4))
                        .map(|(run, q)| {
                            run[4 * j..4 * j + 4]
                                .iter()
                                .zip(q)
                                .map(|(&c, &q)| i32::from(c) * i32::from(q))
                                .sum::<i32>()
                        })
                        .sum();
                    products += tile.scale[g * TILE + j] * asc * dot as f32;
                    offsets += tile.offset[g * TILE + j] * asum;
                }
                *out = products - offsets;
            }
            out
        })
        .collect()
}

/// `tile_portable` with AVX-512, activation rows four at a time (the tile's registers
/// loaded once for the four), then one at a time; both take the same operations for a
/// row, so its result does not depend on how many rows share the step.
#[cfg(target_arch = "x86_64")]
fn tile_vnni(tile: &Tile, acts: &[Q8Row]) -> Vec<[f32; TILE]> {
    let mut out = Vec::with_capacity(acts.len());
    let mut quads = acts.chunks_exact(4);
    for quad in &mut quads {
        // SAFETY: `tile_kernel` picks this kernel only where the CPU has the features
        // `tile_vnni_rows` is compiled for; the rows and the tile have the same columns.
        out.extend(unsafe { tile_vnni_rows::<4>(tile, [quad[0], quad[1], quad[2], quad[3]]) });
    }
    for &a in quads.remainder() {
        // SAFETY: as above.
        out.extend(unsafe { tile_vnni_rows::<1>(tile, [a]) });
    }
    out
}

/// The tile's 16 rows against R activation rows. Per group of 16 columns: four
/// `vpdpbusd` (4 columns of 16 rows against 4 broadcast activation bytes each), summed in
/// two integer chains, converted once and scaled by the 16 rows' scales times the
/// activation scale; the offsets times the activations' group sums in a second f32
/// accumulator.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI (`vnni_available`); every row of `a` has the
/// tile's columns, a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni_rows<const R: usize>(tile: &Tile, a: [Q8Row; R]) -> [[f32; TILE]; R] {
    use std::arch::x86_64::*;
    let groups = tile.scale.len() / TILE;
    debug_assert!(a
        .iter()
        .all(|a| a.qs.len() == groups * GROUP && a.scale.len() == groups));
    let codes = tile.codes.as_ptr();
    let mut acc = [_mm512_setzero_ps(); R];
    let mut off = [_mm512_setzero_ps(); R];
    for g in 0..groups {
        let run = codes.add(g * GROUP * TILE);
        let c0 = _mm512_loadu_si512(run as *const _);
        let c1 = _mm512_loadu_si512(run.add(64) as *const _);
        let c2 = _mm512_loadu_si512(run.add(128) as *const _);
        let c3 = _mm512_loadu_si512(run.add(192) as *const _);
        let ws = _mm512_loadu_ps(tile.scale.as_ptr().add(g * TILE));
        let wo = _mm512_loadu_ps(tile.offset.as_ptr().add(g * TILE));
        for r in 0..R {
            let q = a[r].qs.as_ptr().add(g * GROUP) as *const i32;
            let b = |k: usize| _mm512_set1_epi32(q.add(k).read_unaligned());
            let low = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c0, b(0));
            let low = _mm512_dpbusd_epi32(low, c1, b(1));
            let high = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c2, b(2));
            let high = _mm512_dpbusd_epi32(high, c3, b(3));
            let sums = _mm512_cvtepi32_ps(_mm512_add_epi32(low, high));
            let scale = _mm512_mul_ps(ws, _mm512_set1_ps(*a[r].scale.get_unchecked(g)));
            acc[r] = _mm512_fmadd_ps(sums, scale, acc[r]);
            off[r] = _mm512_fmadd_ps(wo, _mm512_set1_ps(*a[r].sum.get_unchecked(g)), off[r]);
        }
    }
    let mut out = [[0f32; TILE]; R];
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_sub_ps(acc[r], off[r]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_transpose_into_runs_of_sixteen() {
        // 37 values a row: two 16 × 16 blocks in registers (where AVX-512 runs) and 5 alone.
        let n = 37;
        let src: Vec<u32> = (0..(TILE * n) as u32)
            .map(|v| v.wrapping_mul(2_654_435_761))
            .collect();
        let mut dst = vec![0u32; TILE * n];
        // SAFETY: both hold 16 × n values.
        unsafe { transpose_rows(src.as_ptr(), n, dst.as_mut_ptr()) };
        for q in 0..n {
            for j in 0..TILE {
                assert_eq!(dst[q * TILE + j], src[j * n + q], "value {q} of row {j}");
            }
        }
    }

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
        // 20 rows: a full tile and a partial one; 800 columns: 25 blocks of 32.
        let (rows, cols) = (20, 800);
        let data: Vec<u8> = (0..rows * Format::Q8_0.row_bytes(cols))
            .map(|i| if i % 34 == 1 { 0x20 } else { rng.random() })
            .collect();
        let w = QMatrix::new(Format::Q8_0, rows, cols, data).unwrap();
        // 6 rows: a run of four and two alone.
        let x: Vec<f32> = (0..6 * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let fast = w.matmul(&x).unwrap();
        let portable = w.matmul_with(&x, tile_portable);
        for (a, b) in fast.iter().zip(&portable) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
