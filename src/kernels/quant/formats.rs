//! GGUF's block-quantized weight formats as llama.cpp's ggml writes them, each read into
//! one common form: a byte code per weight and, per group of 16 weights, a scale and an
//! offset, so that `w = scale·code − offset`. Every format below fits that form exactly
//! (up to f32 rounding of the scale products), so one dot-product kernel serves them all
//! and a new format needs only its unpacking here.
//!
//! Layouts (little-endian, `d`/`m`/`dmin` f16; a block of 32 or 256 weights):
//! - Q4_0 `d, qs[16]`: w = d·(q − 8), q a nibble; weight j low nibble of qs[j], j + 16 high.
//! - Q4_1 `d, m, qs[16]`: w = d·q + m.
//! - Q5_0 `d, qh[4], qs[16]`: q = nibble | bit j of qh (as bit 4); w = d·(q − 16).
//! - Q5_1 `d, m, qh[4], qs[16]`: w = d·q + m.
//! - Q8_0 `d, qs[32] (i8)`: w = d·q.
//! - Q4_K `d, dmin, scales[12], qs[128]` (256 weights): eight sub-blocks of 32 with 6-bit
//!   scale s and min m packed in `scales`; w = d·s·q − dmin·m; qs holds 64 weights per 32
//!   bytes, the first 32 in the low nibbles.
//! - Q6_K `ql[128], qh[64], scales[16] (i8), d` (256 weights): 6-bit q from a nibble of ql
//!   and two bits of qh; w = d·scales[i/16]·(q − 32).

use candle_core::quantized::GgmlDType;
use half::f16;

/// Weights that share one scale and offset, in every format.
pub const GROUP: usize = 16;

/// A block-quantized format computed on directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q6K,
}

impl Format {
    pub const ALL: [Format; 7] = [
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q8_0,
        Format::Q4K,
        Format::Q6K,
    ];

    /// The format of a GGUF tensor type; None for types read by dequantizing.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Format> {
        Some(match dtype {
            GgmlDType::Q4_0 => Format::Q4_0,
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q5_0 => Format::Q5_0,
            GgmlDType::Q5_1 => Format::Q5_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q6K => Format::Q6K,
            _ => return None,
        })
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Format::Q4_0 => GgmlDType::Q4_0,
            Format::Q4_1 => GgmlDType::Q4_1,
            Format::Q5_0 => GgmlDType::Q5_0,
            Format::Q5_1 => GgmlDType::Q5_1,
            Format::Q8_0 => GgmlDType::Q8_0,
            Format::Q4K => GgmlDType::Q4K,
            Format::Q6K => GgmlDType::Q6K,
        }
    }

    /// Activation values that share one scale in a product with this format: 256 for
    /// Q4_K, as llama.cpp's q8_K, so that a block's integer products add up before one
    /// conversion to f32 (`avx2::rows_q4k`); 32 for the others, llama.cpp's q8_0. Q6_K
    /// keeps 32: with 256 for it too, Qwen2.5-Coder-0.5B's next token differed from
    /// llama.cpp's at 9 of 768 positions instead of 3 (tests/quantized.rs); with 256 for
    /// Q4_K alone, at 4.
    pub fn activation_block(self) -> usize {
        match self {
            Format::Q4K => 256,
            _ => 32,
        }
    }

    /// Weights in one block.
    pub fn block_len(self) -> usize {
        match self {
            Format::Q4K | Format::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
            Format::Q8_0 => 34,
            Format::Q4K => 144,
            Format::Q6K => 210,
        }
    }

    /// Bytes of a row of `cols` weights (`cols` a multiple of the block length).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_len() * self.block_bytes()
    }

    /// A row of blocks as codes (one per weight) with a scale and offset per group of 16:
    /// `w = scale·code − offset`. The format is matched once per row, so each block's
    /// unpacking inlines into one loop.
    pub fn unpack_row(self, row: &[u8], codes: &mut [u8], scale: &mut [f32], offset: &mut [f32]) {
        match self {
            Format::Q4_0 => each_block(self, row, codes, scale, offset, unpack_q4_0),
            Format::Q4_1 => each_block(self, row, codes, scale, offset, unpack_q4_1),
            Format::Q5_0 => each_block(self, row, codes, scale, offset, unpack_q5_0),
            Format::Q5_1 => each_block(self, row, codes, scale, offset, unpack_q5_1),
            Format::Q8_0 => each_block(self, row, codes, scale, offset, unpack_q8_0),
            Format::Q4K => each_block(self, row, codes, scale, offset, unpack_q4k),
            Format::Q6K => each_block(self, row, codes, scale, offset, unpack_q6k),
        }
    }
}

