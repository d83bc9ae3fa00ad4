//! The maths a forward pass shares: rotary tables and embedding, RMS norm, gating, softmax
//! (fused kernels for inference, differentiable primitives otherwise).

use super::*;
use crate::model::autograd::{linalg_applies, with_f32_storage};
use crate::model::kernels::{self, Activation};

/// `act(gate) ⊙ up`: in the fast path on the CPU one fused pass with a vectorised exp (libm's
/// scalar `expf` and candle's two passes were ~10% of a prefill).
pub(super) fn gated(
    gate: &Tensor,
    up: &Tensor,
    activation: Activation,
    mode: Mode,
) -> Result<Tensor> {
    if mode == Mode::Differentiable || !linalg_applies(gate) || gate.dims() != up.dims() {
        let activated = match activation {
            Activation::Silu => candle_nn::ops::silu(gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        return Ok((activated * up)?);
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let n = gate.elem_count();
    let mut out = vec![0f32; n];
    with_f32_storage(&gate, |g| {
        with_f32_storage(&up, |u| activation.gated(&g[..n], &u[..n], &mut out))
    })??;
    Ok(Tensor::from_vec(out, gate.dims(), gate.device())?)
}

/// The fast path's attention probabilities: softmax over keys of `scores` (b, kv_heads, rep·t,
/// total) times `scale`, under `mask` (b, 1, t, total), which every query head of a position
/// shares.
pub(super) fn masked_softmax(
    scores: &Tensor,
    mask: &Tensor,
    t: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, kv_heads, rows, total) = scores.dims4()?;
    if !linalg_applies(scores) {
        let masked = scores
            .affine(scale, 0.0)?
            .reshape((b, kv_heads, rows / t, t, total))?
            .broadcast_add(&mask.unsqueeze(2)?)?
            .reshape((b, kv_heads, rows, total))?;
        return Ok(candle_nn::ops::softmax_last_dim(&masked)?);
    }
    let (scores, mask) = (
        scores.contiguous()?,
        mask.to_dtype(DType::F32)?.contiguous()?,
    );
    let per_sequence = kv_heads * rows;
    // Row r is sequence r / per_sequence at position r % t (query heads stacked by position).
    let mask_row = |r: usize| r / per_sequence * t + r % t;
    let mut out = vec![0f32; scores.elem_count()];
    with_f32_storage(&scores, |s| {
        with_f32_storage(&mask, |m| {
            let n = b * per_sequence * total;
            kernels::masked_softmax(
                &s[..n],
                &m[..b * t * total],
                total,
                mask_row,
                scale as f32,
                &mut out,
            )
        })
    })??;
    Ok(Tensor::from_vec(
        out,
        (b, kv_heads, rows, total),
        scores.device(),
    )?)
}

/// Attention of q (b, heads, t, d) over k and v (b, kv_heads, total, d), views of the KV cache
/// allowed, under `mask` (b, 1, t, total) and its `visibility`, in one pass of tsq-linalg's
/// fused kernel (f32 on the CPU): (b, t, heads·d), the layout the output projection reads.
pub(super) fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    visibility: &tsq_linalg::Visibility,
) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let (_, kv_heads, total, _) = k.dims4()?;
    let q = q.contiguous()?;
    let mask = mask.contiguous()?;
    let (k, v, kv_stride) = key_value_matrices(k, v)?;
    let shape = tsq_linalg::Shape {
        batch: b,
        queries: t,
        keys: total,
        heads,
        kv_heads,
        dim: d,
    };
    let scale = 1.0 / (d as f32).sqrt();
    let out = with_f32_storage(&q, |q| {
        with_f32_storage(&k, |k| {
            with_f32_storage(&v, |v| {
                with_f32_storage(&mask, |mask| {
                    let operands = tsq_linalg::Operands {
                        q: &q[..b * heads * t * d],
                        k,
                        v,
                        kv_stride,
                        mask: &mask[..b * t * total],
                        visibility,
                        scale,
                    };
                    tsq_linalg::attention(shape, &operands)
                })
            })
        })
    })????;
    Ok(Tensor::from_vec(out, (b, t, heads * d), q.device())?)
}

