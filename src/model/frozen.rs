//! `x Wᵀ` for a frozen weight W, with a backward pass that computes the input's gradient only.
//!
//! candle's matmul backward always computes both operands' gradients, so every frozen projection
//! and the LM head of a model being SVF-trained would get a weight-sized gradient (and the FLOPs
//! of a second matmul) that nobody reads: in a trial that cost 3 GB on SmolLM2. Here the product
//! is computed without a graph and then attached to `x` through a custom op whose backward is
//! `grad · W`.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct FrozenMatmul {
    /// (out, in)
    weight: Tensor,
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    /// Passes the precomputed product (second argument) through.
    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _x_layout: &Layout,
        product: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("frozen-matmul expects a contiguous product");
        }
        Ok((product.clone(), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _product: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut dims = grad.dims().to_vec();
        let out = dims.pop().unwrap_or(1);
        let rows: usize = dims.iter().product();
        let grad_x = grad.reshape((rows, out))?.matmul(&self.weight)?;
        dims.push(self.weight.dim(1)?);
        Ok((Some(grad_x.reshape(dims)?), None))
    }
}

/// `x Wᵀ` (x: (…, in), W: (out, in)) where only `x` may need a gradient.
pub fn matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let product = plain_matmul_t(&x.detach(), weight)?.contiguous()?;
    if !x.track_op() || !x.device().is_cpu() {
        // Nothing to differentiate, or a device without our op: candle's own matmul.
        return if x.track_op() {
            plain_matmul_t(x, weight)
        } else {
            Ok(product)
        };
    }
    x.apply_op2(
        &product,
        FrozenMatmul {
            weight: weight.clone(),
        },
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_input_gradient_match_candles_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let x = Var::randn(0f32, 1.0, (2, 3, 4), &dev)?;
        let loss = |y: Tensor| y.sqr()?.sum_all();
        let ours = matmul_t(x.as_tensor(), &w)?;
        let theirs = plain_matmul_t(x.as_tensor(), &w)?;
        let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "forward differs by {diff}");
        let (g_ours, g_theirs) = (loss(ours)?.backward()?, loss(theirs)?.backward()?);
        let (a, b) = (
            g_ours.get(x.as_tensor()).expect("x gets a gradient"),
            g_theirs.get(x.as_tensor()).expect("x gets a gradient"),
        );
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gradients differ by {diff}");
        Ok(())
    }
}
