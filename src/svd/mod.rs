//! Thin SVD of weight matrices with faer, in float32: W (out × in) = U diag(s) Vᵀ with
//! r = min(out, in) singular values, sorted descending. Every decomposition is checked by its
//! relative reconstruction error ‖U diag(s) Vᵀ − W‖ / ‖W‖ before anyone uses it.
//!
//! Independent matrices are decomposed in parallel (one per core, each single-threaded), which
//! beats parallelising inside one small SVD; a lone large matrix uses faer's own parallelism.

pub mod cache;
pub mod targets;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// The factors of one matrix, as candle tensors on the CPU.
pub struct Factors {
    /// (out, r)
    pub u: Tensor,
    /// (r,)
    pub s: Tensor,
    /// (r, in)
    pub vt: Tensor,
    /// ‖U diag(s) Vᵀ − W‖_F / ‖W‖_F
    pub relative_error: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum SvdError {
    #[error("matrix `{name}` holds non-finite values (NaN or infinity); it cannot be decomposed")]
    NonFinite { name: String },
    #[error("the SVD of `{name}` ({rows}×{cols}) did not converge")]
    NoConvergence {
        name: String,
        rows: usize,
        cols: usize,
    },
    #[error(
        "the SVD of `{name}` reconstructs it with relative error {error:.2e}, above the limit {limit:.0e}"
    )]
    Inaccurate {
        name: String,
        error: f64,
        limit: f64,
    },
    #[error("matrix `{name}`: {source}")]
    Tensor {
        name: String,
        source: candle_core::Error,
    },
}

/// Relative reconstruction error above which a decomposition is refused (float32 arithmetic on
/// these sizes gives ~1e-6).
pub const MAX_RELATIVE_ERROR: f64 = 1e-4;

/// Thin SVD of one 2-D matrix; `name` is used in errors.
pub fn decompose(name: &str, w: &Tensor) -> Result<Factors, SvdError> {
    let tensor_err = |source| SvdError::Tensor {
        name: name.to_string(),
        source,
    };
    let w = w
        .to_dtype(DType::F32)
        .and_then(|w| w.to_device(&Device::Cpu))
        .map_err(tensor_err)?;
    let (rows, cols) = w.dims2().map_err(tensor_err)?;
    let data: Vec<f32> = w
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(tensor_err)?;
    if data.iter().any(|x| !x.is_finite()) {
        return Err(SvdError::NonFinite { name: name.into() });
    }
    let svd = tsq_linalg::thin_svd(&data, rows, cols).map_err(|_| SvdError::NoConvergence {
        name: name.into(),
        rows,
        cols,
    })?;
    let r = rows.min(cols);
    let dev = Device::Cpu;
    let u = Tensor::from_vec(svd.u, (rows, r), &dev).map_err(tensor_err)?;
    let s = Tensor::from_vec(svd.s, r, &dev).map_err(tensor_err)?;
    let vt = Tensor::from_vec(svd.vt, (r, cols), &dev).map_err(tensor_err)?;
    let relative_error = reconstruction_error(&u, &s, &vt, &w).map_err(tensor_err)?;
    if relative_error > MAX_RELATIVE_ERROR {
        return Err(SvdError::Inaccurate {
            name: name.into(),
            error: relative_error,
            limit: MAX_RELATIVE_ERROR,
        });
    }
    Ok(Factors {
        u,
        s,
        vt,
        relative_error,
    })
}

/// U diag(s) Vᵀ, with gradients through s where it tracks them. In f32 on the CPU the product
/// goes through tsq-linalg: candle's own gemm ran it with 256-bit kernels, 18% of a quickstart
/// training stage, which composes the expert afresh at every step (2026-12-07).
pub fn compose(u: &Tensor, s: &Tensor, vt: &Tensor) -> candle_core::Result<Tensor> {
    crate::model::autograd::batched_matmul(&u.broadcast_mul(&s.unsqueeze(0)?)?, vt, false)
}

fn reconstruction_error(
    u: &Tensor,
    s: &Tensor,
    vt: &Tensor,
    w: &Tensor,
) -> candle_core::Result<f64> {
    let diff = (compose(u, s, vt)? - w)?;
    let norm = |t: &Tensor| -> candle_core::Result<f64> {
        t.to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f64>()
    };
    let base = norm(w)?;
    Ok(if base == 0.0 {
        norm(&diff)?
    } else {
        norm(&diff)? / base
    })
}

/// Decomposes many matrices, one per core at a time; results keep the input order.
pub fn decompose_all(matrices: &[(String, Tensor)]) -> Vec<Result<Factors, SvdError>> {
    if matrices.len() < rayon::current_num_threads() {
        return matrices
            .iter()
            .map(|(name, w)| decompose(name, w))
            .collect();
    }
    tsq_linalg::without_inner_parallelism(|| {
        matrices
            .par_iter()
            .map(|(name, w)| decompose(name, w))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconstructs_tall_wide_and_rank_deficient_matrices() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let low_rank = Tensor::randn(0f32, 1.0, (40, 3), &dev)?.matmul(&Tensor::randn(
            0f32,
            1.0,
            (3, 24),
            &dev,
        )?)?;
        let cases = [
            ("tall", Tensor::randn(0f32, 1.0, (48, 16), &dev)?),
            ("wide", Tensor::randn(0f32, 1.0, (16, 48), &dev)?),
            ("low_rank", low_rank),
        ];
        let results = decompose_all(
            &cases
                .iter()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect::<Vec<_>>(),
        );
        for ((name, w), f) in cases.iter().zip(results) {
            let f = f.unwrap();
            let (rows, cols) = w.dims2()?;
            assert_eq!(f.u.dims2()?, (rows, rows.min(cols)), "{name}");
            assert_eq!(f.vt.dims2()?, (rows.min(cols), cols), "{name}");
            assert!(f.relative_error < 1e-5, "{name}: {}", f.relative_error);
            let s: Vec<f32> = f.s.to_vec1()?;
            assert!(
                s.windows(2).all(|p| p[0] >= p[1]) && s.iter().all(|&x| x >= 0.0),
                "{name}: {s:?}"
            );
            let orthogonality = (f.u.t()?.matmul(&f.u)?
                - Tensor::eye(rows.min(cols), DType::F32, &dev)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
            if *name != "low_rank" {
                assert!(orthogonality < 1e-4, "{name}: UᵀU ≠ I by {orthogonality}");
            }
        }
        Ok(())
    }

    #[test]
    fn non_finite_matrices_are_refused_by_name() {
        let w = Tensor::new(&[[1f32, f32::NAN], [0.0, 1.0]], &Device::Cpu).unwrap();
        let err = decompose("layers.3.mlp.up_proj", &w)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`layers.3.mlp.up_proj` holds non-finite values"),
            "{err}"
        );
    }
}
