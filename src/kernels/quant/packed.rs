//! Weights repacked once, on load, into the order the product reads them: 16 rows at a
//! time (a tile), and within a tile, for every 4 columns, the 4 codes of row 0, then of
//! row 1, … row 15, so that one 512-bit register holds 4 columns of all 16 rows and
//! `vpdpbusd` gives the 16 rows' dot products at once.
//!
//! A tile is its blocks in column order (32 or 256 columns each, as in the file); a block
//! is its header, then its codes group by group (16 columns):
//! - header: the 16 rows' f16 `d`, their f16 `m` where the format has one, and per
//!   sub-block the 16 rows' integer scales (and minima), each a run of 16 — the same bits
//!   the file holds, only regrouped;
//! - codes of a group (4 runs r0 … r3 of 64 codes): 4-bit formats as two planes of 64
//!   bytes, r0 | r2 << 4 and r1 | r3 << 4; Q6_K adds a plane of the 2-bit high parts,
//!   byte i = hi(r0) | hi(r1) << 2 | hi(r2) << 4 | hi(r3) << 6; Q5_0 and Q5_1 add 4 bit
//!   masks of 64 bits, bit i of mask k = bit 4 of r_k's code i (an AVX-512 mask register
//!   each, which a masked add puts in place); 8-bit codes as the 4 runs.
//!
//! Every format takes exactly its file size except Q4_K, 2.8 % more (a byte per sub-block
//! scale where the file packs 6 bits). Repacking
//! once replaces the unpacking and transposition every product used to do (a third of a
//! decoding step).

use super::formats::{BlockHeader, CodeBits, Format, GROUP};
use rayon::prelude::*;

/// Weight rows in a tile: the 16 f32 lanes of one AVX-512 register.
pub const TILE: usize = 16;

/// Byte offsets of a packed tile's parts, for one format and row length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub format: Format,
    pub cols: usize,
    pub blocks: usize,
    pub groups_per_block: usize,
    /// Code bytes of one group of 16 columns × 16 rows.
    pub group_bytes: usize,
    /// Where the header's parts start, from the block's start.
    pub min_at: usize,
    pub sub_scale_at: usize,
    pub sub_min_at: usize,
    pub header_bytes: usize,
    pub block_bytes: usize,
    pub tile_bytes: usize,
}

impl Layout {
    pub fn new(format: Format, cols: usize) -> Layout {
        let groups_per_block = format.block_len() / GROUP;
        let group_bytes = match format.code_bits() {
            CodeBits::Four => 2 * 64,
            CodeBits::Five => 2 * 64 + 4 * 8,
            CodeBits::Six => 3 * 64,
            CodeBits::Eight => 4 * 64,
        };
        let runs = |n: usize| n * TILE;
        let min_at = runs(2);
        let sub_scale_at = min_at + if format.has_min() { runs(2) } else { 0 };
        let sub_min_at = sub_scale_at + runs(format.sub_blocks());
        let header_bytes = sub_min_at
            + if format.has_sub_min() {
                runs(format.sub_blocks())
            } else {
                0
            };
        let block_bytes = header_bytes + groups_per_block * group_bytes;
        let blocks = cols / format.block_len();
        Layout {
            format,
            cols,
            blocks,
            groups_per_block,
            group_bytes,
            min_at,
            sub_scale_at,
            sub_min_at,
            header_bytes,
            block_bytes,
            tile_bytes: blocks * block_bytes,
        }
    }

    /// Row `j`'s (0…15) header of the block starting at `block`.
    pub fn header(&self, block: &[u8], j: usize) -> BlockHeader {
        let f16_at = |at: usize| u16::from_le_bytes([block[at + 2 * j], block[at + 2 * j + 1]]);
        let mut h = BlockHeader {
            d: f16_at(0),
            ..BlockHeader::default()
        };
        if self.format.has_min() {
            h.m = f16_at(self.min_at);
        }
        for s in 0..self.format.sub_blocks() {
            h.sub_scale[s] = block[self.sub_scale_at + s * TILE + j];
            if self.format.has_sub_min() {
                h.sub_min[s] = block[self.sub_min_at + s * TILE + j];
            }
        }
        h
    }

    fn write_header(&self, block: &mut [u8], j: usize, h: &BlockHeader) {
        block[2 * j..2 * j + 2].copy_from_slice(&h.d.to_le_bytes());
        if self.format.has_min() {
            block[self.min_at + 2 * j..self.min_at + 2 * j + 2].copy_from_slice(&h.m.to_le_bytes());
        }
        for s in 0..self.format.sub_blocks() {
            block[self.sub_scale_at + s * TILE + j] = h.sub_scale[s];
            if self.format.has_sub_min() {
                block[self.sub_min_at + s * TILE + j] = h.sub_min[s];
            }
        }
    }

