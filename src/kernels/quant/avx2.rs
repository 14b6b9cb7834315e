//! The AVX2 product kernel, for x86-64 CPUs without AVX-512 VNNI (Intel Haswell to the
//! client cores without AVX-512, AMD Zen 1 to 3): the AVX-512 kernel's order with each
//! 16-row register split into two halves of 8 rows (rows 0–7 and 8–15 of a tile, one
//! after the other within each block), and each `vpdpbusd` replaced by `vpmaddubsw`
//! (pairs of u8 code × i8 byte summed into i16, saturating) then `vpmaddwd` against ones
//! (pairs of i16 into i32).
//!
//! No i16 sum can saturate: with bytes in −127…127 a pair is at most 2·15·127 = 3,810 for
//! 4-bit codes, 2·31·127 = 7,874 for 5-bit and 2·63·127 = 16,002 for 6-bit ones, so the
//! four runs of a group are added in i16 before widening (two and two for 6-bit codes).
//! 8-bit codes (Q8_0) would saturate (2·255·127), so they are made signed, code − 128
//! (which drops Q8_0's offset of 128·d), and multiplied as |w| × (x with w's sign),
//! at most 2·128·127 = 32,512 a pair.
//!
//! The integer sums equal the AVX-512 kernel's; the f32 steps after them are the same,
//! except for Q4_K (`rows_q4k`): there the sub-scales multiply in `vpmaddwd` instead of
//! ones and a block of 256 is summed in integers before one conversion, five vector
//! operations fewer a group and row than `rows` and no register spilled (see
//! docs/PERFORMANCE.md for what it measured).
//!
//! One activation row (a step decoding one sequence) has its own kernels, `row` and
//! `row_q4k`: with no other rows to share a tile's loads, the arithmetic bounds the
//! product, and taking both halves of a group together broadcasts the activation bytes
//! once instead of twice.

use super::activations::Q8Row;
use super::formats::{CodeBits, Format, GROUP};
use super::matmul::{tiles_simd, QMatrix};
use super::packed::{Layout, TILE};
use std::arch::x86_64::*;

/// Whether this CPU has AVX2, FMA and F16C.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The products of tiles `first…` with every activation row (`matmul::Kernel`); only
/// where `available`.
pub fn tiles(m: &QMatrix, first: usize, acts: &[Q8Row], out: &mut [[f32; TILE]]) {
    debug_assert!(available());
    // SAFETY: `KernelChoice` picks this kernel only where `available`; each pair is
    // compiled for the matrix's format or code width.
    unsafe {
        match (m.format, m.format.code_bits()) {
            (Format::Q4K, _) => tiles_simd(m, first, acts, out, rows_q4k, row_q4k),
            (_, CodeBits::Four) => tiles_simd(m, first, acts, out, rows::<4>, row::<4>),
            (_, CodeBits::Five) => tiles_simd(m, first, acts, out, rows::<5>, row::<5>),
            (_, CodeBits::Six) => tiles_simd(m, first, acts, out, rows::<6>, row::<6>),
            (_, CodeBits::Eight) => tiles_simd(m, first, acts, out, rows::<8>, row::<8>),
        }
    }
}

/// Half `h`'s 8 values of the run of 16 f16s at `at` of a block's header, as f32.
///
/// # Safety
/// As `rows`; the run lies inside the block at `block`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_f16s(block: *const u8, at: usize, h: usize) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(block.add(at + 16 * h) as *const _))
}

/// Half `h`'s 8 bytes of the run of 16 at `at` of a block's header.
///
/// # Safety
/// As `half_f16s`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_bytes(block: *const u8, at: usize, h: usize) -> __m128i {
    _mm_loadl_epi64(block.add(at + 8 * h) as *const _)
}

/// Activation row `a`'s 4 runs of 4 bytes of group `g`, each broadcast to every lane.
///
/// # Safety
/// As `rows`; `a` has group `g`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_bytes(a: &Q8Row, g: usize) -> [__m256i; 4] {
    let q = a.qs.as_ptr().add(g * GROUP) as *const i32;
    [0, 1, 2, 3].map(|k| _mm256_set1_epi32(q.add(k).read_unaligned()))
}

