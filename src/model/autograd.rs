//! The transformer's matrix products: f32 CPU products through `tsq_linalg` (faer or OpenBLAS,
//! about twice candle's gemm here), and, for the differentiable forward, products whose backward
//! computes only the gradients somebody needs (candle's matmul backward computes both operands',
//! so a frozen weight would get a weight-sized gradient nobody reads).
//!
//! The product is computed on detached inputs and attached to the inputs' graph by [`attach`] /
//! [`attach_pair`], whose backward is a closure. Off the CPU (and for other dtypes than f32) the
//! products are candle's; attaching works on every device (on CUDA and Metal its forward copies
//! the result once).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape, Tensor,
};
use rayon::prelude::*;
use tsq_linalg::{Mat, MatMut, Threads};

use super::kernels;

type Backward = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Passes a precomputed result through; its backward maps (result, output gradient) to the
/// input gradient.
struct Attached {
    name: &'static str,
    backward: Backward,
}

impl CustomOp2 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _input: &CpuStorage,
        _input_layout: &Layout,
        result: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(self.name, result, layout)
    }

    fn cuda_fwd(
        &self,
        _input: &CudaStorage,
        _input_layout: &Layout,
        result: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        device_pass_through(result, layout)
    }

    fn metal_fwd(
        &self,
        _input: &MetalStorage,
        _input_layout: &Layout,
        result: &MetalStorage,
        layout: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        device_pass_through(result, layout)
    }

    fn bwd(
        &self,
        _input: &Tensor,
        _result: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.backward)(res, grad)?), None))
    }
}

/// `result` (computed from `input` without a graph) as a node of `input`'s graph.
fn attach(
    input: &Tensor,
    result: Tensor,
    name: &'static str,
    backward: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !input.track_op() {
        return Ok(result);
    }
    input.apply_op2(
        &result.contiguous()?,
        Attached {
            name,
            backward: Arc::new(backward),
        },
    )
}

/// The forward of every op here: the result, computed beforehand, passed through unchanged.
fn pass_through(name: &str, result: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        candle_core::bail!("{name}: expects a contiguous result");
    }
    Ok((result.clone(), layout.shape().clone()))
}

/// [`pass_through`] on a GPU: a copy of the result's storage.
fn device_pass_through<S: BackendStorage>(result: &S, layout: &Layout) -> Result<(S, Shape)> {
    Ok((result.try_clone(layout)?, layout.shape().clone()))
}

type PairBackward = Arc<
    dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync,
>;

/// [`Attached`] for two inputs: the backward maps (a, b, output gradient) to the gradients of
/// those inputs that need one.
struct AttachedPair {
    name: &'static str,
    backward: PairBackward,
}

impl CustomOp3 for AttachedPair {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _a: &CpuStorage,
        _a_layout: &Layout,
        _b: &CpuStorage,
        _b_layout: &Layout,
        result: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(self.name, result, layout)
    }

    fn cuda_fwd(
        &self,
        _a: &CudaStorage,
        _a_layout: &Layout,
        _b: &CudaStorage,
        _b_layout: &Layout,
        result: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        device_pass_through(result, layout)
    }

    fn metal_fwd(
        &self,
        _a: &MetalStorage,
        _a_layout: &Layout,
        _b: &MetalStorage,
        _b_layout: &Layout,
        result: &MetalStorage,
        layout: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        device_pass_through(result, layout)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _result: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_a, grad_b) = (self.backward)(a, b, grad)?;
        Ok((grad_a, grad_b, None))
    }
}

/// `result` (computed from `a` and `b` without a graph) as a node of their graphs.
fn attach_pair(
    a: &Tensor,
    b: &Tensor,
    result: Tensor,
    name: &'static str,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)>
    + Send
    + Sync
    + 'static,
) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() {
        return Ok(result);
    }
    a.apply_op3(
        b,
        &result.contiguous()?,
        AttachedPair {
            name,
            backward: Arc::new(backward),
        },
    )
}

/// `x Wᵀ` (x: (…, in), W: (out, in)) where only `x` may need a gradient.
pub fn frozen_matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let product = plain_matmul_t(&x.detach(), weight)?;
    let weight = weight.clone();
    frozen(x, product, move |grad| matmul(grad, &weight))
}