    /// Code of row `j`, column `col` of a packed tile.
    pub fn code(&self, tile: &[u8], j: usize, col: usize) -> u8 {
        let (block, in_block) = (col / self.format.block_len(), col % self.format.block_len());
        let group = &tile
            [block * self.block_bytes + self.header_bytes + in_block / GROUP * self.group_bytes..];
        let (run, at) = (in_block % GROUP / 4, 4 * j + col % 4);
        match self.format.code_bits() {
            CodeBits::Eight => group[run * 64 + at],
            bits => {
                let nibble = (group[(run % 2) * 64 + at] >> (4 * (run / 2))) & 0x0F;
                match bits {
                    CodeBits::Five => {
                        nibble | ((group[128 + 8 * run + at / 8] >> (at % 8)) & 1) << 4
                    }
                    CodeBits::Six => nibble | ((group[128 + at] >> (2 * run)) & 3) << 4,
                    _ => nibble,
                }
            }
        }
    }

    /// Scale and offset of row `j`, group `g` (`w = scale·code − offset`).
    pub fn group_scale(&self, tile: &[u8], j: usize, g: usize) -> (f32, f32) {
        let block = g / self.groups_per_block;
        let h = self.header(&tile[block * self.block_bytes..], j);
        self.format.group_scale(&h, g % self.groups_per_block)
    }

