//! `x · Wᵀ` with `W` kept in a block-quantized format, repacked on load into tiles of 16
//! rows (`packed`): the activations are quantized per 32 values (`activations`); the
//! AVX-512 kernel decodes a group of 16 columns of a tile into 4 registers, each holding
//! 4 columns of the 16 rows, broadcasts 4 activation bytes against each (`vpdpbusd`: 16
//! rows' 4-term integer dot products at once), sums the group in integers and scales it
//! once, in f32: the 16 rows' scales are one register. The result for 16 rows is one
//! register, stored as is.
//!
//! A task takes a few tiles and runs every activation row over them, 4 rows at a time,
//! so that 4 rows' quantized activations are read once for several tiles (on the 2-core
//! machine this did not measurably change prompt speed: the dot products bound it).
//!
//! Each output depends only on its weight row and its activation row, summed in a fixed
//! order: a row's result is bit-identical alone and in any batch.

use super::activations::{Q8Row, Q8Rows};
use super::formats::{CodeBits, Format, GROUP};
use super::packed::{self, Layout, TILE};
use rayon::prelude::*;
use std::cell::RefCell;

/// A weight matrix `[rows (out), cols (in)]` in a block-quantized format, packed into
/// tiles of 16 rows (`packed`).
#[derive(Clone)]
pub struct QMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    layout: Layout,
    packed: Vec<u8>,
}

/// The portable kernel's view of a tile: codes a byte each in runs (run q: columns 4q …
/// 4q + 3 of row 0, then of row 1, … row 15) and, per group, the 16 rows' scales and
/// offsets in f32.
#[derive(Default)]
struct Tile {
    codes: Vec<u8>,
    scale: Vec<f32>,
    offset: Vec<f32>,
}

thread_local! {
    /// Each thread's expanded tile for the portable kernel, kept between products.
    static TILE_BUFFER: RefCell<Tile> = RefCell::new(Tile::default());
}

impl Tile {
    fn expand(&mut self, layout: &Layout, tile: &[u8]) {
        let groups = layout.cols / GROUP;
        self.codes.resize(layout.cols * TILE, 0);
        self.scale.resize(groups * TILE, 0.0);
        self.offset.resize(groups * TILE, 0.0);
        for g in 0..groups {
            let runs = &mut self.codes[g * GROUP * TILE..(g + 1) * GROUP * TILE];
            for (i, code) in runs.iter_mut().enumerate() {
                let (run, at) = (i / 64, i % 64);
                let (j, c) = (at / 4, 4 * run + at % 4);
                *code = layout.code(tile, j, g * GROUP + c);
            }
            for j in 0..TILE {
                let (s, o) = layout.group_scale(tile, j, g);
                self.scale[g * TILE + j] = s;
                self.offset[g * TILE + j] = o;
            }
        }
    }
}

/// Products of the tiles `first…` with every activation row, into `out`
/// (`[tile][activation row]`, 16 outputs each).
type Kernel = fn(&QMatrix, usize, &[Q8Row], &mut [[f32; TILE]]);

