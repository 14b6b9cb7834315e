//! The matrix product of mixed-precision training on CPUs with AVX512-BF16:
//! `c (+)= a · b` with both operands rounded to bfloat16 (to nearest even) as they are
//! packed, and every product summed in f32 by `vdpbf16ps`, which multiplies pairs of
//! bf16 values along k and adds both products to an f32 lane. Inputs and output stay f32,
//! so the master weights, activations and gradients around the product keep f32 range
//! and precision; only the product's operands lose mantissa bits (8 of 24), as in
//! PyTorch's CPU autocast.
//!
//! Layout follows the usual blocked scheme (Goto and van de Geijn, 2008): a `KC × NC`
//! block of b is packed in k-pairs of `NR` columns, an `MC × KC` block of a in k-pairs of
//! `MR` rows, and an `MR × NR` microkernel keeps its 24 accumulators in registers while it
//! walks k. Work is split between threads by rows or columns of c, whichever is larger.

/// Rows of a microkernel tile.
const MR: usize = 8;
/// Vectors of 16 f32 lanes across a tile, and its columns.
const NV: usize = 3;
const NR: usize = NV * 16;
/// Block sizes: k (even, so k-pairs never straddle blocks), rows of a, columns of b.
const KC: usize = 512;
const MC: usize = MR * 16;
const NC: usize = NR * 32;
/// Below this many multiply-adds a product runs on one thread.
const PARALLEL_MIN: usize = 1 << 22;

/// A read-only f32 matrix: element (i, j) at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows `start .. start + len` (the start clamped to the data for empty views).
    fn rows_range(self, start: usize, len: usize) -> Self {
        let offset = (start * self.row_stride).min(self.data.len());
        Self {
            data: &self.data[offset..],
            rows: len,
            ..self
        }
    }

    fn cols_range(self, start: usize, len: usize) -> Self {
        let offset = (start * self.col_stride).min(self.data.len());
        Self {
            data: &self.data[offset..],
            cols: len,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    pub fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }

    /// Element (i, j) as bf16 bits.
    ///
    /// # Safety
    /// `i < rows`, `j < cols`, and the view `fits()` its data.
    #[inline(always)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    unsafe fn bf16_at(&self, i: usize, j: usize) -> u32 {
        let x = *self
            .data
            .get_unchecked(i * self.row_stride + j * self.col_stride);
        half::bf16::from_f32(x).to_bits() as u32
    }
}

/// For tests of bf16 code: whether this CPU can run them; records the skip otherwise
/// (see `test_skip`: a skip fails the suite unless allowed).
#[cfg(test)]
pub(crate) fn testable(test: &str) -> bool {
    crate::test_skip::can_run(
        test,
        "avx512-bf16",
        available(),
        "this CPU lacks AVX512-BF16 (Intel Cooper Lake or later, AMD Zen 4 or later)",
    )
}

/// Whether this CPU runs the kernel (AVX-512 F and BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c (+)= a · b` for `a` `[m, k]`, `b` `[k, n]` and `c` row-major `[m, n]`; `accumulate`
/// adds to what `c` holds instead of overwriting it.
///
/// Panics when the shapes disagree, a view reaches past its data, or the CPU lacks
/// AVX512-BF16 (check `available()` first).
pub fn gemm(c: &mut [f32], a: View, b: View, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && c.len() == m * n,
        "bf16 gemm: shapes do not fit"
    );
    assert!(
        a.fits() && b.fits(),
        "bf16 gemm: a view reaches past its data"
    );
    assert!(available(), "bf16 gemm: this CPU lacks AVX512-BF16");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let c_ptr = SendPtr(c.as_mut_ptr());
    if threads == 1 || m * n * k < PARALLEL_MIN {
        // SAFETY: c holds m × n floats, the shapes were checked above.
        unsafe { avx512::gemm_serial(c_ptr.0, n, a, b, accumulate) };
        return;
    }
    // Split c into one stripe per thread, along its longer side, in whole tiles.
    let (len, tile) = if m >= n { (m, MR) } else { (n, NR) };
    let per = len.div_ceil(threads).div_ceil(tile) * tile;
    rayon::scope(|s| {
        for start in (0..len).step_by(per) {
            let span = per.min(len - start);
            s.spawn(move |_| {
                let c_ptr = c_ptr;
                // SAFETY: each stripe writes only its own rows (or columns) of c, which
                // holds m × n floats with row stride n.
                unsafe {
                    if m >= n {
                        avx512::gemm_serial(
                            c_ptr.0.add(start * n),
                            n,
                            a.rows_range(start, span),
                            b,
                            accumulate,
                        );
                    } else {
                        avx512::gemm_serial(
                            c_ptr.0.add(start),
                            n,
                            a,
                            b.cols_range(start, span),
                            accumulate,
                        );
                    }
                }
            });
        }
    });
}

