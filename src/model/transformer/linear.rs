//! Projections: dense (with an optional quantized copy for small-batch decoding) or factored
//! as an SVF target, `y = U (s' ⊙ (Vᵀ x))`.

use super::*;

impl Factored {
    pub(super) fn forward(&self, x: &Tensor, experts: Option<&Tensor>) -> Result<Tensor> {
        let h = autograd::frozen_matmul_t(x, &self.vt)?;
        let h = match (self.scaled_s.rank(), experts) {
            (1, _) => h.broadcast_mul(&self.scaled_s)?,
            (_, Some(rows)) => {
                h.broadcast_mul(&self.scaled_s.index_select(rows, 0)?.unsqueeze(1)?)?
            }
            (_, None) => {
                return Err(ModelError::Input(
                    "the model holds a table of experts: each sequence must say which it uses"
                        .into(),
                ));
            }
        };
        Ok(autograd::frozen_matmul_t(&h, &self.u)?)
    }
}

/// Up to this many rows (batch × new tokens) use the quantized copy: quantized matmul is fast for
/// matrix-vector work and slow for prompt processing on the CPU. Measured decoding SmolLM2 on 2
/// cores with f32 products by faer (2026-11-27): Q8_0 vs f32 at 2 rows 51.9 vs 26.7 tok/s, at 4
/// rows 50.8 vs 46.1, at 8 rows 52.4 vs 70.2 (with candle's gemm, 2026-11-26, f32 caught up only
/// at 16 rows), so from 8 rows on f32 wins.
pub(super) const QUANTIZED_MAX_ROWS: usize = 4;

/// A weight's values with its rows and columns, for tsq-linalg's kernels: `None` unless it is
/// f32 on the CPU.
fn cpu_f32_rows(weight: &Tensor) -> Result<Option<(Vec<f32>, usize, usize)>> {
    if !autograd::linalg_applies(weight) {
        return Ok(None);
    }
    let (rows, cols) = weight.dims2()?;
    Ok(Some((weight.flatten_all()?.to_vec1()?, rows, cols)))
}

impl Quantized {
    /// A `dtype` copy of `weight` (out × in).
    pub(super) fn new(weight: &Tensor, dtype: GgmlDType) -> Result<Self> {
        if dtype == GgmlDType::Q8_0
            && let Some((values, rows, cols)) = cpu_f32_rows(weight)?
            && let Some(q8) = tsq_linalg::Q8Matrix::quantize(&values, rows, cols)
        {
            return Ok(Self::Rows(Arc::new(q8)));
        }
        Ok(Self::Candle(QMatMul::from_qtensor(QTensor::quantize(
            weight, dtype,
        )?)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Rows(w) => autograd::q8_matmul_t(x, w)?,
            Self::Candle(q) => q.forward(x)?,
        })
    }
}

impl Linear {
    /// A dense projection, packed for tsq-linalg's kernel where that runs.
    pub(super) fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let packed = cpu_f32_rows(&weight)?
            .and_then(|(values, rows, cols)| tsq_linalg::PackedMatrix::pack(&values, rows, cols))
            .map(Arc::new);
        Ok(Self {
            weight,
            bias,
            packed,
            quantized: None,
            factored: None,
        })
    }

    /// `x W^T (+ b)` over the last dimension. A weight that is not being trained gets no
    /// gradient (see [`autograd`]).
    /// `experts`: which expert of a factored table each sequence uses (see [`Batch::experts`]).
    pub(super) fn forward(
        &self,
        x: &Tensor,
        mode: Mode,
        experts: Option<&Tensor>,
    ) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(D::Minus1)?;
        let y = match (&self.factored, &self.quantized) {
            (Some(f), _) => f.forward(x, experts)?,
            (None, Some(q)) if mode == Mode::Fast && rows <= QUANTIZED_MAX_ROWS => q.forward(x)?,
            _ if self.weight.track_op() => autograd::plain_matmul_t(x, &self.weight)?,
            (None, _) if let Some(packed) = &self.packed => {
                autograd::packed_matmul_t(x, &self.weight, packed)?
            }
            _ => autograd::frozen_matmul_t(x, &self.weight)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}