impl QMatrix {
    /// The matrix from its rows of GGUF blocks as the file stores them, packed.
    pub fn new(
        format: Format,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> candle_core::Result<QMatrix> {
        let want = Self::file_bytes(format, rows, cols)?;
        if data.len() != want {
            candle_core::bail!(
                "a {rows}×{cols} {format:?} matrix takes {want} bytes, got {} (truncated file?)",
                data.len()
            );
        }
        Self::read(format, rows, cols, &mut &data[..])
    }

    /// The matrix read from `file` (its rows of blocks as the file stores them) and
    /// packed as it is read.
    pub fn read(
        format: Format,
        rows: usize,
        cols: usize,
        file: &mut impl std::io::Read,
    ) -> candle_core::Result<QMatrix> {
        Self::file_bytes(format, rows, cols)?;
        let packed = packed::pack_from(format, rows, cols, file)?;
        Ok(QMatrix {
            format,
            rows,
            cols,
            layout: Layout::new(format, cols),
            packed,
        })
    }

    /// Bytes of the matrix in the file; an error for rows that are not whole blocks.
    fn file_bytes(format: Format, rows: usize, cols: usize) -> candle_core::Result<usize> {
        if !cols.is_multiple_of(format.block_len()) {
            candle_core::bail!(
                "a {format:?} matrix needs rows of a multiple of {} weights, got {cols}",
                format.block_len()
            );
        }
        Ok(rows * format.row_bytes(cols))
    }

    /// Bytes the packed weights take.
    pub fn bytes(&self) -> usize {
        self.packed.len()
    }

    fn tile(&self, t: usize) -> &[u8] {
        &self.packed[t * self.layout.tile_bytes..(t + 1) * self.layout.tile_bytes]
    }

    /// Row `r` as f32 (`out` holds `cols` values): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (tile, j) = (self.tile(r / TILE), r % TILE);
        for (g, w) in out.chunks_exact_mut(GROUP).enumerate() {
            let (scale, offset) = self.layout.group_scale(tile, j, g);
            for (c, w) in w.iter_mut().enumerate() {
                *w = scale * f32::from(self.layout.code(tile, j, g * GROUP + c)) - offset;
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
        Ok(self.matmul_with(x, kernel()))
    }

    fn matmul_with(&self, x: &[f32], kernel: Kernel) -> Vec<f32> {
        if x.is_empty() || self.rows == 0 {
            return Vec::new();
        }
        let acts = Q8Rows::quantize(x, self.cols);
        let m = acts.rows();
        let rows: Vec<Q8Row> = (0..m).map(|i| acts.row(i)).collect();
        // Computed as [tile, m, 16] so that a task owns a contiguous slice, then copied
        // into place 16 outputs at a time.
        let tiles = self.rows.div_ceil(TILE);
        let per_task = self.tiles_per_task(m, tiles);
        let mut by_tile = vec![[0f32; TILE]; tiles * m];
        by_tile
            .par_chunks_mut(m * per_task)
            .enumerate()
            .for_each(|(task, out)| kernel(self, task * per_task, &rows, out));
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

    /// Tiles a task runs every activation row over: one when a few rows are all there is
    /// (nothing to reuse, and every tile a task for the threads to share), else as many
    /// as fit in half of a 2 MB L2 cache, keeping 4 tasks a thread.
    fn tiles_per_task(&self, m: usize, tiles: usize) -> usize {
        if m <= 4 {
            return 1;
        }
        let fit = (1 << 20) / self.layout.tile_bytes;
        let spread = tiles / (4 * rayon::current_num_threads());
        fit.min(spread).clamp(1, 8)
    }
}

/// The fastest kernel this CPU runs: AVX-512 VNNI where present, else portable.
fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if vnni_available() {
        return tiles_vnni;
    }
    tiles_portable
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

/// The portable kernel: each tile expanded to bytes and f32 scales, then `tile_portable`.
fn tiles_portable(m: &QMatrix, first: usize, acts: &[Q8Row], out: &mut [[f32; TILE]]) {
    TILE_BUFFER.with_borrow_mut(|tile| {
        for (t, out) in out.chunks_exact_mut(acts.len()).enumerate() {
            tile.expand(&m.layout, m.tile(first + t));
            out.copy_from_slice(&tile_portable(tile, acts));
        }
    })
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

/// A tile's 16 rows against R activation rows (the AVX-512 kernel for one code width).
#[cfg(target_arch = "x86_64")]
type RowsKernel<const R: usize> = unsafe fn(&Layout, *const u8, [Q8Row; R]) -> [[f32; TILE]; R];

/// `tiles_portable` with AVX-512: activation rows four at a time over every tile of the
/// task (the four rows' bytes stay in cache across the tiles), then one at a time; both
/// take the same operations for a row, so its result does not depend on how many rows
/// share the step.
#[cfg(target_arch = "x86_64")]
fn tiles_vnni(m: &QMatrix, first: usize, acts: &[Q8Row], out: &mut [[f32; TILE]]) {
    let (four, one): (RowsKernel<4>, RowsKernel<1>) = match m.format.code_bits() {
        CodeBits::Four => (vnni_rows::<4, 4>, vnni_rows::<1, 4>),
        CodeBits::Six => (vnni_rows::<4, 6>, vnni_rows::<1, 6>),
        CodeBits::Eight => (vnni_rows::<4, 8>, vnni_rows::<1, 8>),
    };
    let n = acts.len();
    let tiles = out.len() / n;
    let quads = n / 4 * 4;
    for i in (0..quads).step_by(4) {
        for t in 0..tiles {
            // SAFETY: `kernel` picks this kernel only where the CPU has the features
            // `vnni_rows` is compiled for; the tile is whole and the rows have its columns.
            let y = unsafe {
                four(
                    &m.layout,
                    m.tile(first + t).as_ptr(),
                    [acts[i], acts[i + 1], acts[i + 2], acts[i + 3]],
                )
            };
            out[t * n + i..t * n + i + 4].copy_from_slice(&y);
        }
    }
    for i in quads..n {
        for t in 0..tiles {
            // SAFETY: as above.
            let y = unsafe { one(&m.layout, m.tile(first + t).as_ptr(), [acts[i]]) };
            out[t * n + i] = y[0];
        }
    }
}

/// The 16 rows' scales and offsets of each group of the block at `block`, from its
/// header, computed as `Format::group_scale` computes them.
///
/// # Safety
/// As `vnni_rows`; `block` starts a whole block of a tile laid out by `l`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_scales(
    l: &Layout,
    block: *const u8,
    scale: &mut [std::arch::x86_64::__m512; 16],
    offset: &mut [std::arch::x86_64::__m512; 16],
) {
    use std::arch::x86_64::*;
    let f16s = |at: usize| _mm512_cvtph_ps(_mm256_loadu_si256(block.add(at) as *const _));
    let bytes = |at: usize| _mm_loadu_si128(block.add(at) as *const _);
    let d = f16s(0);
    let times = |k: f32| _mm512_mul_ps(_mm512_set1_ps(k), d);
    match l.format {
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => {
            let o = times(match l.format {
                Format::Q4_0 => 8.0,
                Format::Q5_0 => 16.0,
                _ => 128.0,
            });
            (scale[0], scale[1], offset[0], offset[1]) = (d, d, o, o);
        }
        Format::Q4_1 | Format::Q5_1 => {
            let m = _mm512_castps_si512(f16s(l.min_at));
            let o = _mm512_castsi512_ps(_mm512_xor_si512(m, _mm512_set1_epi32(i32::MIN)));
            (scale[0], scale[1], offset[0], offset[1]) = (d, d, o, o);
        }
        Format::Q4K => {
            let dmin = f16s(l.min_at);
            for j in 0..8 {
                let s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes(l.sub_scale_at + 16 * j)));
                let m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes(l.sub_min_at + 16 * j)));
                let (s, m) = (_mm512_mul_ps(d, s), _mm512_mul_ps(dmin, m));
                (scale[2 * j], scale[2 * j + 1]) = (s, s);
                (offset[2 * j], offset[2 * j + 1]) = (m, m);
            }
        }
        Format::Q6K => {
            for g in 0..16 {
                let s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes(l.sub_scale_at + 16 * g)));
                scale[g] = _mm512_mul_ps(d, s);
                offset[g] = _mm512_mul_ps(_mm512_set1_ps(32.0), scale[g]);
            }
        }
    }
}

