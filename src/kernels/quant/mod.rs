//! Products on weights kept in GGUF's block-quantized formats, so that a model is held
//! in memory at its file size rather than at 4 bytes a parameter, and a decoding step
//! streams that much less memory.
//!
//! `formats` reads every supported format into one form (a byte code per weight, a scale
//! and an offset per 16 weights); `packed` regroups a matrix's rows on load, 16 at a time,
//! in the order the product reads them; `activations` quantizes the input rows to 8 bits
//! per block of 32 values (256 for Q4_K) on the fly, as llama.cpp does; `matmul`
//! multiplies the two with integer dot products. Tests compare each format with candle's
//! dequantization (an independent reading of the same layouts) and the product with an
//! f64 product of the dequantized weights.

pub mod activations;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod formats;
pub mod matmul;
pub mod packed;

pub use formats::Format;
pub use matmul::{KernelChoice, QMatrix, KERNEL_ENV};

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// Weights like a trained layer's: mostly small, a few large (the blocks' scales then
    /// differ from block to block, as in real files).
    fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..rows * cols)
            .map(|_| {
                let w: f32 = rng.random_range(-0.05..0.05);
                if rng.random_bool(0.01) {
                    w * 20.0
                } else {
                    w
                }
            })
            .collect()
    }

    /// The matrix as candle quantizes it, with candle's own dequantization beside it.
    fn quantized(format: Format, rows: usize, cols: usize, seed: u64) -> (QMatrix, Vec<f32>) {
        let w = Tensor::from_vec(weights(rows, cols, seed), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, format.ggml()).unwrap();
        let reference = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let m = QMatrix::new(format, rows, cols, &q.data().unwrap()).unwrap();
        (m, reference)
    }

    #[test]
    fn every_format_reads_as_candle_dequantizes_it() {
        for format in Format::ALL {
            let (m, reference) = quantized(format, 6, 512, 1);
            let ours = m.dequantize();
            let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
            let worst = ours
                .iter()
                .zip(&reference)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            // Equal up to the rounding of scale·code − offset against candle's order of
            // operations.
            assert!(
                worst <= 1e-6 * scale,
                "{format:?}: largest difference {worst} (weights up to {scale})"
            );
            let mut row = vec![0f32; 512];
            m.dequantize_row(3, &mut row);
            assert_eq!(row, ours[3 * 512..4 * 512], "{format:?}: one row");
        }
    }

    /// Compares `m`'s product with the f64 product of the dequantized weights. Returns the
    /// worst |y − reference| over ‖w‖·‖x‖ (the product's natural scale), and checks every
    /// output against the rounding bound: each activation moves by at most half its step
    /// (max |x| of its block of 32 or 256 / 127), so |y − reference| ≤ Σ |w| · step / 2.
    fn check_product(m: &QMatrix, x: &[f32]) -> f64 {
        let w = m.dequantize();
        let y = m.matmul(x).unwrap();
        let rows = x.len() / m.cols;
        let block = m.format.activation_block();
        let mut worst = 0f64;
        for i in 0..rows {
            let xi = &x[i * m.cols..(i + 1) * m.cols];
            let steps: Vec<f64> = xi
                .chunks(block)
                .map(|b| f64::from(b.iter().fold(0f32, |a, v| a.max(v.abs()))) / 127.0)
                .collect();
            let x_norm = xi.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            for r in 0..m.rows {
                let wr = &w[r * m.cols..(r + 1) * m.cols];
                let exact: f64 = wr
                    .iter()
                    .zip(xi)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                let bound: f64 = wr
                    .iter()
                    .enumerate()
                    .map(|(e, a)| f64::from(a.abs()) * steps[e / block] / 2.0)
                    .sum();
                let w_norm = wr.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
                let err = (f64::from(y[i * m.rows + r]) - exact).abs();
                // f32 sums of the scaled group products add a little to the rounding.
                assert!(
                    err <= 1.001 * bound + 1e-5 * w_norm * x_norm,
                    "{:?} row {r}: |y − exact| = {err}, rounding bound {bound}",
                    m.format
                );
                worst = worst.max(err / (w_norm * x_norm));
            }
        }
        worst
    }

    #[test]
    fn products_match_the_dequantized_f32_product() {
        let (rows, cols, m) = (40, 768, 5);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Activations with an outlier channel, as hidden states have.
        let x: Vec<f32> = (0..m * cols)
            .map(|k| {
                let v: f32 = rng.random_range(-1.0..1.0);
                if k % cols == 17 {
                    v * 30.0
                } else {
                    v
                }
            })
            .collect();
        for format in Format::ALL {
            let (q, _) = quantized(format, rows, cols, 2);
            let err = check_product(&q, &x);
            eprintln!("{format:?}: worst |y − f32 reference| / (‖w‖·‖x‖) = {err:.2e}");
        }
    }

    #[test]
    fn a_row_alone_gives_the_same_bits_as_in_a_batch() {
        // 7 rows: 4 through the kernels' four-row path, 3 through the one-row path.
        let x: Vec<f32> = weights(7, 512, 4).iter().map(|v| v * 10.0).collect();
        for format in Format::ALL {
            let (q, _) = quantized(format, 33, 512, 3);
            let batch = q.matmul(&x).unwrap();
            for i in 0..7 {
                let alone = q.matmul(&x[i * 512..(i + 1) * 512]).unwrap();
                assert_eq!(alone, batch[i * 33..(i + 1) * 33], "{format:?} row {i}");
            }
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let err = QMatrix::new(Format::Q4K, 2, 100, &[0; 10]).err().unwrap();
        assert!(err.to_string().contains("multiple of 256"), "{err}");
        let err = QMatrix::new(Format::Q8_0, 2, 64, &[0; 100]).err().unwrap();
        assert!(err.to_string().contains("takes 136 bytes"), "{err}");
    }
}
