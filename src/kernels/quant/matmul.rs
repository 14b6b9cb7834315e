//! `x · Wᵀ` with `W` kept in a block-quantized format, repacked on load into tiles of 16
//! rows (`packed`): the activations are quantized in blocks of 32 values, or of 256 for
//! Q4_K (`activations`); a SIMD kernel (`avx512`, `avx2`, picked at run time, or the
//! portable one here) takes a group of 16 columns of a tile at a time, 4 columns of the
//! 16 rows against 4 broadcast activation bytes per instruction, sums the group in
//! integers and scales it once, in f32 (AVX2's Q4_K kernel: a block of 256 at once).
//!
//! A task takes a few tiles and runs every activation row over them, 4 rows at a time,
//! so that 4 rows' quantized activations are read once for several tiles (on the 2-core
//! machine this did not measurably change prompt speed: the dot products bound it).
//!
//! Each output depends only on its weight row and its activation row, summed in a fixed
//! order: a row's result is bit-identical alone and in any batch.

use super::activations::{Q8Row, Q8Rows};
use super::formats::{Format, GROUP};
use super::packed::{self, Layout, TILE};
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// A weight matrix `[rows (out), cols (in)]` in a block-quantized format, packed into
/// tiles of 16 rows (`packed`).
#[derive(Clone)]
pub struct QMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    pub(super) layout: Layout,
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
    /// Each thread's outputs of its current task, kept between products.
    static TASK_OUTPUTS: RefCell<Vec<[f32; TILE]>> = const { RefCell::new(Vec::new()) };
}

/// Where a product's tasks write their outputs: the start of each row of the result
/// (`rows` floats each), every task its own columns of them.
struct Outputs(Vec<*mut f32>);
// SAFETY: the tasks that share it write disjoint columns of rows that outlive the
// product (`matmul_with`).
unsafe impl Send for Outputs {}
unsafe impl Sync for Outputs {}

impl Outputs {
    /// The address of column `col` of row `i`.
    ///
    /// # Safety
    /// `i` is a row of the result and `col` within it.
    unsafe fn at(&self, i: usize, col: usize) -> *mut f32 {
        // SAFETY: the caller's promise.
        unsafe { self.0[i].add(col) }
    }
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

