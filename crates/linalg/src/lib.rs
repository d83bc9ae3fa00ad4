//! faer's thin SVD, instantiated here for `f32` behind a plain-slice API.
//!
//! Why a crate of its own: faer's SVD is generic, so it is compiled in whichever crate
//! instantiates it, at that crate's optimisation level. Inside tsq that meant opt-level 0 in dev
//! and test builds, 30x slower than release (214 s instead of 7 s for SmolLM2's MLP matrices).
//! The workspace profile builds this crate at opt-level 3 in every profile.

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
