//! Matrix products on strided f32 views: the gemm crate (as candle's matmul uses it), or
//! bf16 operands with f32 sums on `bf16_gemm`. The building block of the linear, LoRA and
//! attention ops.

use super::bf16_gemm::View;

/// `c (+)= scale · a · b` in f32 (the gemm crate, as candle's matmul) for strided views,
/// `c` row-major with row stride `ldc`; `accumulate` adds to what `c` holds. On every
/// rayon thread when `parallel`, else on the calling thread.
pub(crate) fn f32_product(
    c: &mut [f32],
    ldc: usize,
    (a, b): (View, View),
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    super::bf16_gemm::assert_product_fits(c, ldc, &a, &b, "f32 product");
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: c spans m rows of stride ldc ≥ n and both views fit their data (asserted);
    // the gemm crate reads element (i, j) of a view at i·row_stride + j·col_stride.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `c (+)= a · b` into a row-major `c` `[a.rows, b.cols]`, in f32 or, with `bf16`, in
/// bf16 operands with f32 sums (`super::bf16_gemm`), on every rayon thread.
pub(crate) fn product(c: &mut [f32], (a, b): (View, View), accumulate: bool, bf16: bool) {
    if bf16 {
        super::bf16_gemm::gemm(c, a, b, accumulate);
    } else {
        f32_product(c, b.cols, (a, b), accumulate, 1.0, true);
    }
}