/// Half `h`'s 8 rows' scales and offsets of each group of the block at `block`, from its
/// header, computed as `Format::group_scale` computes them, except Q8_0's offset: 0, as
/// its codes are made signed.
///
/// # Safety
/// As `rows`; `block` starts a whole block of a tile laid out by `l`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_scales(
    l: &Layout,
    block: *const u8,
    h: usize,
    scale: &mut [__m256; 16],
    offset: &mut [__m256; 16],
) {
    let f16s = |at: usize| half_f16s(block, at, h);
    let bytes = |at: usize| half_bytes(block, at, h);
    let d = f16s(0);
    match l.format {
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => {
            let k = match l.format {
                Format::Q4_0 => 8.0,
                Format::Q5_0 => 16.0,
                _ => 0.0,
            };
            let o = _mm256_mul_ps(_mm256_set1_ps(k), d);
            (scale[0], scale[1], offset[0], offset[1]) = (d, d, o, o);
        }
        Format::Q4_1 | Format::Q5_1 => {
            let o = _mm256_xor_ps(f16s(l.min_at), _mm256_set1_ps(-0.0));
            (scale[0], scale[1], offset[0], offset[1]) = (d, d, o, o);
        }
        Format::Q4K => {
            let dmin = f16s(l.min_at);
            for j in 0..8 {
                let s = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes(l.sub_scale_at + 16 * j)));
                let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes(l.sub_min_at + 16 * j)));
                let (s, m) = (_mm256_mul_ps(d, s), _mm256_mul_ps(dmin, m));
                (scale[2 * j], scale[2 * j + 1]) = (s, s);
                (offset[2 * j], offset[2 * j + 1]) = (m, m);
            }
        }
        Format::Q6K => {
            for g in 0..16 {
                let s = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes(l.sub_scale_at + 16 * g)));
                scale[g] = _mm256_mul_ps(d, s);
                offset[g] = _mm256_mul_ps(_mm256_set1_ps(32.0), scale[g]);
            }
        }
    }
}

/// Half `h` of a group's 4 runs (rows 8h … 8h + 7), one register each; 8-bit codes made
/// signed.
///
/// # Safety
/// As `rows`; `codes` starts a group's `BITS`-wide codes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_codes<const BITS: u8>(codes: *const u8, h: usize) -> [__m256i; 4] {
    let load = |k: usize| _mm256_loadu_si256(codes.add(64 * k + 32 * h) as *const _);
    if BITS == 8 {
        let sign = _mm256_set1_epi8(i8::MIN);
        return [0, 1, 2, 3].map(|k| _mm256_xor_si256(load(k), sign));
    }
    let low = _mm256_set1_epi8(0x0F);
    let (a, b) = (load(0), load(1));
    let mut c = [
        _mm256_and_si256(a, low),
        _mm256_and_si256(b, low),
        _mm256_and_si256(_mm256_srli_epi16::<4>(a), low),
        _mm256_and_si256(_mm256_srli_epi16::<4>(b), low),
    ];
    if BITS == 5 {
        // This half's 32 bits of run k's mask spread to its 32 bytes: byte i takes the
        // mask byte holding bit i (a shuffle within each 128-bit lane of the broadcast
        // mask), keeps bit i % 8 and becomes 16 where it is set.
        #[rustfmt::skip]
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let sixteen = _mm256_set1_epi8(16);
        for (k, c) in c.iter_mut().enumerate() {
            let mask = (codes.add(128 + 8 * k + 4 * h) as *const i32).read_unaligned();
            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(mask), spread);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
            *c = _mm256_or_si256(*c, _mm256_and_si256(set, sixteen));
        }
    }
    if BITS == 6 {
        // As the AVX-512 kernel: bits 2k, 2k + 1 of each high-part byte to bits 4, 5.
        let (hi, top) = (load(2), _mm256_set1_epi8(0x30));
        let high = [
            _mm256_slli_epi16::<4>(hi),
            _mm256_slli_epi16::<2>(hi),
            hi,
            _mm256_srli_epi16::<2>(hi),
        ];
        for k in 0..4 {
            c[k] = _mm256_or_si256(c[k], _mm256_and_si256(high[k], top));
        }
    }
    c
}

