//! Small statistics shared by the reports.

/// The Wilson score interval of a proportion at 95 % (`correct` of `n`): (low, high),
/// each in [0, 1]. It stays inside [0, 1] and is honest at 0 % and 100 %, where the normal
/// approximation collapses to a point. (0, 1) for n = 0.
pub fn wilson_95(correct: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let (n, p) = (n as f64, correct as f64 / n as f64);
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_by_hand() {
        // 14 of 20: 0.481–0.855 (the formula by hand).
        let (lo, hi) = wilson_95(14, 20);
        assert!(
            (lo - 0.481).abs() < 1e-3 && (hi - 0.855).abs() < 1e-3,
            "{lo} {hi}"
        );
        // 0 of 50: 0–0.071; never below 0 or above 1.
        let (lo, hi) = wilson_95(0, 50);
        assert!(lo < 1e-12 && (hi - 0.0713).abs() < 1e-3, "{lo} {hi}");
        assert_eq!(wilson_95(3, 0), (0.0, 1.0));
    }
}