/// [`frozen_matmul_t`] for weights held as packed panels that read the same f32 CPU `x`: the
/// forward products run as one split across threads (`PackedMatrix::matmul_t_each`).
pub fn packed_matmul_t_each<const N: usize>(
    x: &Tensor,
    weights: [&Arc<tsq_linalg::PackedMatrix>; N],
) -> Result<[Tensor; N]> {
    let products = rows_products(&x.detach(), weights.map(|w| w.rows()), |x, rows| {
        tsq_linalg::PackedMatrix::matmul_t_each(weights.map(|w| &**w), x, rows, Threads::All)
    })?;
    let mut products = products.into_iter();
    all_ok(weights.map(|packed| {
        let packed = Arc::clone(packed);
        match products.next() {
            // The panels are W's only copy, so a backward (tests and references: training on
            // the CPU runs `svf::backprop`) unpacks it.
            Some(product) => frozen(x, product, move |grad| matmul(grad, &unpacked(&packed)?)),
            None => candle_core::bail!("a weight without its product"),
        }
    }))
}

/// A CPU matrix's rows packed for tsq-linalg's kernel in its own element type (f32, bf16 or
/// f16); `None` for other dtypes and devices, and where no kernel runs.
pub fn packed(matrix: &Tensor) -> Result<Option<tsq_linalg::PackedMatrix>> {
    use candle_core::DType;
    use tsq_linalg::{HalfFormat, PackedMatrix};
    if !matrix.device().is_cpu() {
        return Ok(None);
    }
    let (rows, cols) = matrix.dims2()?;
    let flat = matrix.flatten_all()?;
    let sixteen = |format, bits: Vec<u16>| PackedMatrix::pack_half(format, &bits, rows, cols);
    Ok(match matrix.dtype() {
        DType::F32 => PackedMatrix::pack(&flat.to_vec1::<f32>()?, rows, cols),
        DType::BF16 => sixteen(HalfFormat::Bf16, bits(flat.to_vec1()?, half::bf16::to_bits)),
        DType::F16 => sixteen(HalfFormat::F16, bits(flat.to_vec1()?, half::f16::to_bits)),
        _ => None,
    })
}

/// 16-bit floats' bits.
fn bits<T>(values: Vec<T>, to_bits: fn(T) -> u16) -> Vec<u16> {
    values.into_iter().map(to_bits).collect()
}

/// W from its packed panels, as a CPU tensor.
pub fn unpacked(packed: &tsq_linalg::PackedMatrix) -> Result<Tensor> {
    Tensor::from_vec(
        packed.unpack(),
        (packed.rows(), packed.cols()),
        &candle_core::Device::Cpu,
    )
}

/// `product` (x Wᵀ) as a node of x's graph whose backward gives x its gradient, `grad · W`
/// (`times_weight` of the gradient's rows), and W none.
fn frozen(
    x: &Tensor,
    product: Tensor,
    times_weight: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    attach(x, product, "frozen-matmul", move |_, grad| {
        let mut dims = grad.dims().to_vec();
        let out = dims.pop().unwrap_or(1);
        let rows: usize = dims.iter().product();
        let grad_x = times_weight(&grad.reshape((rows, out))?)?;
        dims.push(grad_x.dim(1)?);
        grad_x.reshape(dims)
    })
}

/// `x Wᵀ` with candle's matmul. Flattening to 2D first matters: candle's batched matmul is ~1.5x
/// slower than its plain one on decode shapes (1×576 · 576×1536).
pub fn plain_matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let inner = dims.pop().unwrap_or(1);
    let rows: usize = dims.iter().product();
    let x = x.reshape((rows, inner))?;
    let y = match linalg_product(&x, weight, true)? {
        Some(y) => y,
        None => x.matmul(&weight.t()?)?,
    };
    dims.push(weight.dim(0)?);
    y.reshape(dims)
}

/// `x Wᵢᵀ` over the last dimension of an f32 CPU `x` for weights held as int8 rows (decoding),
/// as one split across threads (`Q8Matrix::matmul_t_each`).
pub fn q8_matmul_t_each<const N: usize>(
    x: &Tensor,
    weights: [&tsq_linalg::Q8Matrix; N],
) -> Result<[Tensor; N]> {
    rows_products(x, weights.map(|w| w.rows()), |x, rows| {
        tsq_linalg::Q8Matrix::matmul_t_each(weights, x, rows, Threads::All)
    })
}

/// `products(x, rows)` over the last dimension of an f32 CPU `x` seen as `rows` rows, giving
/// `outputs[i]` values per row in product i.
fn rows_products<const N: usize>(
    x: &Tensor,
    outputs: [usize; N],
    products: impl FnOnce(&[f32], usize) -> [Vec<f32>; N],
) -> Result<[Tensor; N]> {
    let mut dims = x.dims().to_vec();
    let inner = dims.pop().unwrap_or(1);
    let rows: usize = dims.iter().product();
    let x = x.reshape((rows, inner))?.contiguous()?;
    let outs = with_f32_storage(&x, |x| products(&x[..rows * inner], rows))?;
    let mut outs = outs.into_iter();
    all_ok(outputs.map(|n| {
        let mut dims = dims.clone();
        dims.push(n);
        let out = outs.next().unwrap_or_default();
        Tensor::from_vec(out, dims, x.device())
    }))
}