    /// Pack 16 rows' codes, already in runs (`runs`: `cols / 4` runs of 64), and headers.
    fn pack_tile(&self, runs: &[u8], headers: &[Vec<BlockHeader>], out: &mut [u8]) {
        for (b, block) in out.chunks_exact_mut(self.block_bytes).enumerate() {
            let (header, codes) = block.split_at_mut(self.header_bytes);
            for (j, row) in headers.iter().enumerate() {
                self.write_header(header, j, &row[b]);
            }
            for (gb, group) in codes.chunks_exact_mut(self.group_bytes).enumerate() {
                let g = b * self.groups_per_block + gb;
                let r: [&[u8]; 4] =
                    std::array::from_fn(|k| &runs[(4 * g + k) * 64..(4 * g + k + 1) * 64]);
                match self.format.code_bits() {
                    CodeBits::Eight => {
                        for (k, run) in r.iter().enumerate() {
                            group[k * 64..(k + 1) * 64].copy_from_slice(run);
                        }
                    }
                    bits => {
                        for i in 0..64 {
                            group[i] = (r[0][i] & 0x0F) | (r[2][i] & 0x0F) << 4;
                            group[64 + i] = (r[1][i] & 0x0F) | (r[3][i] & 0x0F) << 4;
                            if bits == CodeBits::Six {
                                group[128 + i] =
                                    (0..4).fold(0, |h, k| h | (r[k][i] >> 4) << (2 * k));
                            }
                        }
                        if bits == CodeBits::Five {
                            for (k, run) in r.iter().enumerate() {
                                let mask =
                                    (0..64).fold(0u64, |m, i| m | u64::from(run[i] >> 4 & 1) << i);
                                group[128 + 8 * k..128 + 8 * (k + 1)]
                                    .copy_from_slice(&mask.to_le_bytes());
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Tiles read and packed together: 512 rows, a few hundred KB of the file at a time.
const CHUNK_TILES: usize = 32;

/// Rows of GGUF blocks (`rows × row_bytes`, as in the file) read from `file` and packed
/// into tiles, a chunk of rows at a time (so that loading holds the packed matrix and one
/// chunk, not a second copy of the tensor); rows past the last of the final tile are
/// zeros (codes and scales), so they compute to 0.
pub fn pack_from(
    format: Format,
    rows: usize,
    cols: usize,
    file: &mut impl std::io::Read,
) -> std::io::Result<Vec<u8>> {
    let layout = Layout::new(format, cols);
    let row_bytes = format.row_bytes(cols);
    let mut packed = vec![0u8; rows.div_ceil(TILE) * layout.tile_bytes];
    let mut chunk = vec![0u8; rows.min(CHUNK_TILES * TILE) * row_bytes];
    for (c, out) in packed
        .chunks_mut(CHUNK_TILES * layout.tile_bytes)
        .enumerate()
    {
        let first = c * CHUNK_TILES * TILE;
        let n = (rows - first).min(CHUNK_TILES * TILE);
        let data = &mut chunk[..n * row_bytes];
        file.read_exact(data)?;
        pack_rows(&layout, n, data, out);
    }
    Ok(packed)
}

/// `n` rows of blocks packed into `out` (`n.div_ceil(16)` tiles), tiles in parallel.
fn pack_rows(layout: &Layout, n: usize, data: &[u8], out: &mut [u8]) {
    let (format, cols) = (layout.format, layout.cols);
    let row_bytes = format.row_bytes(cols);
    out.par_chunks_mut(layout.tile_bytes)
        .enumerate()
        .for_each(|(t, out)| {
            let first = t * TILE;
            let rows = (n - first).min(TILE);
            let (mut codes, mut runs) = (vec![0u8; TILE * cols], vec![0u8; TILE * cols]);
            let (mut scale, mut offset) = (vec![0f32; cols / GROUP], vec![0f32; cols / GROUP]);
            let mut headers = vec![vec![BlockHeader::default(); layout.blocks]; TILE];
            for j in 0..rows {
                let row = &data[(first + j) * row_bytes..(first + j + 1) * row_bytes];
                format.unpack_row(
                    row,
                    &mut codes[j * cols..(j + 1) * cols],
                    &mut scale,
                    &mut offset,
                );
                for (h, block) in headers[j]
                    .iter_mut()
                    .zip(row.chunks_exact(format.block_bytes()))
                {
                    *h = format.header(block);
                }
            }
            // SAFETY: both hold 16 rows of cols / 4 four-byte values.
            unsafe {
                transpose_rows(
                    codes.as_ptr() as *const u32,
                    cols / 4,
                    runs.as_mut_ptr() as *mut u32,
                )
            };
            layout.pack_tile(&runs, &headers, out);
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

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
    fn packed_tiles_hold_every_code_scale_and_offset_of_the_rows() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        // 21 rows: a full tile and a partial one.
        let (rows, cols) = (21, 512);
        for format in Format::ALL {
            let data: Vec<u8> = (0..rows * format.row_bytes(cols))
                .map(|_| rng.random())
                .collect();
            let layout = Layout::new(format, cols);
            let packed = pack_from(format, rows, cols, &mut &data[..]).unwrap();
            assert_eq!(packed.len(), 2 * layout.tile_bytes, "{format:?}");
            let groups = cols / GROUP;
            let (mut codes, mut scale, mut offset) =
                (vec![0u8; cols], vec![0f32; groups], vec![0f32; groups]);
            for r in 0..rows {
                let row_bytes = format.row_bytes(cols);
                format.unpack_row(
                    &data[r * row_bytes..(r + 1) * row_bytes],
                    &mut codes,
                    &mut scale,
                    &mut offset,
                );
                let tile = &packed[r / TILE * layout.tile_bytes..][..layout.tile_bytes];
                let j = r % TILE;
                for (c, &want) in codes.iter().enumerate() {
                    assert_eq!(layout.code(tile, j, c), want, "{format:?} row {r} col {c}");
                }
                for g in 0..groups {
                    let (s, o) = layout.group_scale(tile, j, g);
                    assert_eq!(
                        s.to_bits(),
                        scale[g].to_bits(),
                        "{format:?} row {r} group {g}"
                    );
                    assert_eq!(
                        o.to_bits(),
                        offset[g].to_bits(),
                        "{format:?} row {r} group {g}"
                    );
                }
            }
            // The padding rows of the last tile are zeros.
            let last = &packed[layout.tile_bytes..];
            assert!((rows % TILE..TILE).all(|j| layout.code(last, j, 5) == 0));
            assert!((rows % TILE..TILE).all(|j| layout.group_scale(last, j, 0).0 == 0.0));
        }
    }

    #[test]
    fn packed_sizes_match_the_files_where_the_format_allows() {
        for (format, per_row_of_blocks) in [
            (Format::Q4_0, 1.0),
            (Format::Q4_1, 1.0),
            (Format::Q5_0, 1.0),
            (Format::Q5_1, 1.0),
            (Format::Q8_0, 1.0),
            (Format::Q6K, 1.0),
            (Format::Q4K, 2368.0 / 2304.0),
        ] {
            let layout = Layout::new(format, 4096);
            let file = TILE * format.row_bytes(4096);
            assert_eq!(
                layout.tile_bytes as f64,
                file as f64 * per_row_of_blocks,
                "{format:?}"
            );
        }
    }
}
