//! Dense linear algebra behind plain-slice APIs: faer's thin SVD and matrix products for `f32`,
//! and (feature `openblas`) f32 matrix products through OpenBLAS.
//!
//! Why a crate of its own: faer's SVD and matmul are generic, so they are compiled in whichever
//! crate instantiates them, at that crate's optimisation level. Inside tsq that meant opt-level 0
//! in dev and test builds, 30x slower than release (214 s instead of 7 s for SmolLM2's MLP
//! matrices). The workspace profile builds this crate at opt-level 3 in every profile.

mod matmul;

pub use matmul::{Mat, MatMut, Threads, matmul};

/// W (rows × cols) = U diag(s) Vᵀ with r = min(rows, cols), singular values descending.
pub struct ThinSvd {
    /// rows × r, row-major.
    pub u: Vec<f32>,
    /// r values, descending.
    pub s: Vec<f32>,
    /// r × cols (that is Vᵀ), row-major.
    pub vt: Vec<f32>,
}

/// faer's iterative SVD did not converge.
#[derive(Debug)]
pub struct NoConvergence;

/// Thin SVD of a row-major `rows × cols` matrix.
pub fn thin_svd(data: &[f32], rows: usize, cols: usize) -> Result<ThinSvd, NoConvergence> {
    assert_eq!(data.len(), rows * cols, "data is not rows × cols");
    let svd = faer::MatRef::from_row_major_slice(data, rows, cols)
        .thin_svd()
        .map_err(|_| NoConvergence)?;
    let r = rows.min(cols);
    let (u, v, s) = (svd.U(), svd.V(), svd.S().column_vector());
    Ok(ThinSvd {
        u: (0..rows)
            .flat_map(|i| (0..r).map(move |j| u[(i, j)]))
            .collect(),
        s: (0..r).map(|j| s[j]).collect(),
        vt: (0..r)
            .flat_map(|j| (0..cols).map(move |k| v[(k, j)]))
            .collect(),
    })
}

/// Runs `work` with faer's own parallelism off: for callers that decompose many matrices at once,
/// one per core, which beats parallelising inside each small SVD.
pub fn without_inner_parallelism<R>(work: impl FnOnce() -> R) -> R {
    let previous = faer::get_global_parallelism();
    faer::set_global_parallelism(faer::Par::Seq);
    let out = work();
    faer::set_global_parallelism(previous);
    out
}

#[cfg(feature = "openblas")]
mod blas {
    use std::os::raw::c_int;

    const ROW_MAJOR: c_int = 101;
    const NO_TRANS: c_int = 111;
    const TRANS: c_int = 112;

    #[link(name = "openblas")]
    unsafe extern "C" {
        fn cblas_sgemm(
            layout: c_int,
            trans_a: c_int,
            trans_b: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
    }

    /// C (m × n) = op(A) · op(B) with op(A) m × k and op(B) k × n; `a_t` / `b_t` say that A is
    /// stored transposed (k × m) / B is stored transposed (n × k). Row-major throughout.
    pub fn sgemm(
        a: &[f32],
        a_t: bool,
        b: &[f32],
        b_t: bool,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        assert_eq!(a.len(), m * k, "A does not have m × k elements");
        assert_eq!(b.len(), k * n, "B does not have k × n elements");
        let mut c = vec![0f32; m * n];
        if m == 0 || n == 0 || k == 0 {
            return c;
        }
        let dim = |x: usize| c_int::try_from(x).expect("matrix dimension fits a C int");
        let (trans_a, lda) = if a_t { (TRANS, m) } else { (NO_TRANS, k) };
        let (trans_b, ldb) = if b_t { (TRANS, k) } else { (NO_TRANS, n) };
        // SAFETY: the slices hold exactly m×k, k×n and m×n elements (asserted above), the leading
        // dimensions match row-major storage of those shapes, and C is exclusively borrowed.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                trans_a,
                trans_b,
                dim(m),
                dim(n),
                dim(k),
                1.0,
                a.as_ptr(),
                dim(lda),
                b.as_ptr(),
                dim(ldb),
                0.0,
                c.as_mut_ptr(),
                dim(n),
            );
        }
        c
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn products_match_a_naive_loop() {
            let (m, k, n) = (3, 4, 5);
            let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 - 3.0).collect();
            let nn = super::sgemm(&a, false, &b, false, m, k, n);
            let nt = super::sgemm(&a, false, &b, true, m, k, n);
            // op(A) = Aᵀ: A stored m × k is read as a k × m operand.
            let tn = super::sgemm(&a, true, &a, false, k, m, k);
            for i in 0..m {
                for j in 0..n {
                    let plain: f32 = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
                    let transposed: f32 = (0..k).map(|l| a[i * k + l] * b[j * k + l]).sum();
                    assert!((nn[i * n + j] - plain).abs() < 1e-5);
                    assert!((nt[i * n + j] - transposed).abs() < 1e-5);
                }
            }
            for i in 0..k {
                for j in 0..k {
                    let gram: f32 = (0..m).map(|l| a[l * k + i] * a[l * k + j]).sum();
                    assert!((tn[i * k + j] - gram).abs() < 1e-4);
                }
            }
        }
    }
}

#[cfg(feature = "openblas")]
pub use blas::sgemm;
