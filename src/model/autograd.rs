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

use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, Layout, Result, Shape, Tensor};
use tsq_linalg::{Mat, MatMut, Threads};

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
    if x.track_op() && !x.device().is_cpu() {
        return plain_matmul_t(x, weight);
    }
    let product = plain_matmul_t(&x.detach(), weight)?;
    let weight = weight.clone();
    attach(x, product, "frozen-matmul", move |_, grad| {
        let mut dims = grad.dims().to_vec();
        let out = dims.pop().unwrap_or(1);
        let rows: usize = dims.iter().product();
        let grad_x = matmul(&grad.reshape((rows, out))?, &weight)?;
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
    let x = x.reshape((rows, inner))?;
    let y = match linalg_product(&x, weight, true)? {
        Some(y) => y,
        None => x.matmul(&weight.t()?)?,
    };
    dims.push(weight.dim(0)?);
    y.reshape(dims)
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

/// Whether `tsq_linalg` can take this operand: f32 on the CPU.
fn linalg_applies(t: &Tensor) -> bool {
    t.dtype() == candle_core::DType::F32 && t.device().is_cpu()
}

/// op(a) · op(b) over equal leading dimensions, one `tsq_linalg::matmul` per matrix. `a_t`/`b_t`
/// say the operand's last two dimensions are stored transposed.
fn linalg_gemm(a: &Tensor, a_t: bool, b: &Tensor, b_t: bool) -> Result<Tensor> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
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
    with_f32_slice(&a, |a| {
        with_f32_slice(&b, |b| {
            for (i, c) in out.chunks_mut(m * n).enumerate() {
                let x = operand(&a[i * m * k..(i + 1) * m * k], a_t, m, k);
                let y = operand(&b[i * k * n..(i + 1) * k * n], b_t, k, n);
                tsq_linalg::matmul(MatMut::new(c, m, n), x, y, false, Threads::All);
            }
        })
    })??;
    let mut dims = batch.to_vec();
    dims.extend([m, n]);
    Tensor::from_vec(out, dims, a.device())
}

/// `rows × cols` as read, stored transposed (`cols × rows`) when `transposed`.
fn operand(data: &[f32], transposed: bool, rows: usize, cols: usize) -> Mat<'_> {
    match transposed {
        true => Mat::new(data, cols, rows).t(),
        false => Mat::new(data, rows, cols),
    }
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor, without copying them.
fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let start = layout.start_offset();
            Ok(f(&cpu.as_slice::<f32>()?[start..start + t.elem_count()]))
        }
        _ => candle_core::bail!("expected a CPU tensor"),
    }
}

/// softmax(mask(x · scale)) over the last dimension, where `mask` adds a constant (the attention
/// mask). Scale and mask live inside this one graph node: as separate nodes their backward
/// passes cost several full-size elementwise ops on the attention scores. Backward:
/// scale · y ⊙ (g − Σ g ⊙ y), one pass over each row.
pub fn masked_softmax(
    x: &Tensor,
    scale: f64,
    mask: impl Fn(Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&mask((x.detach() * scale)?)?)?;
    attach(x, y, "softmax", move |y, g| {
        if !(is_cpu_f32(y) && is_cpu_f32(g)) {
            let dot = (g * y)?.sum_keepdim(D::Minus1)?;
            return (y * g.broadcast_sub(&dot)?)? * scale;
        }
        let (y, g) = (y.contiguous()?, g.contiguous()?);
        let width = y.dim(D::Minus1)?;
        let scale = scale as f32;
        let out = with_f32_slice(&y, |ys| {
            with_f32_slice(&g, |gs| {
                let mut out = Vec::with_capacity(ys.len());
                for (yr, gr) in ys.chunks(width).zip(gs.chunks(width)) {
                    let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                    out.extend(yr.iter().zip(gr).map(|(a, b)| scale * a * (b - dot)));
                }
                out
            })
        })??;
        Tensor::from_vec(out, y.dims(), y.device())
    })
}

fn is_cpu_f32(t: &Tensor) -> bool {
    t.dtype() == candle_core::DType::F32 && t.device().is_cpu()
}

