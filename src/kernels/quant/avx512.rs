//! The AVX-512 VNNI product kernel: a group of 16 columns of a tile decoded into 4
//! registers, each holding 4 columns of the 16 rows, against 4 broadcast activation bytes
//! each (`vpdpbusd`: 16 rows' 4-term integer dot products at once), summed in integers
//! and scaled once, in f32: the 16 rows' scales are one register, and so is the result.

use super::activations::Q8Row;
use super::formats::{CodeBits, Format, GROUP};
use super::matmul::{tiles_simd, QMatrix};
use super::packed::{Layout, TILE};
use std::arch::x86_64::*;

/// Whether this CPU has AVX-512 F, BW and VNNI.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// The products of tiles `first…` with every activation row (`matmul::Kernel`); only
/// where `available`.
pub fn tiles(m: &QMatrix, first: usize, acts: &[Q8Row], out: &mut [[f32; TILE]]) {
    debug_assert!(available());
    // SAFETY: `KernelChoice` picks this kernel only where `available`; each pair is
    // compiled for the matrix's code width.
    unsafe {
        match m.format.code_bits() {
            CodeBits::Four => tiles_simd(m, first, acts, out, rows::<4, 4>, rows::<1, 4>),
            CodeBits::Five => tiles_simd(m, first, acts, out, rows::<4, 5>, rows::<1, 5>),
            CodeBits::Six => tiles_simd(m, first, acts, out, rows::<4, 6>, rows::<1, 6>),
            CodeBits::Eight => tiles_simd(m, first, acts, out, rows::<4, 8>, rows::<1, 8>),
        }
    }
}

/// The 16 rows' scales and offsets of each group of the block at `block`, from its
/// header, computed as `Format::group_scale` computes them.
///
/// # Safety
/// As `rows`; `block` starts a whole block of a tile laid out by `l`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_scales(
    l: &Layout,
    block: *const u8,
    scale: &mut [__m512; 16],
    offset: &mut [__m512; 16],
) {
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
/// As `rows`; `codes` starts a group's `BITS`-wide codes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn group_codes<const BITS: u8>(codes: *const u8) -> [__m512i; 4] {
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
    if BITS == 5 {
        // Run k's fifth bits are a 64-bit mask: add 16 to the codes it selects.
        let sixteen = _mm512_set1_epi8(16);
        for (k, c) in c.iter_mut().enumerate() {
            let mask = (codes.add(128 + 8 * k) as *const u64).read_unaligned();
            *c = _mm512_mask_add_epi8(*c, mask, *c, sixteen);
        }
    }
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
/// The CPU has AVX-512 F, BW and VNNI (`available`); `tile` is a whole tile laid
/// out by `l` with codes `BITS` wide; every row of `a` has `l.cols` columns.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows<const R: usize, const BITS: u8>(
    l: &Layout,
    tile: *const u8,
    a: [Q8Row; R],
) -> [[f32; TILE]; R] {
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