/// The N values, or the first error.
pub(crate) fn all_ok<T, E, const N: usize>(
    results: [std::result::Result<T, E>; N],
) -> std::result::Result<[T; N], E> {
    let mut error = None;
    let values = results.map(|r| r.map_err(|e| error = error.take().or(Some(e))).ok());
    match error {
        Some(e) => Err(e),
        None => Ok(values.map(|v| v.expect("no error, so every value is there"))),
    }
}

/// `a · b` for 2-D tensors, through `tsq_linalg` where it applies.
fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match linalg_product(a, b, false)? {
        Some(y) => Ok(y),
        None => a.matmul(b),
    }
}

/// `x · w` (or `x · wᵀ`) for 2-D f32 CPU tensors outside any graph through `tsq_linalg`; `None`
/// where that does not apply, for candle's gemm to do it. faer and OpenBLAS ran a
/// (2048×576)·(576×1536) product at 100-140 GFLOP/s on this project's 2-core machines, candle's
/// gemm at ~50.
fn linalg_product(x: &Tensor, w: &Tensor, w_transposed: bool) -> Result<Option<Tensor>> {
    if !(linalg_applies(x) && linalg_applies(w)) || x.track_op() || w.track_op() || x.rank() != 2 {
        return Ok(None);
    }
    linalg_gemm(x, false, w, w_transposed).map(Some)
}