/// silu(gate) ⊙ up (the gated MLP), with a backward computing both inputs' gradients in one
/// pass: d gate = d · up · σ(g)(1 + g(1 − σ(g))), d up = d · silu(g). candle's own silu backward
/// takes ~8 full-size elementwise ops; at 2048 tokens it cost more than the MLP's products.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if (gate.track_op() || up.track_op()) && !(is_cpu_f32(gate) && is_cpu_f32(up)) {
        return candle_nn::ops::silu(gate)? * up;
    }
    let product = (candle_nn::ops::silu(&gate.detach())? * up.detach())?;
    attach_pair(gate, up, product, "silu-mul", |gate, up, grad| {
        let (g, u, d) = (
            gate.detach().contiguous()?,
            up.detach().contiguous()?,
            grad.contiguous()?,
        );
        let (grad_gate, grad_up) = with_f32_slice(&g, |gs| {
            with_f32_slice(&u, |us| {
                with_f32_slice(&d, |ds| {
                    let mut grad_gate = Vec::with_capacity(gs.len());
                    let mut grad_up = Vec::with_capacity(gs.len());
                    for ((&g, &u), &d) in gs.iter().zip(us).zip(ds) {
                        let sigma = 1.0 / (1.0 + (-g).exp());
                        grad_gate.push(d * u * sigma * (1.0 + g * (1.0 - sigma)));
                        grad_up.push(d * g * sigma);
                    }
                    (grad_gate, grad_up)
                })
            })
        })???;
        let tensor = |v: Vec<f32>| Tensor::from_vec(v, g.dims(), g.device());
        Ok((
            gate.track_op().then(|| tensor(grad_gate)).transpose()?,
            up.track_op().then(|| tensor(grad_up)).transpose()?,
        ))
    })
}

/// `h ⊙ s` for h (…, r) and s (r): the scaled singular values of a factored projection. One
/// node whose backward computes d h = g ⊙ s and d s = Σ_rows g ⊙ h in one pass; as candle's
/// broadcast multiply it took several (rows × r) elementwise ops plus a reduction.
pub fn scale_columns(h: &Tensor, s: &Tensor) -> Result<Tensor> {
    if !((h.track_op() || s.track_op()) && is_cpu_f32(h) && is_cpu_f32(s)) {
        return h.broadcast_mul(s);
    }
    let product = h.detach().broadcast_mul(&s.detach())?;
    attach_pair(h, s, product, "scale-columns", |h, s, grad| {
        let (hc, sc, g) = (
            h.detach().contiguous()?,
            s.detach().contiguous()?,
            grad.contiguous()?,
        );
        let r = sc.elem_count();
        let (grad_h, grad_s) = with_f32_slice(&hc, |hs| {
            with_f32_slice(&sc, |ss| {
                with_f32_slice(&g, |gs| {
                    let mut grad_h = Vec::with_capacity(hs.len());
                    let mut grad_s = vec![0f32; r];
                    for (hr, gr) in hs.chunks(r).zip(gs.chunks(r)) {
                        for j in 0..r {
                            grad_h.push(gr[j] * ss[j]);
                            grad_s[j] += gr[j] * hr[j];
                        }
                    }
                    (grad_h, grad_s)
                })
            })
        })???;
        Ok((
            h.track_op()
                .then(|| Tensor::from_vec(grad_h, hc.dims(), hc.device()))
                .transpose()?,
            s.track_op()
                .then(|| Tensor::from_vec(grad_s, sc.dims(), sc.device()))
                .transpose()?,
        ))
    })
}

/// RMS norm with a frozen weight; backward r ⊙ (g w − x̂ · mean(g w ⊙ x̂)), r = 1/rms(x), x̂ = x r.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let input = x.detach();
    let y = candle_nn::ops::rms_norm(&input.contiguous()?, weight, eps as f32)?;
    let weight = weight.clone();
    attach(x, y, "rms-norm", move |_, g| {
        if !(is_cpu_f32(&input) && is_cpu_f32(g) && is_cpu_f32(&weight)) {
            let r = (input.sqr()?.mean_keepdim(D::Minus1)? + eps)?
                .sqrt()?
                .recip()?;
            let x_hat = input.broadcast_mul(&r)?;
            let gw = g.broadcast_mul(&weight)?;
            let dot = (&gw * &x_hat)?.mean_keepdim(D::Minus1)?;
            return (gw - x_hat.broadcast_mul(&dot)?)?.broadcast_mul(&r);
        }
        // One pass per row: r = 1/rms(x), x̂ = x r, gw = g w, d x = r (gw − x̂ mean(gw ⊙ x̂)).
        let (xc, gc, wc) = (input.contiguous()?, g.contiguous()?, weight.contiguous()?);
        let width = xc.dim(D::Minus1)?;
        let out = with_f32_slice(&xc, |xs| {
            with_f32_slice(&gc, |gs| {
                with_f32_slice(&wc, |ws| {
                    let mut out = Vec::with_capacity(xs.len());
                    for (xr, gr) in xs.chunks(width).zip(gs.chunks(width)) {
                        let mean_sq = xr.iter().map(|v| v * v).sum::<f32>() / width as f32;
                        let r = 1.0 / (mean_sq + eps as f32).sqrt();
                        let dot = xr
                            .iter()
                            .zip(gr)
                            .zip(ws)
                            .map(|((x, g), w)| g * w * x * r)
                            .sum::<f32>()
                            / width as f32;
                        out.extend(
                            xr.iter()
                                .zip(gr)
                                .zip(ws)
                                .map(|((x, g), w)| r * (g * w - x * r * dot)),
                        );
                    }
                    out
                })
            })
        })???;
        Tensor::from_vec(out, xc.dims(), xc.device())
    })
}