/// How a packed tile (`packed`) stores a format's codes: nibbles (two codes a byte),
/// nibbles plus a bit mask of the fifth bits, nibbles plus a plane of 2-bit high parts,
/// or a byte each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeBits {
    Four,
    Five,
    Six,
    Eight,
}

/// What one block of one row keeps besides its codes once packed: the f16 bits of its
/// scale `d` and (for formats with a minimum) of `m`, and per sub-block a small integer
/// scale and minimum (K formats). `Format::group_scale` turns them into the group's
/// scale and offset exactly as `unpack_row` computes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockHeader {
    pub d: u16,
    pub m: u16,
    pub sub_scale: [u8; 16],
    pub sub_min: [u8; 16],
}

impl Format {
    pub fn code_bits(self) -> CodeBits {
        match self {
            Format::Q4_0 | Format::Q4_1 | Format::Q4K => CodeBits::Four,
            Format::Q5_0 | Format::Q5_1 => CodeBits::Five,
            Format::Q6K => CodeBits::Six,
            Format::Q8_0 => CodeBits::Eight,
        }
    }

    /// Whether a block has a second f16 (`m` of Q4_1 and Q5_1, `dmin` of Q4_K).
    pub fn has_min(self) -> bool {
        matches!(self, Format::Q4_1 | Format::Q5_1 | Format::Q4K)
    }

    /// Sub-blocks with their own integer scale: Q4_K's 8 of 32 weights, Q6_K's 16 of 16.
    pub fn sub_blocks(self) -> usize {
        match self {
            Format::Q4K => 8,
            Format::Q6K => 16,
            _ => 0,
        }
    }

    /// Whether each sub-block also has an integer minimum (Q4_K).
    pub fn has_sub_min(self) -> bool {
        self == Format::Q4K
    }

    /// The header of one block (`block_bytes` bytes).
    pub fn header(self, block: &[u8]) -> BlockHeader {
        let bits = |i: usize| u16::from_le_bytes([block[i], block[i + 1]]);
        let mut h = BlockHeader::default();
        match self {
            Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => h.d = bits(0),
            Format::Q4_1 | Format::Q5_1 => (h.d, h.m) = (bits(0), bits(2)),
            Format::Q4K => {
                (h.d, h.m) = (bits(0), bits(2));
                for j in 0..8 {
                    (h.sub_scale[j], h.sub_min[j]) = q4k_scale_min(j, &block[4..16]);
                }
            }
            Format::Q6K => {
                h.d = bits(208);
                h.sub_scale.copy_from_slice(&block[192..208]);
            }
        }
        h
    }

    /// Scale and offset of group `g` (of 16 weights) of a block with header `h`, as
    /// `unpack_row` computes them.
    pub fn group_scale(self, h: &BlockHeader, g: usize) -> (f32, f32) {
        let d = f16::from_bits(h.d).to_f32();
        let m = f16::from_bits(h.m).to_f32();
        match self {
            Format::Q4_0 => (d, 8.0 * d),
            Format::Q5_0 => (d, 16.0 * d),
            Format::Q8_0 => (d, 128.0 * d),
            Format::Q4_1 | Format::Q5_1 => (d, -m),
            Format::Q4K => (
                d * f32::from(h.sub_scale[g / 2]),
                m * f32::from(h.sub_min[g / 2]),
            ),
            Format::Q6K => {
                let s = d * f32::from(h.sub_scale[g] as i8);
                (s, 32.0 * s)
            }
        }
    }
}

/// `unpack` on every block of `row`, with each block's slices of the outputs.
#[inline(always)]
fn each_block(
    format: Format,
    row: &[u8],
    codes: &mut [u8],
    scale: &mut [f32],
    offset: &mut [f32],
    unpack: impl Fn(&[u8], &mut [u8], &mut [f32], &mut [f32]),
) {
    let (len, groups) = (format.block_len(), format.block_len() / GROUP);
    for (((block, codes), scale), offset) in row
        .chunks_exact(format.block_bytes())
        .zip(codes.chunks_exact_mut(len))
        .zip(scale.chunks_exact_mut(groups))
        .zip(offset.chunks_exact_mut(groups))
    {
        unpack(block, codes, scale, offset);
    }
}

#[inline(always)]
fn unpack_q4_0(block: &[u8], codes: &mut [u8], scale: &mut [f32], offset: &mut [f32]) {
    let d = f16_at(block, 0);
    nibbles(&block[2..18], codes);
    scale[..2].fill(d);
    offset[..2].fill(8.0 * d);
}

#[inline(always)]
fn unpack_q4_1(block: &[u8], codes: &mut [u8], scale: &mut [f32], offset: &mut [f32]) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    nibbles(&block[4..20], codes);
    scale[..2].fill(d);
    offset[..2].fill(-m);
}

