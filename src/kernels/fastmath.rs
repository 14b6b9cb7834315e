//! Element-wise math for the fused training kernels, written so that loops over slices
//! vectorize: libm's `expf` is a call per element (perf: 5–6 % of a training step went to
//! `__expf_fma`, from the cross-entropy over the vocabulary, SwiGLU and the attention
//! softmax), and a sum or max folded element by element is a dependency chain the compiler
//! may not reorder. Here `exp` is branch-free arithmetic the compiler inlines into the
//! loop, and the reductions keep 16 running lanes.

const LANES: usize = 16;

/// e^x for f32, within 2 ulp of the exact value on [−87, 88]; 0 below −87 (e^−87 ≈ 1.6e−38,
/// the edge of the normal range), e^88 above 88. Written without branches so that a loop
/// calling it vectorizes.
///
/// x = n·ln 2 + r with n an integer and |r| ≤ ln 2 / 2; e^r by its Taylor series to r⁷
/// (truncation error below 5e−9 relative); 2^n built from the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact for |n| < 2^9 (Cody and Waite).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2^23 rounds to an integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n ∈ [−126, 127] after the clamp: a normal power of two.
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = p * two_n;
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// The largest element (−∞ for an empty slice; NaNs are skipped).
pub fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    tail.iter()
        .chain(lanes.iter())
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Σ e^(x − shift) over `xs`.
pub fn sum_exp(xs: &[f32], shift: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (s, &x) in lanes.iter_mut().zip(c) {
            *s += exp(x - shift);
        }
    }
    tail.iter().map(|&x| exp(x - shift)).sum::<f32>() + lanes.iter().sum::<f32>()
}

/// Σ a·b over two slices of the same length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(a, b, |y| y)
}

/// Σ a·value(b) over two slices of the same length (b in another number type, e.g. a
/// cached f16 row), in `LANES` independent sums, so that they vectorize.
pub fn dot_with<T: Copy>(a: &[f32], b: &[T], value: impl Fn(T) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, &y)| x * value(y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *s += x * value(y);
        }
    }
    tail + lanes.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two positive finite floats.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value_across_its_range() {
        // Reference: f64's exp rounded to f32 (correctly rounded for these inputs).
        let mut worst = 0;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let exact = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp(x), exact));
            x += 0.001_37;
        }
        for x in [-87.0f32, -1e-7, 0.0, 1e-7, 0.5, 1.0, 88.0] {
            worst = worst.max(ulps(exp(x), (x as f64).exp() as f32));
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn exp_flushes_below_the_normal_range_and_saturates_above() {
        assert_eq!(exp(-88.0), 0.0);
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(1e9), exp(88.0));
        assert!(exp(88.0).is_finite());
    }

    #[test]
    fn reductions_match_plain_loops_for_every_tail_length() {
        for n in [0usize, 1, 15, 16, 17, 40, 1000] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 101) as f32 * 0.1 - 5.0)
                .collect();
            let ys: Vec<f32> = (0..n).map(|i| ((i * 13) % 7) as f32 - 3.0).collect();
            let m = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&xs), m, "max, n = {n}");
            let s: f64 = xs.iter().map(|&x| ((x - 1.0) as f64).exp()).sum();
            assert!(
                (sum_exp(&xs, 1.0) as f64 - s).abs() <= 1e-5 * s.max(1.0),
                "sum_exp, n = {n}"
            );
            let d: f64 = xs.iter().zip(&ys).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((dot(&xs, &ys) as f64 - d).abs() <= 1e-3, "dot, n = {n}");
        }
    }
}
