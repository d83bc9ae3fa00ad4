//! Projections: dense (with an optional quantized copy for small-batch decoding) or factored
//! as an SVF target, `y = U (s' ⊙ (Vᵀ x))`.

use super::*;
use crate::model::autograd::all_ok;

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

/// Up to this many rows (batch × new tokens) use the quantized copy: it reads a quarter of the
/// bytes, which wins while a product is memory-bound and loses once f32 products reach the FMA
/// peak. Measured decoding SmolLM2 on 2 cores (2026-12-07, AVX-512, tsq-linalg's int8 kernel vs
/// its packed f32 one, two runs): at 6 rows 516.6 / 482.4 vs 354.0 / 322.8 tok/s, at 8 rows
/// 500.7 / 523.3 vs 353.4 / 421.3, at 12 rows 641.3 / 599.0 vs 574.8 / 567.8, at 16 rows
/// 634.5 / 538.7 vs 715.0 / 664.4.
pub(super) const QUANTIZED_MAX_ROWS: usize = 12;

impl Matrix {
    /// `weight`, packed for tsq-linalg's kernel where that runs (f32, bf16 or f16 on a CPU
    /// with AVX2 or AVX-512) and not being trained.
    pub(super) fn new(weight: Tensor) -> Result<Self> {
        if weight.track_op() {
            return Ok(Self::Tensor(weight));
        }
        Ok(match autograd::packed(&weight)? {
            Some(packed) => Self::Packed(Arc::new(packed)),
            None => Self::Tensor(weight),
        })
    }

    pub(super) fn dims2(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Tensor(t) => t.dims2()?,
            Self::Packed(p) => (p.rows(), p.cols()),
        })
    }

    /// Whether candle's autograd reaches this weight (a weight being trained).
    pub(super) fn track_op(&self) -> bool {
        matches!(self, Self::Tensor(t) if t.track_op())
    }

    /// W as a tensor: shared where it is one, a fresh copy out of the panels where not (export,
    /// decomposition, a training engine's own copies).
    pub(super) fn tensor(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Tensor(t) => t.clone(),
            Self::Packed(p) => autograd::unpacked(p)?,
        })
    }

    /// Rows `ids` (u32) of W, (ids, cols): token embeddings, the head's rows for exact logits.
    pub(super) fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Tensor(t) => Ok(t.index_select(ids, 0)?),
            Self::Packed(p) => {
                let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= p.rows()) {
                    return Err(ModelError::Input(format!(
                        "token id {bad} is past the vocabulary ({} tokens)",
                        p.rows()
                    )));
                }
                let values = p.gather_rows(&ids);
                Ok(Tensor::from_vec(
                    values,
                    (ids.len(), p.cols()),
                    &Device::Cpu,
                )?)
            }
        }
    }

    /// W's values in f32 with its rows and columns, for tsq-linalg's int8 kernel: `None` unless
    /// it is held as panels (of any width) or as an f32 CPU tensor.
    fn cpu_f32_rows(&self) -> Result<Option<(Vec<f32>, usize, usize)>> {
        Ok(match self {
            Self::Packed(p) => Some((p.unpack(), p.rows(), p.cols())),
            Self::Tensor(t) if linalg_applies(t) => {
                let (rows, cols) = t.dims2()?;
                Some((t.flatten_all()?.to_vec1()?, rows, cols))
            }
            Self::Tensor(_) => None,
        })
    }
}

impl Quantized {
    /// A `dtype` copy of `weight` (out × in).
    pub(super) fn new(weight: &Matrix, dtype: GgmlDType) -> Result<Self> {
        if dtype == GgmlDType::Q8_0
            && let Some((values, rows, cols)) = weight.cpu_f32_rows()?
            && let Some(q8) = tsq_linalg::Q8Matrix::quantize(&values, rows, cols)
        {
            return Ok(Self::Rows(Arc::new(q8)));
        }
        Ok(Self::Candle(QMatMul::from_qtensor(QTensor::quantize(
            &weight.tensor()?,
            dtype,
        )?)?))
    }
}