/// A group's codes as 4 registers, run k in register k (`packed`'s planes decoded).
///
/// # Safety
/// As `vnni_rows`; `codes` starts a group's `BITS`-wide codes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn group_codes<const BITS: u8>(codes: *const u8) -> [std::arch::x86_64::__m512i; 4] {
    use std::arch::x86_64::*;
    let load = |k: usize| _mm512_loadu_si512(codes.add(64 * k) as *const _);
    if BITS == 8 {
        return [load(0), load(1), load(2), load(3)];
    }
    let low = _mm512_set1_epi8(0x0F);
    let (a, b) = (load(0), load(1));
    let mut c = [
        _mm512_and_si512(a, low),
        _mm512_and_si512(b, low),
        _mm512_and_si512(_mm512_srli_epi16::<4>(a), low),
        _mm512_and_si512(_mm512_srli_epi16::<4>(b), low),
    ];
    if BITS == 6 {
        // Bits 2k, 2k + 1 of each high-part byte to bits 4, 5 of run k's codes (16-bit
        // shifts; the mask drops what crosses from the neighbouring byte).
        let (h, top) = (load(2), _mm512_set1_epi8(0x30));
        let high = [
            _mm512_slli_epi16::<4>(h),
            _mm512_slli_epi16::<2>(h),
            h,
            _mm512_srli_epi16::<2>(h),
        ];
        for k in 0..4 {
            c[k] = _mm512_or_si512(c[k], _mm512_and_si512(high[k], top));
        }
    }
    c
}