/// Batched `a · b` (or `a · bᵀ` with `b_transposed`) over equal leading dimensions, where both
/// operands may need gradients (attention: q·kᵀ and p·v). Through `tsq_linalg` where it applies, with
/// the backward products through it too.
pub fn batched_matmul(a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Tensor> {
    if !(linalg_applies(a) && linalg_applies(b)) {
        return if b_transposed {
            a.matmul(&b.t()?)
        } else {
            a.matmul(b)
        };
    }
    let product = linalg_gemm(&a.detach(), false, &b.detach(), b_transposed)?;
    // C = A·B: dA = G·Bᵀ, dB = Aᵀ·G.  C = A·Bᵀ: dA = G·B, dB = Gᵀ·A.
    attach_pair(a, b, product, "batched-matmul", move |a, b, grad| {
        let (a_const, b_const) = (a.detach(), b.detach());
        let grad_a = match a.track_op() {
            true => Some(linalg_gemm(grad, false, &b_const, !b_transposed)?),
            false => None,
        };
        let grad_b = match (b.track_op(), b_transposed) {
            (false, _) => None,
            (true, true) => Some(linalg_gemm(grad, true, &a_const, false)?),
            (true, false) => Some(linalg_gemm(&a_const, true, grad, false)?),
        };
        Ok((grad_a, grad_b))
    })
}

/// Whether `tsq_linalg` and our own kernels can take this tensor: f32 on the CPU.
pub(crate) fn linalg_applies(t: &Tensor) -> bool {
    t.dtype() == candle_core::DType::F32 && t.device().is_cpu()
}

/// Multiply-adds below which one of many products runs on a single thread.
const SMALL_PRODUCT: usize = 1 << 18;

/// Rows of A up to which one of many small products reads B in place through `kernels`
/// instead of faer (decoding attention: a few query rows per key/value head).
const FEW_ROWS: usize = 8;

/// op(a) · op(b) over equal leading dimensions, one `tsq_linalg::matmul` per matrix. `a_t`/`b_t`
/// say the operand's last two dimensions are stored transposed.
fn linalg_gemm(a: &Tensor, a_t: bool, b: &Tensor, b_t: bool) -> Result<Tensor> {
    let (a, b) = (matrices(a)?, matrices(b)?);
    let (a_stride, b_stride) = (batch_stride(&a), batch_stride(&b));
    let (ad, bd) = (a.dims(), b.dims());
    let (ra, ca) = (ad[ad.len() - 2], ad[ad.len() - 1]);
    let (rb, cb) = (bd[bd.len() - 2], bd[bd.len() - 1]);
    let (m, k) = if a_t { (ca, ra) } else { (ra, ca) };
    let (k2, n) = if b_t { (cb, rb) } else { (rb, cb) };
    let batch = &ad[..ad.len() - 2];
    if k != k2 || batch != &bd[..bd.len() - 2] {
        candle_core::bail!("gemm: shapes {ad:?} and {bd:?} do not multiply");
    }
    let count: usize = batch.iter().product();
    let mut out = vec![0f32; count * m * n];
    with_f32_storage(&a, |a| {
        with_f32_storage(&b, |b| {
            let product = |(i, c): (usize, &mut [f32]), threads| {
                let (a, b) = (&a[i * a_stride..][..m * k], &b[i * b_stride..][..k * n]);
                let few_rows = m <= FEW_ROWS && matches!(threads, Threads::One);
                match (a_t, b_t) {
                    (false, true) if few_rows => kernels::rows_times_rows_t(a, b, k, c),
                    (false, false) if few_rows => kernels::rows_times_rows(a, b, n, c),
                    _ => {
                        let (x, y) = (operand(a, a_t, m, k), operand(b, b_t, k, n));
                        tsq_linalg::matmul(MatMut::new(c, m, n), x, y, false, threads);
                    }
                }
            };
            // Many small products (decoding attention: a few query rows per sequence and head)
            // run side by side, one per thread: splitting each one across threads cost more in
            // waking and waiting than it computed.
            if count > 1 && m * n * k < SMALL_PRODUCT {
                let chunks = out.par_chunks_mut(m * n).enumerate();
                chunks.for_each(|chunk| product(chunk, Threads::One));
            } else {
                let chunks = out.chunks_mut(m * n).enumerate();
                chunks.for_each(|chunk| product(chunk, Threads::All));
            }
        })
    })??;
    let mut dims = batch.to_vec();
    dims.extend([m, n]);
    Tensor::from_vec(out, dims, a.device())
}

/// `t` as matrices over its last two dimensions, each stored contiguously, one every
/// [`batch_stride`] elements: views of a larger buffer along the rows (the KV cache's filled
/// part) stay as they are, anything else is made contiguous.
fn matrices(t: &Tensor) -> Result<Tensor> {
    let (dims, strides) = (t.dims(), t.stride());
    let rank = dims.len();
    let rows_contiguous =
        rank >= 2 && strides[rank - 1] == 1 && strides[rank - 2] == dims[rank - 1];
    // The batch dimensions that hold more than one matrix must flatten to one stride, no
    // smaller than a matrix. (A dimension of size 1 may have any stride: candle leaves one
    // there, e.g. after a transpose, and counts the tensor contiguous all the same.)
    let batch = batch_dims(t);
    let uniform = batch
        .windows(2)
        .all(|p| strides[p[0]] == dims[p[1]] * strides[p[1]]);
    let apart = (batch.last()).is_none_or(|&j| strides[j] >= dims[rank - 2] * dims[rank - 1]);
    if rows_contiguous && uniform && apart && rank >= 3 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The leading (batch) dimensions of `t` holding more than one matrix, outermost first.
fn batch_dims(t: &Tensor) -> Vec<usize> {
    let dims = t.dims();
    (0..dims.len().saturating_sub(2))
        .filter(|&j| dims[j] > 1)
        .collect()
}

/// Elements from one matrix of `t` (as [`matrices`] leaves it) to the next: the stride of its
/// innermost batch dimension holding more than one matrix (one matrix: its size).
fn batch_stride(t: &Tensor) -> usize {
    let dims = t.dims();
    match batch_dims(t).last() {
        Some(&j) => t.stride()[j],
        None => dims.iter().rev().take(2).product(),
    }
}

/// `f` on the f32 storage of `t` from its first element on.
pub(crate) fn with_f32_storage<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(f(&cpu.as_slice::<f32>()?[layout.start_offset()..])),
        _ => candle_core::bail!("expected a CPU tensor"),
    }
}

