//! Fast kernels with hand-written backward passes, for the differentiable forward.
//!
//! candle's fused kernels (`softmax_last_dim`, `rms_norm`, `rope`) have no backward, and its
//! primitive-op versions are slow to differentiate: every elementwise op's backward also computes
//! gradients for untracked operands (masks, rotary tables, norm weights) and accumulates into
//! zero-filled buffers. Likewise its matmul backward computes both operands' gradients, so a frozen
//! weight gets a weight-sized gradient nobody reads.
//!
//! Here the forward runs the fast kernel on detached inputs, and the result is attached to the
//! input's graph by [`attach`], whose backward is a closure computing the input gradient only.
//! On devices other than the CPU the callers use the primitive-op forms instead.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, D, Layout, Result, Shape, Tensor};

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
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("{}: expects a contiguous result", self.name);
        }
        Ok((result.clone(), layout.shape().clone()))
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

/// `x Wᵀ` (x: (…, in), W: (out, in)) where only `x` may need a gradient.
pub fn frozen_matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if x.track_op() && !x.device().is_cpu() {
        return plain_matmul_t(x, weight);
    }
    let product = plain_matmul_t(&x.detach(), weight)?;
    let weight = weight.clone();
    attach(x, product, "frozen-matmul", move |_, grad| {
        let mut dims = grad.dims().to_vec();
        let out = dims.pop().unwrap_or(1);
        let rows: usize = dims.iter().product();
        let grad_x = grad.reshape((rows, out))?.matmul(&weight)?;
        dims.push(weight.dim(1)?);
        grad_x.reshape(dims)
    })
}

/// `x Wᵀ` with candle's matmul. Flattening to 2D first matters: candle's batched matmul is ~1.5x
/// slower than its plain one on decode shapes (1×576 · 576×1536).
pub fn plain_matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let inner = dims.pop().unwrap_or(1);
    let rows: usize = dims.iter().product();
    let y = x.reshape((rows, inner))?.matmul(&weight.t()?)?;
    dims.push(weight.dim(0)?);
    y.reshape(dims)
}

/// Softmax over the last dimension; backward y ⊙ (g − Σ g ⊙ y).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    attach(x, y, "softmax", |y, g| {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        y * g.broadcast_sub(&dot)?
    })
}

/// RMS norm with a frozen weight; backward r ⊙ (g w − x̂ · mean(g w ⊙ x̂)), r = 1/rms(x), x̂ = x r.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let input = x.detach();
    let y = candle_nn::ops::rms_norm(&input.contiguous()?, weight, eps as f32)?;
    let weight = weight.clone();
    attach(x, y, "rms-norm", move |_, g| {
        let r = (input.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        let x_hat = input.broadcast_mul(&r)?;
        let gw = g.broadcast_mul(&weight)?;
        let dot = (&gw * &x_hat)?.mean_keepdim(D::Minus1)?;
        (gw - x_hat.broadcast_mul(&dot)?)?.broadcast_mul(&r)
    })
}

/// Rotary embedding rotating halves, y = x cos + rot(x) sin with rot(x) = (−x₂, x₁); `cos`/`sin`
/// are (batch, time, head_dim / 2) and `x` is (batch, heads, time, head_dim). Backward
/// g cos + (s₂, −s₁) where s = g sin.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let y = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
    let full = |t: &Tensor| -> Result<Tensor> { Tensor::cat(&[t, t], D::Minus1)?.unsqueeze(1) };
    let (cos, sin) = (full(cos)?, full(sin)?);
    attach(x, y, "rope", move |_, g| {
        let d = g.dim(D::Minus1)?;
        let s = g.broadcast_mul(&sin)?;
        let unrotated = Tensor::cat(
            &[
                &s.narrow(D::Minus1, d / 2, d / 2)?,
                &s.narrow(D::Minus1, 0, d / 2)?.neg()?,
            ],
            D::Minus1,
        )?;
        g.broadcast_mul(&cos)? + unrotated
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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
    fn softmax_matches_primitive_ops() -> Result<()> {
        let x = Var::randn(0f32, 2.0, (2, 3, 7), &Device::Cpu)?;
        agree(&x, softmax_last_dim, |x| {
            let e = x
                .broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?
                .exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        })
    }

    #[test]
    fn rms_norm_matches_primitive_ops() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, 6, &Device::Cpu)?;
        let x = Var::randn(0f32, 1.0, (2, 3, 6), &Device::Cpu)?;
        agree(
            &x,
            |x| rms_norm(x, &w, 1e-5),
            |x| {
                let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(variance + 1e-5)?.sqrt()?)?
                    .broadcast_mul(&w)
            },
        )
    }

    #[test]
    fn rope_matches_primitive_ops() -> Result<()> {
        let (b, h, t, d) = (2, 3, 4, 8);
        let cos = Tensor::randn(0f32, 1.0, (b, t, d / 2), &Device::Cpu)?;
        let sin = Tensor::randn(0f32, 1.0, (b, t, d / 2), &Device::Cpu)?;
        let x = Var::randn(0f32, 1.0, (b, h, t, d), &Device::Cpu)?;
        agree(
            &x,
            |x| rope(x, &cos, &sin),
            |x| {
                let full = |t: &Tensor| Tensor::cat(&[t, t], D::Minus1)?.unsqueeze(1);
                let x1 = x.narrow(D::Minus1, 0, d / 2)?;
                let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
                let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
                x.broadcast_mul(&full(&cos)?)? + rotated.broadcast_mul(&full(&sin)?)?
            },
        )
    }
}