/// `gemm` on the calling thread only, into `c` with row stride `ldc` (`c` may be a block
/// of a wider matrix): for callers that already split their work across threads, such as
/// the fused attention's (batch, head) groups.
///
/// Panics as `gemm` does, and when `c` is too short for `a.rows` rows of stride `ldc`.
pub fn gemm_on_this_thread(c: &mut [f32], ldc: usize, a: View, b: View, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_product_fits(c, ldc, &a, &b, "bf16 gemm");
    assert!(available(), "bf16 gemm: this CPU lacks AVX512-BF16");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    // SAFETY: c spans m rows of stride ldc ≥ n (checked above), the views fit their data.
    unsafe { avx512::gemm_serial(c.as_mut_ptr(), ldc, a, b, accumulate) };
}

/// Panics unless `a · b` is defined, `c` holds its `a.rows × b.cols` result with row
/// stride `ldc`, and both views lie inside their data; `what` names the product.
pub fn assert_product_fits(c: &[f32], ldc: usize, a: &View, b: &View, what: &str) {
    let (m, n) = (a.rows, b.cols);
    assert!(
        b.rows == a.cols && ldc >= n && (m == 0 || c.len() >= (m - 1) * ldc + n),
        "{what}: shapes do not fit"
    );
    assert!(a.fits() && b.fits(), "{what}: a view reaches past its data");
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the threads that share it write disjoint parts of c (see `gemm`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// The AVX-512 BF16 kernels (x86-64 only; `available()` gates every call).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{View, KC, MC, MR, NC, NR, NV};
    use std::arch::x86_64::*;

    /// One thread's product into `c` (row stride `ldc`).
    ///
    /// # Safety
    /// `c` spans `a.rows` rows of stride `ldc ≥ b.cols`; both views fit their data; the CPU
    /// has AVX512-F and AVX512-BF16 (`available()`).
    pub(super) unsafe fn gemm_serial(c: *mut f32, ldc: usize, a: View, b: View, accumulate: bool) {
        PACKS.with_borrow_mut(|(a_pack, b_pack)| {
            a_pack.resize(MC * KC / 2, 0);
            b_pack.resize(NC * KC / 2, 0);
            gemm_blocks(c, ldc, a, b, accumulate, a_pack, b_pack)
        })
    }

    thread_local! {
        /// Each thread's packing buffers, kept between products: a training step makes
        /// hundreds, and fresh buffers cost an allocation and zeroed pages each time.
        static PACKS: std::cell::RefCell<(Vec<u32>, Vec<u32>)> = const {
            std::cell::RefCell::new((Vec::new(), Vec::new()))
        };
    }

    /// `gemm_serial` with its packing buffers.
    ///
    /// # Safety
    /// As `gemm_serial`; the buffers hold `MC · KC / 2` and `NC · KC / 2` words.
    unsafe fn gemm_blocks(
        c: *mut f32,
        ldc: usize,
        a: View,
        b: View,
        accumulate: bool,
        a_pack: &mut [u32],
        b_pack: &mut [u32],
    ) {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let mut edge = [0f32; MR * NR];
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let pairs = kc.div_ceil(2);
                pack_b(b_pack, b, pc, kc, jc, nc);
                // The first k block writes c unless accumulating; the others add to it.
                let load_c = accumulate || pc > 0;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    pack_a(a_pack, a, ic, mc, pc, kc);
                    for jr in (0..nc).step_by(NR) {
                        let nr = NR.min(nc - jr);
                        let bp = b_pack.as_ptr().add(jr * pairs);
                        for ir in (0..mc).step_by(MR) {
                            let mr = MR.min(mc - ir);
                            let ap = a_pack.as_ptr().add(ir * pairs);
                            let dst = c.add((ic + ir) * ldc + jc + jr);
                            if mr == MR && nr == NR {
                                kernel(pairs, ap, bp, dst, ldc, load_c);
                            } else {
                                // A partial tile: through a full-size scratch tile.
                                for i in 0..mr {
                                    for j in 0..nr {
                                        edge[i * NR + j] =
                                            if load_c { *dst.add(i * ldc + j) } else { 0.0 };
                                    }
                                }
                                kernel(pairs, ap, bp, edge.as_mut_ptr(), NR, true);
                                for i in 0..mr {
                                    for j in 0..nr {
                                        *dst.add(i * ldc + j) = edge[i * NR + j];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Rows `ic .. ic + mc`, k `pc .. pc + kc` of a into tiles of MR rows: for each k-pair,
    /// MR words holding (a[i, 2p], a[i, 2p + 1]) as bf16 (low half first). Padding is zero.
    ///
    /// # Safety
    /// The rows and k range lie inside `a`, which fits its data; `out` holds
    /// `mc.div_ceil(MR) · MR · kc.div_ceil(2)` words; the CPU has AVX512-F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pack_a(out: &mut [u32], a: View, ic: usize, mc: usize, pc: usize, kc: usize) {
        let pairs = kc.div_ceil(2);
        let src = a.data.as_ptr();
        for (tile, ir) in (0..mc).step_by(MR).enumerate() {
            let dst = out.as_mut_ptr().add(tile * MR * pairs);
            let rows = MR.min(mc - ir);
            if rows == MR && kc.is_multiple_of(2) && a.col_stride == 1 {
                for i in 0..MR {
                    let row = src.add((ic + ir + i) * a.row_stride + pc);
                    adjacent_pairs(row, pairs, dst.add(i), MR);
                }
            } else if rows == MR && kc.is_multiple_of(2) && a.row_stride == 1 {
                for p in 0..pairs {
                    let lo = src.add(a.col_stride * (pc + 2 * p) + ic + ir);
                    two_rows(lo, lo.add(a.col_stride), MR, dst.add(p * MR));
                }
            } else {
                for i in 0..MR {
                    for p in 0..pairs {
                        let word = pair_word(a, ic + ir + i, pc + 2 * p, i < rows, pc + kc);
                        *dst.add(p * MR + i) = word;
                    }
                }
            }
        }
    }

    /// k `pc .. pc + kc`, columns `jc .. jc + nc` of b into panels of NR columns: for each
    /// k-pair, NR words holding (b[2p, j], b[2p + 1, j]) as bf16. Padding is zero.
    ///
    /// # Safety
    /// The k range and columns lie inside `b`, which fits its data; `out` holds
    /// `nc.div_ceil(NR) · NR · kc.div_ceil(2)` words; the CPU has AVX512-F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pack_b(out: &mut [u32], b: View, pc: usize, kc: usize, jc: usize, nc: usize) {
        let pairs = kc.div_ceil(2);
        let src = b.data.as_ptr();
        for (panel, jr) in (0..nc).step_by(NR).enumerate() {
            let dst = out.as_mut_ptr().add(panel * NR * pairs);
            let cols = NR.min(nc - jr);
            if cols == NR && kc.is_multiple_of(2) && b.row_stride == 1 {
                for j in 0..NR {
                    let col = src.add((jc + jr + j) * b.col_stride + pc);
                    adjacent_pairs(col, pairs, dst.add(j), NR);
                }
            } else if cols == NR && kc.is_multiple_of(2) && b.col_stride == 1 {
                for p in 0..pairs {
                    let lo = src.add(b.row_stride * (pc + 2 * p) + jc + jr);
                    for v in 0..NV {
                        two_rows(
                            lo.add(16 * v),
                            lo.add(b.row_stride + 16 * v),
                            16,
                            dst.add(p * NR + 16 * v),
                        );
                    }
                }
            } else {
                for j in 0..NR {
                    for p in 0..pairs {
                        let word = pair_word(b.t(), jc + jr + j, pc + 2 * p, j < cols, pc + kc);
                        *dst.add(p * NR + j) = word;
                    }
                }
            }
        }
    }

    /// The word for (row, k), (row, k + 1) of `v`, zero outside the tile (`inside` false) or
    /// past `k_end`. The scalar path of partial tiles and odd k.
    ///
    /// # Safety
    /// When `inside`, `row` and `k` (and `k + 1` when below `k_end`) lie inside `v`.
    #[inline(always)]
    unsafe fn pair_word(v: View, row: usize, k: usize, inside: bool, k_end: usize) -> u32 {
        if !inside {
            return 0;
        }
        let lo = v.bf16_at(row, k);
        let hi = if k + 1 < k_end {
            v.bf16_at(row, k + 1)
        } else {
            0
        };
        lo | hi << 16
    }

    /// `pairs` words from `2 · pairs` contiguous floats (each word two neighbours), stored
    /// `stride` words apart.
    ///
    /// # Safety
    /// `src` points at `2 · pairs` readable floats; `dst` has room for `pairs` words `stride`
    /// apart; the CPU has AVX512-F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn adjacent_pairs(src: *const f32, pairs: usize, dst: *mut u32, stride: usize) {
        let mut words = [0u32; 16];
        for chunk in 0..pairs / 16 {
            let s = src.add(32 * chunk);
            let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s.add(16)), _mm512_loadu_ps(s));
            _mm512_storeu_si512(
                words.as_mut_ptr() as *mut _,
                std::mem::transmute::<__m512bh, __m512i>(v),
            );
            for (q, w) in words.iter().enumerate() {
                *dst.add((16 * chunk + q) * stride) = *w;
            }
        }
        for p in pairs / 16 * 16..pairs {
            let lo = half::bf16::from_f32(*src.add(2 * p)).to_bits() as u32;
            let hi = half::bf16::from_f32(*src.add(2 * p + 1)).to_bits() as u32;
            *dst.add(p * stride) = lo | hi << 16;
        }
    }

    /// `lanes` (at most 16) contiguous words, word j holding (lo[j], hi[j]).
    ///
    /// # Safety
    /// `lo` and `hi` point at `lanes` readable floats each, `dst` at room for `lanes` words;
    /// the CPU has AVX512-F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn two_rows(lo: *const f32, hi: *const f32, lanes: usize, dst: *mut u32) {
        let mask: __mmask16 = if lanes >= 16 {
            0xffff
        } else {
            (1u16 << lanes) - 1
        };
        let to_words = |x: __m512| {
            _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                _mm512_cvtneps_pbh(x),
            ))
        };
        let l = to_words(_mm512_maskz_loadu_ps(mask, lo));
        let h = to_words(_mm512_maskz_loadu_ps(mask, hi));
        _mm512_mask_storeu_epi32(
            dst as *mut _,
            mask,
            _mm512_or_si512(l, _mm512_slli_epi32::<16>(h)),
        );
    }

    /// One MR × NR tile: `c (+)= Σ_p a_pairs[p] · b_pairs[p]` over `pairs` k-pairs.
    ///
    /// # Safety
    /// `ap` and `bp` point at `pairs · MR` and `pairs · NR` packed words; `c` at an MR × NR
    /// tile of row stride `ldc`; the CPU has AVX512-F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel(
        pairs: usize,
        ap: *const u32,
        bp: *const u32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for p in 0..pairs {
            let bv: [__m512bh; NV] = std::array::from_fn(|v| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    bp.add(p * NR + v * 16) as *const _,
                ))
            });
            for (i, row) in acc.iter_mut().enumerate() {
                let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *ap.add(p * MR + i) as i32,
                ));
                for (v, lane) in row.iter_mut().enumerate() {
                    *lane = _mm512_dpbf16_ps(*lane, av, bv[v]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, lane) in row.iter().enumerate() {
                let dst = c.add(i * ldc + v * 16);
                let out = if load_c {
                    _mm512_add_ps(_mm512_loadu_ps(dst), *lane)
                } else {
                    *lane
                };
                _mm512_storeu_ps(dst, out);
            }
        }
    }
}

