//! The maths a forward pass shares: rotary tables and embedding, RMS norm, softmax (fused
//! kernels for inference, differentiable primitives otherwise).

use super::*;

pub(super) fn rope_tables(config: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = config.head_dim / 2;
    let inv_freq = Tensor::from_vec(config.inv_freq(), (1, half), device)?;
    let positions = Tensor::arange(0u32, config.max_position_embeddings as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((config.max_position_embeddings, 1))?;
    let freqs = positions.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

pub(super) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Fast => Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            weight,
            eps as f32,
        )?),
        Mode::Differentiable => {
            let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
            Ok(x.broadcast_div(&(variance + eps)?.sqrt()?)?
                .broadcast_mul(weight)?)
        }
    }
}

/// Rotary embedding rotating halves (HF layout). `cos`/`sin` are (batch, time, head_dim / 2).
pub(super) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, mode: Mode) -> Result<Tensor> {
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    match mode {
        Mode::Fast => Ok(candle_nn::rotary_emb::rope(
            x,
            &cos.contiguous()?,
            &sin.contiguous()?,
        )?),
        Mode::Differentiable => {
            let d = x.dim(D::Minus1)?;
            let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?.unsqueeze(1)?;
            let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?.unsqueeze(1)?;
            let x1 = x.narrow(D::Minus1, 0, d / 2)?;
            let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
        }
    }
}

/// Softmax from differentiable primitives, stable against large scores and -inf masks.
pub(super) fn softmax_primitive(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}
