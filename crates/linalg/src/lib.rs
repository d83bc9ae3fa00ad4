//! Dense linear algebra behind plain-slice APIs: faer's thin SVD and f32 matrix products (with
//! feature `openblas`, the multi-threaded products go through OpenBLAS instead), and the
//! model's own AVX2 / AVX-512 kernels: packed f32 and int8 weight products, fused attention.
//!
//! Why a crate of its own: faer's SVD and matmul are generic, so they are compiled in whichever
//! crate instantiates them, at that crate's optimisation level. Inside tsq that meant opt-level 0
//! in dev and test builds, 30x slower than release (214 s instead of 7 s for SmolLM2's MLP
//! matrices). The workspace profile builds this crate at opt-level 3 in every profile.
//!
//! The kernels are x86-64 code. On other CPUs (aarch64) every level is [`Simd::Portable`]:
//! [`PackedMatrix::pack`] and [`Q8Matrix::quantize`] return `None`, attention's fused kernel is
//! not taken, and their tile sizes and fields go unused.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[macro_use]
mod wide;
mod attention;
mod matmul;
mod packed;
mod parts;
mod q8;

pub use attention::{Operands, Shape, Visibility, attention, attention_pays};
pub use matmul::{Mat, MatMut, Threads, matmul};
pub use packed::{HalfFormat, PackedMatrix};
pub use q8::Q8Matrix;
pub use wide::exp;

/// The widest vector instructions the kernels ([`PackedMatrix`], [`Q8Matrix`], attention's,
/// [`wide_fn!`] loops) use, in increasing order. tsq is built for baseline x86-64 and picks a level
/// at run time, so one binary runs everywhere and uses what the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// Plain Rust (SSE2 on x86-64): the weight products go through faer.
    Portable,
    /// AVX2 with FMA (and F16C, which every such CPU has): 8-lane kernels (most x86-64 CPUs
    /// since 2013-2015, AMD Zen 1-3, Intel client CPUs without AVX-512).
    Avx2,
    /// AVX-512F: 16-lane kernels.
    Avx512,
}

/// Environment variable that caps [`simd`] below what the CPU has: to compare the kernels on
/// one machine, or to rule them out when chasing a numerical difference.
pub const SIMD_VAR: &str = "TSQ_SIMD";

impl Simd {
    /// The levels, narrowest first.
    pub const ALL: [Simd; 3] = [Simd::Portable, Simd::Avx2, Simd::Avx512];

    /// The name [`SIMD_VAR`] takes.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Portable => "portable",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    /// The level named `name` (as [`Simd::name`] writes it).
    pub fn named(name: &str) -> Option<Simd> {
        Simd::ALL.into_iter().find(|level| level.name() == name)
    }

    /// What this CPU runs, whatever [`SIMD_VAR`] says.
    pub fn detected() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }

    /// The levels this CPU runs, narrowest first: what kernel tests check one after another.
    pub fn available() -> impl Iterator<Item = Simd> {
        let detected = Simd::detected();
        Simd::ALL
            .into_iter()
            .filter(move |&level| level <= detected)
    }
}

/// The level the kernels use: [`Simd::detected`], capped by [`SIMD_VAR`] where it names a
/// level (a name that is not one is ignored here; tsq's `main` refuses it). Read once.
pub fn simd() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var(SIMD_VAR)
            .ok()
            .and_then(|name| Simd::named(&name));
        Simd::detected().min(cap.unwrap_or(Simd::Avx512))
    })
}

/// `len` floats that `write` fills, without zeroing them first: zeroing the outputs of a
/// prefill's products was 2% of its time.
///
/// # Safety
/// `write` writes every one of the `len` floats from the pointer it gets on.
pub(crate) unsafe fn written(len: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    write(out.as_mut_ptr());
    // SAFETY: the caller vouches that all `len` elements were written.
    unsafe { out.set_len(len) };
    out
}

/// Runs `fork` (something that calls `fork(2)`, such as spawning a process with a `pre_exec`
/// hook) while no OpenBLAS product runs.
///
/// OpenBLAS registers a fork handler that stops its thread pool; a product running on another
/// thread at that moment then waits forever for workers that are gone. (CI's test run hung this
/// way when the code sandbox started programs beside a model test.) Products hold the lock
/// shared, forks exclusively; the pool restarts with the next product. Without OpenBLAS there
/// is nothing to wait for.
pub fn fork_safely<R>(fork: impl FnOnce() -> R) -> R {
    #[cfg(feature = "openblas")]
    let _no_products = blas::RUNNING
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    fork()
}

/// Which library runs the multi-threaded products in this build.
pub const LARGE_PRODUCTS_BY: &str = if cfg!(feature = "openblas") {
    "OpenBLAS"
} else {
    "faer"
};

/// What computes products with a model's f32 weights on this machine: [`PackedMatrix`]'s
/// kernel where AVX2 or AVX-512 runs, else the library of [`LARGE_PRODUCTS_BY`].
pub fn weight_products_by() -> &'static str {
    match simd() {
        Simd::Avx512 => "packed AVX-512 kernel",
        Simd::Avx2 => "packed AVX2 kernel",
        Simd::Portable => LARGE_PRODUCTS_BY,
    }
}

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
    use std::sync::RwLock;

    use crate::matmul::{Mat, MatMut};

    /// Held shared by every running product, exclusively by a fork (see [`crate::fork_safely`]).
    pub(crate) static RUNNING: RwLock<()> = RwLock::new(());

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

    /// `c (+)= a · b` through OpenBLAS; shapes are checked by the caller.
    pub fn sgemm(c: MatMut, a: Mat, b: Mat, accumulate: bool) {
        let ((m, k), n) = (a.shape(), b.shape().1);
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                let rows = c.data.chunks_mut(c.row_stride).take(m);
                rows.for_each(|row| row[..n].fill(0.0));
            }
            return;
        }
        let dim = |x: usize| c_int::try_from(x).expect("matrix dimension fits a C int");
        let trans = |transposed: bool| if transposed { TRANS } else { NO_TRANS };
        let _running = RUNNING
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // SAFETY: `Mat::strided` / `MatMut::strided` checked that each slice holds its matrix
        // at its row stride, the caller checked that the shapes multiply, and C is
        // exclusively borrowed.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                trans(a.transposed),
                trans(b.transposed),
                dim(m),
                dim(n),
                dim(k),
                1.0,
                a.data.as_ptr(),
                dim(a.row_stride),
                b.data.as_ptr(),
                dim(b.row_stride),
                if accumulate { 1.0 } else { 0.0 },
                c.data.as_mut_ptr(),
                dim(c.row_stride),
            );
        }
    }
}