/// Elsewhere the kernels do not exist and `available()` is false, so the public entry
/// points panic (as documented) before reaching this.
#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    use super::View;

    /// # Safety
    /// Never called: `available()` is false on this architecture.
    pub(super) unsafe fn gemm_serial(_: *mut f32, _: usize, _: View, _: View, _: bool) {
        unreachable!("bf16 gemm: no AVX512-BF16 kernel on this architecture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn bf16(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f32() as f64
    }

    /// The product of the bf16-rounded operands in f64, plus `c0`.
    fn reference(a: View, b: View, c0: &[f32]) -> Vec<f64> {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let at = |v: &View, i: usize, j: usize| v.data[i * v.row_stride + j * v.col_stride];
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| bf16(at(&a, i, p)) * bf16(at(&b, p, j)))
                    .sum();
                out[i * n + j] = c0[i * n + j] as f64 + dot;
            }
        }
        out
    }

    /// Every layout the training products use (a row-major or transposed, b the same),
    /// odd and partial tile sizes, overwrite and accumulate, one thread and two (split by
    /// rows, and by columns): within f32 rounding of the exact bf16 product.
    #[test]
    fn matches_the_exact_product_of_bf16_operands() {
        if !testable("bf16_gemm::matches_the_exact_product_of_bf16_operands") {
            return;
        }
        // (m, k, n): partial tiles and odd k; k past one block; big enough to split by
        // rows (m ≥ n) and by columns (n > m).
        let shapes = [
            (13, 7, 50),
            (9, 301, 97),
            (3, 1000, 5),
            (300, 130, 120),
            (40, 160, 700),
        ];
        for (s, &(m, k, n)) in shapes.iter().enumerate() {
            let a_data = random(m * k, 10 * s as u64);
            let b_data = random(k * n, 10 * s as u64 + 1);
            for (a_t, b_t, accumulate) in [
                (false, false, false),
                (true, true, true),
                (false, true, false),
                (true, false, true),
            ] {
                let a = if a_t {
                    View::row_major(&a_data, k, m).t()
                } else {
                    View::row_major(&a_data, m, k)
                };
                let b = if b_t {
                    View::row_major(&b_data, n, k).t()
                } else {
                    View::row_major(&b_data, k, n)
                };
                let c0 = if accumulate {
                    random(m * n, 99)
                } else {
                    vec![0.0; m * n]
                };
                let mut c = if accumulate {
                    c0.clone()
                } else {
                    vec![f32::NAN; m * n]
                };
                gemm(&mut c, a, b, accumulate);
                let want = reference(a, b, &c0);
                for (i, (got, want)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (*got as f64 - want).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                        "{m}×{k}×{n}, a_t {a_t}, b_t {b_t}, accumulate {accumulate}: c[{i}] = {got}, want {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros_or_leaves_c() {
        if !testable("bf16_gemm::an_empty_inner_dimension_gives_zeros_or_leaves_c") {
            return;
        }
        let mut c = vec![5.0f32; 6];
        gemm(
            &mut c,
            View::row_major(&[], 2, 0),
            View::row_major(&[], 0, 3),
            true,
        );
        assert_eq!(c, vec![5.0; 6]);
        gemm(
            &mut c,
            View::row_major(&[], 2, 0),
            View::row_major(&[], 0, 3),
            false,
        );
        assert_eq!(c, vec![0.0; 6]);
    }
}