/// A product that several projections reading the same x can share: tsq-linalg's kernels run
/// them as one split across threads (see [`Linear::forward_each`]).
#[derive(Clone, Copy)]
enum Shared<'a> {
    Packed(&'a Arc<tsq_linalg::PackedMatrix>),
    Q8(&'a tsq_linalg::Q8Matrix),
}

impl Linear {
    pub(super) fn new(weight: Matrix, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            quantized: None,
            factored: None,
        }
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
        let [y] = Self::forward_each([self], x, mode, experts)?;
        Ok(y)
    }

    /// [`Linear::forward`] of several projections of the same x. Where they all use the same
    /// tsq-linalg kernel, their products run as one split across threads: the pool wakes once
    /// for a layer's q, k and v (or gate and up), where each wake-up cost a decoding step more
    /// than the products of K and V computed.
    pub(super) fn forward_each<const N: usize>(
        linears: [&Self; N],
        x: &Tensor,
        mode: Mode,
        experts: Option<&Tensor>,
    ) -> Result<[Tensor; N]> {
        let rows = x.elem_count() / x.dim(D::Minus1)?;
        let shared = linears.map(|l| l.shared(mode, rows));
        let products = if let Some(packed) = all(shared, Shared::packed) {
            autograd::packed_matmul_t_each(x, packed)?
        } else if let Some(q8) = all(shared, Shared::q8) {
            autograd::q8_matmul_t_each(x, q8)?
        } else {
            all_ok(std::array::from_fn(|i| {
                linears[i].product(x, mode, experts, rows, shared[i])
            }))?
        };
        let mut products = products.into_iter();
        all_ok(linears.map(|l| {
            let y = products
                .next()
                .ok_or(ModelError::Input("no product".into()))?;
            Ok(match &l.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        }))
    }

    /// The product a fast-path call of `rows` rows can share with other projections, if any.
    fn shared(&self, mode: Mode, rows: usize) -> Option<Shared<'_>> {
        if self.factored.is_some() || self.weight.track_op() {
            return None;
        }
        match &self.quantized {
            Some(q) if mode == Mode::Fast && rows <= QUANTIZED_MAX_ROWS => match q {
                Quantized::Rows(w) => Some(Shared::Q8(w)),
                Quantized::Candle(_) => None,
            },
            _ => match &self.weight {
                Matrix::Packed(p) => Some(Shared::Packed(p)),
                Matrix::Tensor(_) => None,
            },
        }
    }

    /// This projection's product alone, without its bias; `shared` is its [`Linear::shared`].
    fn product(
        &self,
        x: &Tensor,
        mode: Mode,
        experts: Option<&Tensor>,
        rows: usize,
        shared: Option<Shared>,
    ) -> Result<Tensor> {
        let [y] = match shared {
            Some(Shared::Packed(p)) => autograd::packed_matmul_t_each(x, [p])?,
            Some(Shared::Q8(w)) => autograd::q8_matmul_t_each(x, [w])?,
            None => [self.own_product(x, mode, experts, rows)?],
        };
        Ok(y)
    }

    /// The product of a projection no tsq-linalg kernel takes.
    fn own_product(
        &self,
        x: &Tensor,
        mode: Mode,
        experts: Option<&Tensor>,
        rows: usize,
    ) -> Result<Tensor> {
        Ok(match (&self.factored, &self.quantized) {
            (Some(f), _) => f.forward(x, experts)?,
            (None, Some(Quantized::Candle(q)))
                if mode == Mode::Fast && rows <= QUANTIZED_MAX_ROWS =>
            {
                q.forward(x)?
            }
            _ => match &self.weight {
                Matrix::Packed(p) => {
                    let [y] = autograd::packed_matmul_t_each(x, [p])?;
                    y
                }
                Matrix::Tensor(w) if w.track_op() => autograd::plain_matmul_t(x, w)?,
                Matrix::Tensor(w) => autograd::frozen_matmul_t(x, w)?,
            },
        })
    }
}

impl<'a> Shared<'a> {
    fn packed(self) -> Option<&'a Arc<tsq_linalg::PackedMatrix>> {
        match self {
            Self::Packed(p) => Some(p),
            Self::Q8(_) => None,
        }
    }

    fn q8(self) -> Option<&'a tsq_linalg::Q8Matrix> {
        match self {
            Self::Q8(w) => Some(w),
            Self::Packed(_) => None,
        }
    }
}

/// `pick` of every projection's shared kernel where each has one of that kind.
fn all<'a, T, const N: usize>(
    shared: [Option<Shared<'a>>; N],
    pick: fn(Shared<'a>) -> Option<T>,
) -> Option<[T; N]> {
    let picked = shared.map(|s| s.and_then(pick));
    picked
        .iter()
        .all(Option::is_some)
        .then(|| picked.map(|p| p.expect("checked above")))
}