    /// Bytes of the matrix in the file; an error for rows that are not whole blocks, or
    /// are empty.
    fn file_bytes(format: Format, rows: usize, cols: usize) -> candle_core::Result<usize> {
        if cols == 0 || !cols.is_multiple_of(format.block_len()) {
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

    pub(super) fn tile(&self, t: usize) -> &[u8] {
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
        let m = self.input_rows(x)?;
        if self.rows == 0 {
            // No result columns: nothing to compute, and no 0-float rows to cut `y` into.
            return Ok(Vec::new());
        }
        let mut y = vec![0f32; m * self.rows];
        let mut rows: Vec<&mut [f32]> = y.chunks_exact_mut(self.rows).collect();
        self.matmul_into(x, &mut rows)?;
        Ok(y)
    }

    /// `x · Wᵀ` for `x` `[m, cols]` (row-major), row i of the result written into
    /// `out[i]` (`rows` floats each): results that belong in separate buffers (each
    /// sequence's logits) go there without a whole-size copy.
    pub fn matmul_into(&self, x: &[f32], out: &mut [&mut [f32]]) -> candle_core::Result<()> {
        let m = self.input_rows(x)?;
        if out.len() != m || out.iter().any(|row| row.len() != self.rows) {
            candle_core::bail!(
                "a product of {m} rows with a {}×{} quantized matrix writes {m} rows of {} values",
                self.rows,
                self.cols,
                self.rows
            );
        }
        let kernel = KernelChoice::selected().map_err(candle_core::Error::msg)?;
        self.matmul_with(x, kernel.kernel(), out);
        Ok(())
    }

    /// Rows of a product's input `x` (`cols` values each, never 0: `file_bytes`); an
    /// error where it is not whole rows.
    fn input_rows(&self, x: &[f32]) -> candle_core::Result<usize> {
        if !x.len().is_multiple_of(self.cols) {
            candle_core::bail!(
                "a product with a {}×{} quantized matrix needs rows of {} values, got {} values",
                self.rows,
                self.cols,
                self.cols,
                x.len()
            );
        }
        Ok(x.len() / self.cols)
    }

    /// Computes into `out`, whose rows the caller sized (`matmul_into`).
    fn matmul_with(&self, x: &[f32], kernel: Kernel, out: &mut [&mut [f32]]) {
        if x.is_empty() || self.rows == 0 {
            return;
        }
        let acts = Q8Rows::quantize(x, self.cols, self.format.activation_block());
        let m = acts.rows();
        let rows: Vec<Q8Row> = (0..m).map(|i| acts.row(i)).collect();
        let tiles = self.rows.div_ceil(TILE);
        let per_task = self.tiles_per_task(m, tiles);
        let y = Outputs(out.iter_mut().map(|row| row.as_mut_ptr()).collect());
        (0..tiles.div_ceil(per_task))
            .into_par_iter()
            .for_each(|task| {
                let first = task * per_task;
                let count = per_task.min(tiles - first);
                // A task's outputs come as [tile, m, 16] in this thread's buffer (so that no
                // second whole-size copy of the result is held), then go into place 16 at
                // a time.
                TASK_OUTPUTS.with_borrow_mut(|outputs| {
                    outputs.clear();
                    outputs.resize(count * m, [0f32; TILE]);
                    kernel(self, first, &rows, outputs);
                    // SAFETY: y holds m rows of `self.rows` floats that outlive the
                    // parallel loop; the task's tiles are its own.
                    unsafe { self.place(outputs, first, m, &y) };
                })
            });
    }

    /// Writes a task's outputs (`[tile, m, 16]`, tiles from `first`) into their columns of
    /// the result's rows.
    ///
    /// # Safety
    /// `y` holds `m` rows of `rows` floats, and no other thread touches these tiles'
    /// columns.
    unsafe fn place(&self, outputs: &[[f32; TILE]], first: usize, m: usize, y: &Outputs) {
        for (t, block) in outputs.chunks_exact(m).enumerate() {
            let col = (first + t) * TILE;
            let n = (self.rows - col).min(TILE);
            for (i, outputs) in block.iter().enumerate() {
                // SAFETY: row i's columns col … col + n are within it and this task's
                // alone (the caller's promise).
                unsafe { std::ptr::copy_nonoverlapping(outputs.as_ptr(), y.at(i, col), n) };
            }
        }
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

/// The product kernels, fastest first. Each gives a row's result bit-identically alone
/// and in any batch; between kernels results differ in the last bits (sums in another
/// order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// 512-bit registers, `vpdpbusd` (Intel Ice Lake and later, AMD Zen 4 and later).
    Avx512Vnni,
    /// 256-bit registers, `vpmaddubsw` + `vpmaddwd` (x86-64 since Haswell / Zen 1).
    Avx2,
    /// Plain Rust, any CPU.
    Portable,
}

/// Names a kernel for the product, overriding the fastest this CPU has: for benchmarks
/// and to run a slower machine's path on a faster one.
pub const KERNEL_ENV: &str = "KDPIPE_QUANT_KERNEL";

impl KernelChoice {
    const ALL: [KernelChoice; 3] = [
        KernelChoice::Avx512Vnni,
        KernelChoice::Avx2,
        KernelChoice::Portable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelChoice::Avx512Vnni => "avx512-vnni",
            KernelChoice::Avx2 => "avx2",
            KernelChoice::Portable => "portable",
        }
    }

    /// Whether this CPU runs the kernel.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            KernelChoice::Avx512Vnni => avx512::available(),
            #[cfg(target_arch = "x86_64")]
            KernelChoice::Avx2 => avx2::available(),
            KernelChoice::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The kernel `KDPIPE_QUANT_KERNEL` names, else the fastest this CPU runs; an error
    /// for a name that is not a kernel or a kernel this CPU lacks. Decided once.
    pub fn selected() -> Result<KernelChoice, String> {
        static SELECTED: OnceLock<Result<KernelChoice, String>> = OnceLock::new();
        SELECTED
            .get_or_init(|| Self::from_env(std::env::var(KERNEL_ENV).ok().as_deref()))
            .clone()
    }

    fn from_env(name: Option<&str>) -> Result<KernelChoice, String> {
        let names = || Self::ALL.map(Self::name).join(", ");
        match name.filter(|n| !n.is_empty()) {
            None => Ok(Self::ALL
                .into_iter()
                .find(|k| k.available())
                .unwrap_or(KernelChoice::Portable)),
            Some(name) => match Self::ALL.into_iter().find(|k| k.name() == name) {
                None => Err(format!(
                    "{KERNEL_ENV}={name} is not a kernel: use one of {}, or unset it",
                    names()
                )),
                Some(k) if !k.available() => Err(format!(
                    "{KERNEL_ENV}={name}: this CPU lacks the instructions it needs; unset it \
                     to use the fastest kernel this CPU has"
                )),
                Some(k) => Ok(k),
            },
        }
    }

    fn kernel(self) -> Kernel {
        match self {
            #[cfg(target_arch = "x86_64")]
            KernelChoice::Avx512Vnni => avx512::tiles,
            #[cfg(target_arch = "x86_64")]
            KernelChoice::Avx2 => avx2::tiles,
            _ => tiles_portable,
        }
    }
}

/// A SIMD kernel's product of one tile's 16 rows with R activation rows (compiled for
/// one code width).
#[cfg(target_arch = "x86_64")]
pub(super) type RowsKernel<const R: usize> =
    unsafe fn(&Layout, *const u8, [Q8Row; R]) -> [[f32; TILE]; R];

/// A SIMD kernel over a task's tiles: activation rows four at a time over every tile
/// (the four rows' bytes stay in cache across the tiles), then one at a time; both give a
/// row the same integer sums and the same f32 operations in the same order, so its
/// result does not depend on how many rows share the step.
///
/// # Safety
/// The CPU has the features `four` and `one` are compiled for, and they are compiled for
/// `m`'s code width.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn tiles_simd(
    m: &QMatrix,
    first: usize,
    acts: &[Q8Row],
    out: &mut [[f32; TILE]],
    four: RowsKernel<4>,
    one: RowsKernel<1>,
) {
    let n = acts.len();
    let tiles = out.len() / n;
    let quads = n / 4 * 4;
    for i in (0..quads).step_by(4) {
        for t in 0..tiles {
            // SAFETY: the features are there (the caller's promise); the tile is whole
            // and the rows have its columns.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's products against the portable kernel's on 300 × 768 weights of every
    /// format: 18 full tiles and a partial one, several tiles a task; 3 blocks of 256
    /// columns, 24 of 32; 9 activation rows, two runs of four and one alone.
    fn sums_as_the_portable_one(choice: KernelChoice) {
        use candle_core::quantized::QTensor;
        use candle_core::{Device, Tensor};
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (rows, cols) = (300, 768);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..9 * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        for format in Format::ALL {
            let q = QTensor::quantize(&w, format.ggml()).unwrap();
            let w = QMatrix::new(format, rows, cols, &q.data().unwrap()).unwrap();
            let product = |kernel: Kernel| {
                let mut y = vec![0f32; 9 * rows];
                let mut out: Vec<&mut [f32]> = y.chunks_exact_mut(rows).collect();
                w.matmul_with(&x, kernel, &mut out);
                y
            };
            let (fast, portable) = (product(choice.kernel()), product(tiles_portable));
            for (a, b) in fast.iter().zip(&portable) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{choice:?}, {format:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn the_avx512_kernel_sums_as_the_portable_one() {
        if crate::test_skip::can_run(
            "the_avx512_kernel_sums_as_the_portable_one",
            "avx512-vnni",
            KernelChoice::Avx512Vnni.available(),
            "this CPU lacks AVX512-VNNI (Intel Ice Lake or later, AMD Zen 4 or later)",
        ) {
            sums_as_the_portable_one(KernelChoice::Avx512Vnni);
        }
    }

    #[test]
    fn the_avx2_kernel_sums_as_the_portable_one() {
        if crate::test_skip::can_run(
            "the_avx2_kernel_sums_as_the_portable_one",
            "avx2",
            KernelChoice::Avx2.available(),
            "this CPU lacks AVX2, FMA or F16C (x86-64 since Intel Haswell, AMD Zen)",
        ) {
            sums_as_the_portable_one(KernelChoice::Avx2);
        }
    }

    #[test]
    fn inputs_that_are_not_whole_rows_and_matrices_without_columns_are_refused() {
        let no_rows = QMatrix::new(Format::Q8_0, 0, 32, &[]).unwrap();
        assert!(no_rows.matmul(&[0.5; 31]).is_err());
        assert_eq!(no_rows.matmul(&[0.5; 64]).unwrap(), Vec::<f32>::new());
        let no_cols = match QMatrix::new(Format::Q8_0, 16, 0, &[]) {
            Ok(_) => panic!("a matrix without columns was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(no_cols.contains("got 0"), "{no_cols}");
        let w = QMatrix::new(
            Format::Q8_0,
            16,
            32,
            &vec![0u8; 16 * Format::Q8_0.row_bytes(32)],
        )
        .unwrap();
        let mut y = [0f32; 16];
        assert!(
            w.matmul_into(&[0.5; 64], &mut [&mut y[..]]).is_err(),
            "two input rows, one output row"
        );
    }

    #[test]
    fn the_kernel_override_names_a_kernel_this_cpu_runs() {
        assert_eq!(
            KernelChoice::from_env(Some("portable")),
            Ok(KernelChoice::Portable)
        );
        let fastest = KernelChoice::from_env(None).unwrap();
        assert!(fastest.available());
        assert_eq!(KernelChoice::from_env(Some("")), Ok(fastest));
        let err = KernelChoice::from_env(Some("avx9")).unwrap_err();
        assert!(err.contains("avx512-vnni, avx2, portable"), "{err}");
        if !KernelChoice::Avx512Vnni.available() {
            let err = KernelChoice::from_env(Some("avx512-vnni")).unwrap_err();
            assert!(err.contains("lacks"), "{err}");
        }
    }
}