#[inline(always)]
fn unpack_q5_0(block: &[u8], codes: &mut [u8], scale: &mut [f32], offset: &mut [f32]) {
    let d = f16_at(block, 0);
    five_bits(&block[2..6], &block[6..22], codes);
    scale[..2].fill(d);
    offset[..2].fill(16.0 * d);
}

#[inline(always)]
fn unpack_q5_1(block: &[u8], codes: &mut [u8], scale: &mut [f32], offset: &mut [f32]) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    five_bits(&block[4..8], &block[8..24], codes);
    scale[..2].fill(d);
    offset[..2].fill(-m);
}

#[inline(always)]
fn unpack_q8_0(block: &[u8], codes: &mut [u8], scale: &mut [f32], offset: &mut [f32]) {
    let d = f16_at(block, 0);
    // i8 q as the byte q + 128 (flipping the sign bit), so codes stay unsigned.
    for (c, &b) in codes[..32].iter_mut().zip(&block[2..34]) {
        *c = b ^ 0x80;
    }
    scale[..2].fill(d);
    offset[..2].fill(128.0 * d);
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// 16 bytes of nibbles as 32 codes: the low nibbles first, then the high ones.
#[inline(always)]
fn nibbles(qs: &[u8], codes: &mut [u8]) {
    let (low, high) = codes.split_at_mut(16);
    for ((l, h), &q) in low.iter_mut().zip(high.iter_mut()).zip(qs) {
        *l = q & 0x0F;
        *h = q >> 4;
    }
}

/// Nibbles plus a fifth bit per weight from the 32-bit mask `qh` (bit j for weight j),
/// eight weights at a time: `SPREAD[b]` holds bit k of the byte b as 0x10 in its byte k.
#[inline(always)]
fn five_bits(qh: &[u8], qs: &[u8], codes: &mut [u8]) {
    nibbles(qs, codes);
    for (c, &h) in codes[..32].chunks_exact_mut(8).zip(qh) {
        let high = SPREAD[h as usize].to_le_bytes();
        for (c, h) in c.iter_mut().zip(high) {
            *c |= h;
        }
    }
}

const SPREAD: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 8 {
            if b >> k & 1 == 1 {
                table[b] |= 0x10 << (8 * k);
            }
            k += 1;
        }
        b += 1;
    }
    table
};

/// Q4_K's 6-bit scale and min of sub-block `j` (0…7) from its 12 packed bytes.
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn unpack_q4k(block: &[u8], codes: &mut [u8], scale: &mut [f32], offset: &mut [f32]) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let scales = &block[4..16];
    let qs = &block[16..144];
    for chunk in 0..4 {
        nibbles_wide(
            &qs[32 * chunk..32 * chunk + 32],
            &mut codes[64 * chunk..64 * chunk + 64],
        );
    }
    for j in 0..8 {
        let (s, m) = q4k_scale_min(j, scales);
        // Sub-block j (32 weights) is groups 2j and 2j + 1.
        scale[2 * j..2 * j + 2].fill(d * f32::from(s));
        offset[2 * j..2 * j + 2].fill(dmin * f32::from(m));
    }
}

/// 32 bytes of nibbles as 64 codes: the 32 low nibbles, then the 32 high ones.
#[inline(always)]
fn nibbles_wide(qs: &[u8], codes: &mut [u8]) {
    let (low, high) = codes.split_at_mut(32);
    for ((l, h), &q) in low.iter_mut().zip(high.iter_mut()).zip(qs) {
        *l = q & 0x0F;
        *h = q >> 4;
    }
}

#[inline(always)]
fn unpack_q6k(block: &[u8], codes: &mut [u8], scale: &mut [f32], offset: &mut [f32]) {
    let (ql, qh) = (&block[0..128], &block[128..192]);
    let scales = &block[192..208];
    let d = f16_at(block, 208);
    // Each half of 128 weights takes 64 bytes of ql and 32 of qh: weight l (0…31) of its
    // four runs of 32 gets ql[l] low, ql[l + 32] low, ql[l] high, ql[l + 32] high, with
    // bit pairs 0, 2, 4, 6 of qh[l] on top.
    for half in 0..2 {
        let ql = &ql[64 * half..64 * half + 64];
        let qh = &qh[32 * half..32 * half + 32];
        let out = &mut codes[128 * half..128 * half + 128];
        for l in 0..32 {
            let h = qh[l];
            out[l] = (ql[l] & 0x0F) | ((h & 3) << 4);
            out[l + 32] = (ql[l + 32] & 0x0F) | (((h >> 2) & 3) << 4);
            out[l + 64] = (ql[l] >> 4) | (((h >> 4) & 3) << 4);
            out[l + 96] = (ql[l + 32] >> 4) | (((h >> 6) & 3) << 4);
        }
    }
    for (g, &s) in scales.iter().enumerate() {
        let s = d * f32::from(s as i8);
        scale[g] = s;
        offset[g] = 32.0 * s;
    }
}