/// The group's 8 rows' integer dot products: codes `c` (run k) against the 4 activation
/// bytes broadcast in `x` (run k), as the module comment bounds them, widened to i32 by
/// `vpmaddwd` against `by`: 16-bit ones for the plain sums (`rows`), the rows' integer
/// sub-scales for Q4_K (`rows_q4k`).
///
/// # Safety
/// As `rows`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_dot<const BITS: u8>(c: &[__m256i; 4], x: [__m256i; 4], by: __m256i) -> __m256i {
    let widen = |p: __m256i| _mm256_madd_epi16(p, by);
    if BITS == 8 {
        let p =
            |k: usize| _mm256_maddubs_epi16(_mm256_abs_epi8(c[k]), _mm256_sign_epi8(x[k], c[k]));
        return _mm256_add_epi32(
            _mm256_add_epi32(widen(p(0)), widen(p(1))),
            _mm256_add_epi32(widen(p(2)), widen(p(3))),
        );
    }
    let p = |k: usize| _mm256_maddubs_epi16(c[k], x[k]);
    let (low, high) = (_mm256_add_epi16(p(0), p(1)), _mm256_add_epi16(p(2), p(3)));
    if BITS == 6 {
        _mm256_add_epi32(widen(low), widen(high))
    } else {
        widen(_mm256_add_epi16(low, high))
    }
}

/// The tile at `tile`'s 16 rows against 4 activation rows, one half of 8 rows at a time
/// (so that the 4 rows' two accumulators of a half, its codes and the activation bytes
/// fit AVX2's 16 registers): per group, the 8 rows' integer sums converted once and
/// scaled by their scales times the activation scale; the offsets times the activations'
/// group sums in a second f32 accumulator.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (`available`); `tile` is a whole tile laid out by `l`
/// with codes `BITS` wide; every row of `a` has `l.cols` columns.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const BITS: u8>(l: &Layout, tile: *const u8, a: [Q8Row; 4]) -> [[f32; TILE]; 4] {
    debug_assert!(a.iter().all(|a| fits(l, a)));
    let mut scale = [[_mm256_setzero_ps(); 16]; 2];
    let mut offset = [[_mm256_setzero_ps(); 16]; 2];
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    let mut off = [[_mm256_setzero_ps(); 4]; 2];
    for b in 0..l.blocks {
        let block = tile.add(b * l.block_bytes);
        let codes = block.add(l.header_bytes);
        both_block_scales(l, block, &mut scale, &mut offset);
        for h in 0..2 {
            for gb in 0..l.groups_per_block {
                let g = b * l.groups_per_block + gb;
                let c = group_codes::<BITS>(codes.add(gb * l.group_bytes), h);
                for r in 0..4 {
                    let x = group_bytes(&a[r], g);
                    let sums = group_dot::<BITS>(&c, x, ones);
                    let (acc, off) = (&mut acc[h][r], &mut off[h][r]);
                    add_group(acc, off, sums, scale[h][gb], offset[h][gb], &a[r], g);
                }
            }
        }
    }
    [0, 1, 2, 3].map(|r| tile_outputs([acc[0][r], acc[1][r]], [off[0][r], off[1][r]]))
}

/// `rows` for one activation row (a decoding step of one sequence, where the product
/// streams the weights once and the arithmetic bounds it): both halves of a group at
/// once, so the activation bytes are broadcast once for 16 rows instead of twice. The
/// integer sums are the same and the f32 steps are `rows`' in the same order, so a row's
/// result is bit-identical to `rows`'.
///
/// # Safety
/// As `rows`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row<const BITS: u8>(l: &Layout, tile: *const u8, a: [Q8Row; 1]) -> [[f32; TILE]; 1] {
    let a = &a[0];
    debug_assert!(fits(l, a));
    let mut scale = [[_mm256_setzero_ps(); 16]; 2];
    let mut offset = [[_mm256_setzero_ps(); 16]; 2];
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut off = [_mm256_setzero_ps(); 2];
    for b in 0..l.blocks {
        let block = tile.add(b * l.block_bytes);
        let codes = block.add(l.header_bytes);
        both_block_scales(l, block, &mut scale, &mut offset);
        for gb in 0..l.groups_per_block {
            let g = b * l.groups_per_block + gb;
            let x = group_bytes(a, g);
            for h in 0..2 {
                let c = group_codes::<BITS>(codes.add(gb * l.group_bytes), h);
                let sums = group_dot::<BITS>(&c, x, ones);
                add_group(
                    &mut acc[h],
                    &mut off[h],
                    sums,
                    scale[h][gb],
                    offset[h][gb],
                    a,
                    g,
                );
            }
        }
    }
    [tile_outputs(acc, off)]
}