/// `rows × cols` as read, stored transposed (`cols × rows`) when `transposed`.
fn operand(data: &[f32], transposed: bool, rows: usize, cols: usize) -> Mat<'_> {
    match transposed {
        true => Mat::new(data, cols, rows).t(),
        false => Mat::new(data, rows, cols),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    /// Forward values and input gradients of `ours` and `reference` agree on `x`.
    fn agree(
        x: &Var,
        ours: impl Fn(&Tensor) -> Result<Tensor>,
        reference: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        // A loss that weighs every output differently, so gradients are not trivially uniform.
        let probe = Tensor::randn(0f32, 1.0, ours(x.as_tensor())?.dims(), &Device::Cpu)?;
        let loss = |y: Tensor| (y * &probe)?.sum_all();
        let (a, b) = (ours(x.as_tensor())?, reference(x.as_tensor())?);
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let (ga, gb) = (loss(a)?.backward()?, loss(b)?.backward()?);
        let (ga, gb) = (
            ga.get(x.as_tensor()).expect("gradient"),
            gb.get(x.as_tensor()).expect("gradient"),
        );
        let scale = gb.abs()?.max_all()?.to_scalar::<f32>()?;
        let diff = (ga - gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            scale > 0.0 && diff < 1e-4 * scale.max(1.0),
            "gradients differ by {diff}"
        );
        Ok(())
    }

    #[test]
    fn frozen_matmul_matches_candles_matmul() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu)?;
        let x = Var::randn(0f32, 1.0, (2, 3, 4), &Device::Cpu)?;
        agree(&x, |x| frozen_matmul_t(x, &w), |x| plain_matmul_t(x, &w))
    }

    #[test]
    fn packed_matmuls_match_candles_matmul() -> Result<()> {
        // Two weights read by the same x, as a layer's k and v are.
        let (w, w2) = (
            Tensor::randn(0f32, 1.0, (37, 20), &Device::Cpu)?,
            Tensor::randn(0f32, 1.0, (5, 20), &Device::Cpu)?,
        );
        let pack = |w: &Tensor| -> Result<_> {
            let (rows, cols) = w.dims2()?;
            let packed = tsq_linalg::PackedMatrix::pack(&w.flatten_all()?.to_vec1()?, rows, cols);
            Ok(packed.map(Arc::new))
        };
        let (Some(packed), Some(packed2)) = (pack(&w)?, pack(&w2)?) else {
            eprintln!("neither AVX2 nor AVX-512 here: nothing to check");
            return Ok(());
        };
        let x = Var::randn(0f32, 1.0, (2, 9, 20), &Device::Cpu)?;
        agree(
            &x,
            |x| {
                let [y, y2] = packed_matmul_t_each(x, [&packed, &packed2])?;
                Tensor::cat(&[y, y2], D::Minus1)
            },
            |x| {
                Tensor::cat(
                    &[plain_matmul_t(x, &w)?, plain_matmul_t(x, &w2)?],
                    D::Minus1,
                )
            },
        )
    }

    #[test]
    fn many_small_batched_products_match_candle() -> Result<()> {
        // Decoding attention's shape: more matrices than threads, each far below SMALL_PRODUCT.
        let a = Var::randn(0f32, 1.0, (8, 3, 3, 16), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (8, 3, 40, 16), &Device::Cpu)?;
        agree(&a, |a| batched_matmul(a, &b, true), |a| a.matmul(&b.t()?))
    }

    #[test]
    fn batched_matmul_matches_candle_for_both_operands() -> Result<()> {
        let a = Var::randn(0f32, 1.0, (2, 3, 4, 5), &Device::Cpu)?;
        let b = Var::randn(0f32, 1.0, (2, 3, 6, 5), &Device::Cpu)?;
        // a · bᵀ, gradients for a and for b.
        agree(
            &a,
            |a| batched_matmul(a, b.as_tensor(), true),
            |a| a.matmul(&b.t()?),
        )?;
        agree(
            &b,
            |b| batched_matmul(a.as_tensor(), b, true),
            |b| a.matmul(&b.t()?),
        )?;
        // c · d.
        let c = Var::randn(0f32, 1.0, (2, 3, 4, 6), &Device::Cpu)?;
        let d = Var::randn(0f32, 1.0, (2, 3, 6, 5), &Device::Cpu)?;
        agree(
            &c,
            |c| batched_matmul(c, d.as_tensor(), false),
            |c| c.matmul(d.as_tensor()),
        )?;
        agree(
            &d,
            |d| batched_matmul(c.as_tensor(), d, false),
            |d| c.matmul(d),
        )
    }

    /// A batch dimension of size 1 with a stride of candle's choosing (one key/value head, as
    /// Gemma 3 1B has, after the transpose from token-major): the matrices of the other batch
    /// dimension are found by its stride. Read by the unit dimension's, the second sequence's
    /// keys were the first's shifted by a row, and Gemma 3's training gradients were noise.
    #[test]
    fn batched_matmul_skips_unit_batch_dimensions() -> Result<()> {
        let keys = Var::randn(0f32, 1.0, (2, 6, 1, 5), &Device::Cpu)?;
        let heads = |k: &Tensor| k.transpose(1, 2);
        assert!(heads(keys.as_tensor())?.is_contiguous());
        let q = Tensor::randn(0f32, 1.0, (2, 1, 4, 5), &Device::Cpu)?;
        agree(
            &keys,
            |k| batched_matmul(&q, &heads(k)?, true),
            |k| q.matmul(&heads(k)?.contiguous()?.t()?),
        )
    }
}