/// Rotary embedding rotating halves, y = x cos + rot(x) sin with rot(x) = (−x₂, x₁); `cos`/`sin`
/// are (batch, time, head_dim / 2) and `x` is (batch, heads, time, head_dim). Backward
/// g cos + (s₂, −s₁) where s = g sin.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let y = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    attach(x, y, "rope", move |_, g| {
        if !(is_cpu_f32(g) && is_cpu_f32(&cos) && is_cpu_f32(&sin)) {
            let full = |t: &Tensor| Tensor::cat(&[t, t], D::Minus1)?.unsqueeze(1);
            let d = g.dim(D::Minus1)?;
            let s = g.broadcast_mul(&full(&sin)?)?;
            let unrotated = Tensor::cat(
                &[
                    &s.narrow(D::Minus1, d / 2, d / 2)?,
                    &s.narrow(D::Minus1, 0, d / 2)?.neg()?,
                ],
                D::Minus1,
            )?;
            return g.broadcast_mul(&full(&cos)?)? + unrotated;
        }
        // One pass: with h = d/2, d x_i = g_i cos_i + g_{i+h} sin_i and
        // d x_{i+h} = g_{i+h} cos_i − g_i sin_i, rows of g indexed (batch, head, time).
        let g = g.contiguous()?;
        let (batch, heads, time, d) = g.dims4()?;
        let h = d / 2;
        let out = with_f32_slice(&g, |gs| {
            with_f32_slice(&cos, |cs| {
                with_f32_slice(&sin, |ss| {
                    let mut out = vec![0f32; gs.len()];
                    for (row, (gr, or)) in gs.chunks(d).zip(out.chunks_mut(d)).enumerate() {
                        let (b, t) = (row / (heads * time), row % time);
                        let at = (b * time + t) * h;
                        let (c, s) = (&cs[at..at + h], &ss[at..at + h]);
                        for i in 0..h {
                            or[i] = gr[i] * c[i] + gr[i + h] * s[i];
                            or[i + h] = gr[i + h] * c[i] - gr[i] * s[i];
                        }
                    }
                    out
                })
            })
        })???;
        debug_assert_eq!(out.len(), batch * heads * time * d);
        Tensor::from_vec(out, g.dims(), g.device())
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

    #[test]
    fn silu_mul_matches_primitive_ops_for_both_inputs() -> Result<()> {
        let gate = Var::randn(0f32, 2.0, (2, 3, 7), &Device::Cpu)?;
        let up = Var::randn(0f32, 1.0, (2, 3, 7), &Device::Cpu)?;
        let primitive = |g: &Tensor, u: &Tensor| (g * candle_nn::ops::sigmoid(g)?)? * u;
        agree(
            &gate,
            |g| silu_mul(g, up.as_tensor()),
            |g| primitive(g, up.as_tensor()),
        )?;
        agree(
            &up,
            |u| silu_mul(gate.as_tensor(), u),
            |u| primitive(gate.as_tensor(), u),
        )
    }

    #[test]
    fn masked_softmax_matches_primitive_ops() -> Result<()> {
        let x = Var::randn(0f32, 2.0, (2, 3, 7), &Device::Cpu)?;
        let mask = Tensor::randn(0f32, 1.0, (2, 1, 7), &Device::Cpu)?;
        agree(
            &x,
            |x| masked_softmax(x, 0.3, |s| s.broadcast_add(&mask)),
            |x| {
                let s = (x * 0.3)?.broadcast_add(&mask)?;
                let e = s
                    .broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?
                    .exp()?;
                e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
            },
        )
    }

    #[test]
    fn scale_columns_matches_broadcast_mul_for_both_inputs() -> Result<()> {
        let h = Var::randn(0f32, 1.0, (2, 3, 5), &Device::Cpu)?;
        let s = Var::randn(0f32, 1.0, 5, &Device::Cpu)?;
        agree(
            &h,
            |h| scale_columns(h, s.as_tensor()),
            |h| h.broadcast_mul(s.as_tensor()),
        )?;
        agree(
            &s,
            |s| scale_columns(h.as_tensor(), s),
            |s| h.as_tensor().broadcast_mul(s),
        )
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
