//! `C (+)= A · B` over row-major f32 slices with row strides, through faer's gemm (or, with
//! feature `openblas`, OpenBLAS for the products that may use every thread).
//!
//! Measured on the project's 2-core AVX2 machines (2026-11-27, shapes of an SVF step on
//! SmolLM2): 95-138 GFLOP/s on both cores, on a par with OpenBLAS (78-130) and twice candle's
//! gemm; single-threaded 45-78 GFLOP/s, which is what many small products run side by side use.

use faer::linalg::matmul::matmul as faer_matmul;
use faer::{Accum, Par};

/// A read-only matrix view: `rows × cols`, row-major with `row_stride` elements between the
/// starts of consecutive rows, possibly read transposed.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub(crate) data: &'a [f32],
    rows: usize,
    cols: usize,
    pub(crate) row_stride: usize,
    pub(crate) transposed: bool,
}

impl<'a> Mat<'a> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// Rows `row_stride` elements apart (a column block of a wider matrix).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        check_fits(data.len(), rows, cols, row_stride);
        Self {
            data,
            rows,
            cols,
            row_stride,
            transposed: false,
        }
    }

    /// The same matrix read transposed (no copy).
    pub fn t(self) -> Self {
        Self {
            transposed: !self.transposed,
            ..self
        }
    }

    /// Rows × columns as read.
    pub fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    fn faer(&self) -> faer::MatRef<'a, f32> {
        let m = faer::MatRef::from_row_major_slice_with_stride(
            self.data,
            self.rows,
            self.cols,
            self.row_stride,
        );
        if self.transposed { m.transpose() } else { m }
    }
}

/// A writable row-major matrix view: `rows × cols` with `row_stride` elements between rows.
pub struct MatMut<'a> {
    pub(crate) data: &'a mut [f32],
    rows: usize,
    cols: usize,
    pub(crate) row_stride: usize,
}

impl<'a> MatMut<'a> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "C does not have {rows} × {cols} elements"
        );
        Self::strided(data, rows, cols, cols)
    }

    /// Rows `row_stride` elements apart (a column block of a wider matrix).
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        check_fits(data.len(), rows, cols, row_stride);
        Self {
            data,
            rows,
            cols,
            row_stride,
        }
    }
}

/// Panics unless `len` elements hold `rows × cols` with rows `row_stride` apart.
fn check_fits(len: usize, rows: usize, cols: usize, row_stride: usize) {
    assert!(
        rows == 0 || (cols <= row_stride && len >= (rows - 1) * row_stride + cols),
        "slice of {len} cannot hold a {rows} × {cols} matrix with row stride {row_stride}"
    );
}

/// How many threads one product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// Every thread of the current rayon pool: for large products run one at a time.
    All,
    /// The calling thread only: for small products that the caller runs in parallel.
    One,
}

/// `c = a · b` or, with `accumulate`, `c += a · b`.
pub fn matmul(c: MatMut, a: Mat, b: Mat, accumulate: bool, threads: Threads) {
    let ((m, k), (k2, n)) = (a.shape(), b.shape());
    assert_eq!(k, k2, "inner dimensions differ: {m} × {k} · {k2} × {n}");
    assert_eq!((c.rows, c.cols), (m, n), "C is not {m} × {n}");
    #[cfg(feature = "openblas")]
    if threads == Threads::All {
        return crate::blas::sgemm(c, a, b, accumulate);
    }
    // Built as the transpose of a column-major view: faer 0.24.4's
    // `from_row_major_slice_with_stride_mut` lays the view out column-major (wrong results and
    // out-of-bounds writes; the test below catches it).
    let c = faer::MatMut::from_column_major_slice_with_stride_mut(c.data, n, m, c.row_stride)
        .transpose_mut();
    let accum = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    let par = match threads {
        Threads::All => Par::rayon(0),
        Threads::One => Par::Seq,
    };
    faer_matmul(c, accum, a.faer(), b.faer(), 1.0, par);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        (0..m)
            .flat_map(|i| (0..n).map(move |j| (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum()))
            .collect()
    }

    #[test]
    fn products_transposes_strides_and_accumulation_match_a_naive_loop() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 - 2.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 3) as f32 * 0.5 - 0.7).collect();
        let expected = naive(&a, &b, m, k, n);
        for threads in [Threads::All, Threads::One] {
            let mut c = vec![0f32; m * n];
            matmul(
                MatMut::new(&mut c, m, n),
                Mat::new(&a, m, k),
                Mat::new(&b, k, n),
                false,
                threads,
            );
            assert_eq!(c, expected);
            // Aᵀ stored k × m read transposed; B as a column block (stride 2n) of a wider matrix.
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let wide: Vec<f32> = (0..k * 2 * n)
                .map(|i| {
                    if i % (2 * n) < n {
                        b[(i / (2 * n)) * n + i % (2 * n)]
                    } else {
                        9.0
                    }
                })
                .collect();
            matmul(
                MatMut::new(&mut c, m, n),
                Mat::new(&at, k, m).t(),
                Mat::strided(&wide, k, n, 2 * n),
                true,
                threads,
            );
            for (got, want) in c.iter().zip(&expected) {
                assert!((got - 2.0 * want).abs() < 1e-5, "{got} vs {}", 2.0 * want);
            }
            // Into the left n columns of an m × 2n matrix, leaving the rest alone.
            let mut wide_c = vec![7f32; m * 2 * n];
            let left = MatMut::strided(&mut wide_c, m, n, 2 * n);
            matmul(left, Mat::new(&a, m, k), Mat::new(&b, k, n), false, threads);
            for (i, v) in wide_c.iter().enumerate() {
                let (row, col) = (i / (2 * n), i % (2 * n));
                let want = if col < n {
                    expected[row * n + col]
                } else {
                    7.0
                };
                assert_eq!(*v, want);
            }
        }
    }

    #[test]
    #[should_panic(expected = "inner dimensions differ")]
    fn mismatched_shapes_are_refused() {
        let (a, mut c) = ([0f32; 6], [0f32; 4]);
        matmul(
            MatMut::new(&mut c, 2, 2),
            Mat::new(&a, 2, 3),
            Mat::new(&a, 2, 3),
            false,
            Threads::One,
        );
    }
}