/// Both halves' scales and offsets of the block at `block` (`block_scales`).
///
/// # Safety
/// As `block_scales`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn both_block_scales(
    l: &Layout,
    block: *const u8,
    scale: &mut [[__m256; 16]; 2],
    offset: &mut [[__m256; 16]; 2],
) {
    for h in 0..2 {
        block_scales(l, block, h, &mut scale[h], &mut offset[h]);
    }
}

/// A tile's 16 outputs for one activation row: its two halves' accumulators minus their
/// offset terms.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (`available`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_outputs(acc: [__m256; 2], off: [__m256; 2]) -> [f32; TILE] {
    halves([_mm256_sub_ps(acc[0], off[0]), _mm256_sub_ps(acc[1], off[1])])
}

/// A tile's 16 outputs from its halves' 8 each (rows 0–7, 8–15).
///
/// # Safety
/// As `tile_outputs`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn halves(y: [__m256; 2]) -> [f32; TILE] {
    let mut out = [0f32; TILE];
    for (h, y) in y.into_iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), y);
    }
    out
}

/// Whether activation row `a` has the columns and group scales of a tile laid out by `l`.
fn fits(l: &Layout, a: &Q8Row) -> bool {
    a.qs.len() == l.cols && a.scale.len() == l.cols / GROUP
}

/// One group's 8 rows into their accumulators: the integer `sums` times the rows'
/// scales `ws` times activation row `a`'s scale of group `g`; the offsets `wo` times its
/// group sum.
///
/// # Safety
/// As `rows`; `a` has group `g`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_group(
    acc: &mut __m256,
    off: &mut __m256,
    sums: __m256i,
    ws: __m256,
    wo: __m256,
    a: &Q8Row,
    g: usize,
) {
    let s = _mm256_mul_ps(ws, _mm256_set1_ps(*a.scale.get_unchecked(g)));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), s, *acc);
    let sum = _mm256_set1_ps(*a.sum.get_unchecked(g));
    *off = _mm256_fmadd_ps(wo, sum, *off);
}

/// Half `h`'s integer sub-scales and minima of a Q4_K block as `vpmaddwd` takes them: a
/// row's value in both 16-bit halves of its 32-bit lane, one register per sub-block of
/// 32 (groups 2k and 2k + 1).
///
/// # Safety
/// As `rows_q4k`; `block` starts a whole block of a tile laid out by `l`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_block_integers(
    l: &Layout,
    block: *const u8,
    h: usize,
    scale: &mut [__m256i; 8],
    min: &mut [__m256i; 8],
) {
    let twice = |at: usize| {
        let v = _mm256_cvtepu8_epi32(half_bytes(block, at, h));
        _mm256_or_si256(v, _mm256_slli_epi32::<16>(v))
    };
    for k in 0..8 {
        scale[k] = twice(l.sub_scale_at + 16 * k);
        min[k] = twice(l.sub_min_at + 16 * k);
    }
}