/// What an f32 CPU `mask` (b, 1, t, total) hides and shows wholesale, for [`fused_attention`].
pub(super) fn visibility(mask: &Tensor) -> Result<tsq_linalg::Visibility> {
    let mask = mask.contiguous()?;
    let keys = mask.dim(D::Minus1)?;
    Ok(with_f32_storage(&mask, |m| {
        tsq_linalg::Visibility::of(&m[..mask.elem_count()], keys)
    })?)
}

/// k and v (b, kv_heads, total, d) as matrices of rows d apart, one every `kv_stride` values:
/// views of the KV cache's buffers stay in place, anything else is copied contiguous.
fn key_value_matrices(k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, usize)> {
    let (_, kv_heads, total, d) = k.dims4()?;
    let in_place = |t: &Tensor| {
        let s = t.stride();
        s[3] == 1 && s[2] == d && s[1] >= total * d && s[0] == kv_heads * s[1]
    };
    if in_place(k) && in_place(v) && k.stride() == v.stride() {
        let stride = k.stride()[1];
        return Ok((k.clone(), v.clone(), stride));
    }
    Ok((k.contiguous()?, v.contiguous()?, total * d))
}

/// cos and sin of every position (context × rotary_dim / 2); under LongRoPE followed by those of
/// the long factors (see [`Transformer::table_rows`]).
pub(super) fn rope_tables(config: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let scale = config.rope_attention_factor();
    let (cos, sin) = tables(config, config.inv_freq(), scale, device)?;
    let Some(long) = config.long_inv_freq() else {
        return Ok((cos, sin));
    };
    let (long_cos, long_sin) = tables(config, long, scale, device)?;
    Ok((
        Tensor::cat(&[cos, long_cos], 0)?,
        Tensor::cat(&[sin, long_sin], 0)?,
    ))
}

/// The tables of layers that rotate with a base of their own (Gemma 3's sliding-window layers).
pub(super) fn local_rope_tables(
    config: &ModelConfig,
    device: &Device,
) -> Result<Option<(Tensor, Tensor)>> {
    (config.local_inv_freq())
        .map(|inv_freq| tables(config, inv_freq, 1.0, device))
        .transpose()
}

/// cos and sin (context × rotary_dim / 2) of every position's angles, times `scale`.
fn tables(
    config: &ModelConfig,
    inv_freq: Vec<f32>,
    scale: f32,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = config.rotary_dim() / 2;
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let positions = Tensor::arange(0u32, config.max_position_embeddings as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((config.max_position_embeddings, 1))?;
    let freqs = positions.broadcast_mul(&inv_freq)?;
    let scale = f64::from(scale);
    Ok(((freqs.cos()? * scale)?, (freqs.sin()? * scale)?))
}

/// tanh(x / cap) · cap: Gemma 2's soft cap on attention scores and logits.
pub(super) fn soft_cap(x: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(((x / cap)?.tanh()? * cap)?)
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

/// Rotary embedding rotating halves (HF layout) of each head's first 2 · `cos.dim(2)`
/// dimensions, the rest passed through (partial rotation). `cos`/`sin` are (batch, time,
/// rotary_dim / 2).
pub(super) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, mode: Mode) -> Result<Tensor> {
    let (d, rotated) = (x.dim(D::Minus1)?, 2 * cos.dim(D::Minus1)?);
    if rotated < d {
        let head = rope(
            &x.narrow(D::Minus1, 0, rotated)?.contiguous()?,
            cos,
            sin,
            mode,
        )?;
        let rest = x.narrow(D::Minus1, rotated, d - rotated)?;
        return Ok(Tensor::cat(&[&head, &rest], D::Minus1)?.contiguous()?);
    }
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