/// The tile at `tile`'s 16 rows against R activation rows. Per group of 16 columns: four
/// `vpdpbusd` (4 columns of 16 rows against 4 broadcast activation bytes each), summed in
/// two integer chains, converted once and scaled by the 16 rows' scales times the
/// activation scale; the offsets times the activations' group sums in a second f32
/// accumulator.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI (`vnni_available`); `tile` is a whole tile laid
/// out by `l` with codes `BITS` wide; every row of `a` has `l.cols` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_rows<const R: usize, const BITS: u8>(
    l: &Layout,
    tile: *const u8,
    a: [Q8Row; R],
) -> [[f32; TILE]; R] {
    use std::arch::x86_64::*;
    debug_assert!(a
        .iter()
        .all(|a| a.qs.len() == l.cols && a.scale.len() == l.cols / GROUP));
    let mut acc = [_mm512_setzero_ps(); R];
    let mut off = [_mm512_setzero_ps(); R];
    let mut scale = [_mm512_setzero_ps(); 16];
    let mut offset = [_mm512_setzero_ps(); 16];
    for b in 0..l.blocks {
        let block = tile.add(b * l.block_bytes);
        block_scales(l, block, &mut scale, &mut offset);
        let codes = block.add(l.header_bytes);
        for gb in 0..l.groups_per_block {
            let g = b * l.groups_per_block + gb;
            let [c0, c1, c2, c3] = group_codes::<BITS>(codes.add(gb * l.group_bytes));
            let (ws, wo) = (scale[gb], offset[gb]);
            for r in 0..R {
                let q = a[r].qs.as_ptr().add(g * GROUP) as *const i32;
                let b = |k: usize| _mm512_set1_epi32(q.add(k).read_unaligned());
                let low = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c0, b(0));
                let low = _mm512_dpbusd_epi32(low, c1, b(1));
                let high = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c2, b(2));
                let high = _mm512_dpbusd_epi32(high, c3, b(3));
                let sums = _mm512_cvtepi32_ps(_mm512_add_epi32(low, high));
                let s = _mm512_mul_ps(ws, _mm512_set1_ps(*a[r].scale.get_unchecked(g)));
                acc[r] = _mm512_fmadd_ps(sums, s, acc[r]);
                off[r] = _mm512_fmadd_ps(wo, _mm512_set1_ps(*a[r].sum.get_unchecked(g)), off[r]);
            }
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
    fn the_avx512_kernel_sums_as_the_portable_one() {
        if !crate::test_skip::can_run(
            "the_avx512_kernel_sums_as_the_portable_one",
            "avx512-vnni",
            vnni_available(),
            "this CPU lacks AVX512-VNNI (Intel Ice Lake or later, AMD Zen 4 or later)",
        ) {
            return;
        }
        use candle_core::quantized::QTensor;
        use candle_core::{Device, Tensor};
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        // 300 rows: 18 full tiles and a partial one, several tiles a task; 768 columns:
        // 3 blocks of 256, 24 of 32. 9 activation rows: two runs of four and one alone.
        let (rows, cols) = (300, 768);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..9 * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        for format in Format::ALL {
            let q = QTensor::quantize(&w, format.ggml()).unwrap();
            let w = QMatrix::new(format, rows, cols, &q.data().unwrap()).unwrap();
            let fast = w.matmul(&x).unwrap();
            let portable = w.matmul_with(&x, tiles_portable);
            for (a, b) in fast.iter().zip(&portable) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{format:?}: {a} vs {b}"
                );
            }
        }
    }
}