/// `rows` for Q4_K (w = d·s·q − dmin·m), whose activations share one scale per block of
/// 256 (`Format::activation_block`): a group's products are multiplied by the integer
/// sub-scales in `vpmaddwd` (instead of by ones) and a block's add up in integers; its
/// minima multiply the activations' integer group sums the same way; so a block is
/// converted to f32 twice instead of once a group.
///
/// No sum can overflow: a row's i16 pair sums of a group are at most 15,240 (as
/// `group_dot`), so a group adds at most 2 · 15,240 · 63 (under 2²¹) to a lane, 16 groups
/// a block; the minima's sum is at most 16 · 63 · 2,032.
///
/// # Safety
/// As `rows`, for a Q4_K matrix whose activation rows were quantized in blocks of 256.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q4k(l: &Layout, tile: *const u8, a: [Q8Row; 4]) -> [[f32; TILE]; 4] {
    debug_assert!(l.format == Format::Q4K && l.groups_per_block == 16);
    debug_assert!(a.iter().all(|a| fits_q4k(l, a)));
    let mut scale = [_mm256_setzero_si256(); 8];
    let mut min = [_mm256_setzero_si256(); 8];
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    for b in 0..l.blocks {
        let block = tile.add(b * l.block_bytes);
        let codes = block.add(l.header_bytes);
        for (h, acc) in acc.iter_mut().enumerate() {
            q4k_block_integers(l, block, h, &mut scale, &mut min);
            let mut dots = [_mm256_setzero_si256(); 4];
            for gb in 0..16 {
                let c = group_codes::<4>(codes.add(gb * l.group_bytes), h);
                let s = scale[gb / 2];
                for r in 0..4 {
                    let x = group_bytes(&a[r], 16 * b + gb);
                    dots[r] = _mm256_add_epi32(dots[r], group_dot::<4>(&c, x, s));
                }
            }
            for r in 0..4 {
                add_q4k_block(&mut acc[r], dots[r], &min, block, l, h, &a[r], b);
            }
        }
    }
    [0, 1, 2, 3].map(|r| halves([acc[0][r], acc[1][r]]))
}

/// `rows_q4k` for one activation row, both halves of a group at once (as `row`);
/// bit-identical to `rows_q4k`'s result for the row.
///
/// # Safety
/// As `rows_q4k`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_q4k(l: &Layout, tile: *const u8, a: [Q8Row; 1]) -> [[f32; TILE]; 1] {
    debug_assert!(l.format == Format::Q4K && l.groups_per_block == 16);
    let a = &a[0];
    debug_assert!(fits_q4k(l, a));
    let mut scale = [[_mm256_setzero_si256(); 8]; 2];
    let mut min = [[_mm256_setzero_si256(); 8]; 2];
    let mut acc = [_mm256_setzero_ps(); 2];
    for b in 0..l.blocks {
        let block = tile.add(b * l.block_bytes);
        let codes = block.add(l.header_bytes);
        for h in 0..2 {
            q4k_block_integers(l, block, h, &mut scale[h], &mut min[h]);
        }
        let mut dots = [_mm256_setzero_si256(); 2];
        for gb in 0..16 {
            let x = group_bytes(a, 16 * b + gb);
            for h in 0..2 {
                let c = group_codes::<4>(codes.add(gb * l.group_bytes), h);
                dots[h] = _mm256_add_epi32(dots[h], group_dot::<4>(&c, x, scale[h][gb / 2]));
            }
        }
        for h in 0..2 {
            add_q4k_block(&mut acc[h], dots[h], &min[h], block, l, h, a, b);
        }
    }
    [halves(acc)]
}

/// Whether activation row `a` has the columns and group sums of a Q4_K tile laid out by
/// `l`.
fn fits_q4k(l: &Layout, a: &Q8Row) -> bool {
    a.qs.len() == l.cols && a.int_sum.len() == l.cols / GROUP
}

/// Block `b`'s half `h` of 8 rows into their accumulator: the integer `dots` times
/// d · the activation scale, minus Σ over sub-blocks k of m_k · (the activations' byte
/// sums of groups 2k and 2k + 1) times dmin · the activation scale.
///
/// # Safety
/// As `rows_q4k`; `block` is block `b` of the tile, `min` its half `h`'s minima.
#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_q4k_block(
    acc: &mut __m256,
    dots: __m256i,
    min: &[__m256i; 8],
    block: *const u8,
    l: &Layout,
    h: usize,
    a: &Q8Row,
    b: usize,
) {
    let first = 16 * b;
    let sums = a.int_sum.as_ptr().add(first) as *const i32;
    let mut mins = _mm256_setzero_si256();
    for (k, &m) in min.iter().enumerate() {
        let two = _mm256_set1_epi32(sums.add(k).read_unaligned());
        mins = _mm256_add_epi32(mins, _mm256_madd_epi16(m, two));
    }
    let (d, dmin) = (half_f16s(block, 0, h), half_f16s(block, l.min_at, h));
    let x_scale = _mm256_set1_ps(*a.scale.get_unchecked(first));
    let (s, m) = (_mm256_mul_ps(d, x_scale), _mm256_mul_ps(dmin, x_scale));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), s, *acc);
    *acc = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mins), m, *acc);
}
