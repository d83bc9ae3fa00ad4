//! Row kernels over row-major f32 slices, forward and backward: the SVF training engine's
//! (`svf::backprop`) and the fast forward's fused ones on the CPU. Rows are independent, so
//! each kernel splits its rows over the rayon pool; products go through `tsq_linalg`.

use rayon::prelude::*;
pub use tsq_linalg::exp;
use tsq_linalg::wide_fn;

/// Rows per rayon task: large enough that scheduling costs vanish next to the work.
const ROWS_PER_TASK: usize = 16;

/// Σ values over eight running sums, so the loop vectorises: one f32 accumulator is a serial
/// chain the compiler may not reorder.
#[inline(always)]
pub fn sum(values: &[f32]) -> f32 {
    lane_sum(values, |v| v)
}

/// Σ e^(v − shift) over `values`, like [`sum`].
#[inline(always)]
pub fn sum_exp(values: &[f32], shift: f32) -> f32 {
    lane_sum(values, |v| exp(v - shift))
}

/// Σ f(v) over eight running sums.
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder().iter().map(|&v| f(v)).sum::<f32>();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(l, &v)| *l += f(v));
    }
    lanes.iter().sum::<f32>() + rest
}

/// Σ a·b over eight running sums, like [`sum`].
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = (a8.remainder().iter().zip(b8.remainder()))
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in a8.zip(b8) {
        for ((l, a), b) in lanes.iter_mut().zip(a).zip(b) {
            *l += a * b;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

wide_fn! {
/// C (m × n) = A (m × k) · Bᵀ for B (n × k), all row-major and contiguous: a decoding step's
/// few query rows against every cached key, the keys read in place (faer packed them anew on
/// every call: 6% of batch-1 decoding).
pub fn rows_times_rows_t(a: &[f32], b: &[f32], k: usize, c: &mut [f32]) {
    let n = b.len() / k;
    for (j, key) in b.chunks_exact(k).enumerate() {
        for (i, query) in a.chunks_exact(k).enumerate() {
            c[i * n + j] = dot(query, key);
        }
    }
}
}

wide_fn! {
/// C (m × n) = A (m × k) · B (k × n), all row-major and contiguous: a decoding step's few rows
/// of attention weights times every cached value row, read in place.
pub fn rows_times_rows(a: &[f32], b: &[f32], n: usize, c: &mut [f32]) {
    let k = b.len() / n;
    c.fill(0.0);
    for (j, row) in b.chunks_exact(n).enumerate() {
        for (i, out) in c.chunks_exact_mut(n).enumerate() {
            let w = a[i * k + j];
            out.iter_mut().zip(row).for_each(|(o, v)| *o += w * v);
        }
    }
}
}

/// Σ a·b·c over eight running sums, like [`sum`].
#[inline(always)]
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8, c8) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let rest: f32 = (a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .zip(c8.remainder()))
    .map(|((a, b), c)| a * b * c)
    .sum();
    for ((a, b), c) in a8.zip(b8).zip(c8) {
        for (((l, a), b), c) in lanes.iter_mut().zip(a).zip(b).zip(c) {
            *l += a * b * c;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// The largest value (−∞ for none), over eight running maxima like [`sum`].
#[inline(always)]
pub fn max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for chunk in chunks {
        lanes
            .iter_mut()
            .zip(chunk)
            .for_each(|(l, &v)| *l = l.max(v));
    }
    lanes.iter().fold(rest, |m, &v| m.max(v))
}

/// `out = x / rms(x) ⊙ weight` per row of `x` (rows × weight.len()); `inv_rms` gets each row's
/// 1 / sqrt(mean(x²) + eps) for the backward pass.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32], inv_rms: &mut [f32]) {
    let width = weight.len();
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(inv_rms.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(width * ROWS_PER_TASK))
        .for_each(|((out, inv), x)| rms_norm_rows(x, weight, eps, out, inv));
}

wide_fn! {
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32], inv_rms: &mut [f32]) {
    let width = weight.len();
    for ((out, inv), x) in out.chunks_mut(width).zip(inv_rms).zip(x.chunks(width)) {
        let mean_square = dot(x, x) / width as f32;
        *inv = 1.0 / (mean_square + eps).sqrt();
        for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
            *o = v * *inv * w;
        }
    }
}
}

/// `grad_x += ∂/∂x` of [`rms_norm`] given `grad_y`: with u = weight ⊙ grad_y and r = inv_rms,
/// ∂x = r·u − x·r³·(u·x)/width.
pub fn rms_norm_backward(
    x: &[f32],
    weight: &[f32],
    inv_rms: &[f32],
    grad_y: &[f32],
    grad_x: &mut [f32],
) {
    let width = weight.len();
    grad_x
        .par_chunks_mut(width * ROWS_PER_TASK)
        .zip(x.par_chunks(width * ROWS_PER_TASK))
        .zip(grad_y.par_chunks(width * ROWS_PER_TASK))
        .zip(inv_rms.par_chunks(ROWS_PER_TASK))
        .for_each(|(((gx, x), gy), inv)| rms_norm_backward_rows(x, weight, inv, gy, gx));
}

wide_fn! {
fn rms_norm_backward_rows(
    x: &[f32],
    weight: &[f32],
    inv_rms: &[f32],
    grad_y: &[f32],
    grad_x: &mut [f32],
) {
    let width = weight.len();
    let rows = grad_x.chunks_mut(width).zip(x.chunks(width));
    for ((gx, x), (gy, &r)) in rows.zip(grad_y.chunks(width).zip(inv_rms)) {
        let k = r * r * r * dot3(x, gy, weight) / width as f32;
        for (((gx, x), gy), w) in gx.iter_mut().zip(x).zip(gy).zip(weight) {
            *gx += r * w * gy - k * x;
        }
    }
}
}

/// The MLP's gating function: `act(gate) ⊙ up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU's tanh approximation (transformers' `gelu_pytorch_tanh`, candle's `gelu`),
    /// computed as g · σ(2u), u = √(2/π) (g + 0.044715 g³): the same function, one
    /// vectorised exp.
    GeluTanh,
}

/// √(2/π), GELU's tanh approximation's constant.
const GELU_K: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

impl Activation {
    /// The name transformers' configs give it (`hidden_act`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::GeluTanh => "gelu_pytorch_tanh",
        }
    }

    /// `act(gate) ⊙ up`, elementwise.
    pub fn gated(self, gate: &[f32], up: &[f32], out: &mut [f32]) {
        out.par_chunks_mut(4096)
            .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
            .for_each(|(out, (gate, up))| match self {
                Self::Silu => silu_mul_chunk(gate, up, out),
                Self::GeluTanh => gelu_mul_chunk(gate, up, out),
            });
    }

    /// Gradients of [`Self::gated`] with respect to gate and up, written over `grad`
    /// (→ ∂gate) and into `grad_up`: ∂gate = grad · up · act′(g), ∂up = grad · act(g).
    pub fn gated_backward(self, gate: &[f32], up: &[f32], grad: &mut [f32], grad_up: &mut [f32]) {
        grad.par_chunks_mut(4096)
            .zip(grad_up.par_chunks_mut(4096))
            .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
            .for_each(|((grad, grad_up), (gate, up))| match self {
                Self::Silu => silu_mul_backward_chunk(gate, up, grad, grad_up),
                Self::GeluTanh => gelu_mul_backward_chunk(gate, up, grad, grad_up),
            });
    }
}

wide_fn! {
fn silu_mul_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}
}

wide_fn! {
/// silu′(g) = σ(g)(1 + g(1 − σ(g))).
fn silu_mul_backward_chunk(gate: &[f32], up: &[f32], grad: &mut [f32], grad_up: &mut [f32]) {
    for (((d, du), &g), &u) in grad.iter_mut().zip(grad_up).zip(gate).zip(up) {
        let sig = 1.0 / (1.0 + exp(-g));
        *du = *d * g * sig;
        *d *= u * sig * (1.0 + g * (1.0 - sig));
    }
}
}

/// σ(2u) for u = √(2/π)(g + 0.044715 g³): gelu(g) = g · σ(2u).
#[inline(always)]
fn gelu_sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp(-2.0 * GELU_K * (g + GELU_CUBIC * g * g * g)))
}

wide_fn! {
fn gelu_mul_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * gelu_sigmoid(g) * u;
    }
}
}

wide_fn! {
/// gelu′(g) = σ(2u) + g · σ(2u)(1 − σ(2u)) · 2u′, u′ = √(2/π)(1 + 3 · 0.044715 g²).
fn gelu_mul_backward_chunk(gate: &[f32], up: &[f32], grad: &mut [f32], grad_up: &mut [f32]) {
    for (((d, du), &g), &u) in grad.iter_mut().zip(grad_up).zip(gate).zip(up) {
        let sig = gelu_sigmoid(g);
        let two_du = 2.0 * GELU_K * (1.0 + 3.0 * GELU_CUBIC * g * g);
        *du = *d * g * sig;
        *d *= u * (sig + g * sig * (1.0 - sig) * two_du);
    }
}
}

/// Softmax of each row of `scores` (`cols` wide) after multiplying by `scale` and adding the
/// additive mask row `mask_row(r)` of `mask` (0 where a key is visible, −∞ where not), into
/// `out`; hidden keys get exactly 0.
pub fn masked_softmax(
    scores: &[f32],
    mask: &[f32],
    cols: usize,
    mask_row: impl Fn(usize) -> usize + Sync,
    scale: f32,
    out: &mut [f32],
) {
    out.par_chunks_mut(cols * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, rows)| {
            for (i, row) in rows.chunks_mut(cols).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let (s, m) = (
                    &scores[r * cols..][..cols],
                    &mask[mask_row(r) * cols..][..cols],
                );
                softmax_row(row, s, m, scale);
            }
        });
}

wide_fn! {
fn softmax_row(row: &mut [f32], scores: &[f32], mask: &[f32], scale: f32) {
    for ((o, &v), &hide) in row.iter_mut().zip(scores).zip(mask) {
        *o = v * scale + hide;
    }
    let top = max(row);
    for v in row.iter_mut() {
        *v = if *v == f32::NEG_INFINITY {
            0.0
        } else {
            exp(*v - top)
        };
    }
    let inv = 1.0 / sum(row);
    row.iter_mut().for_each(|v| *v *= inv);
}
}

/// Rotary tables for positions `0..len`: `cos[t·half + i] = scale · cos(t · inv_freq[i])`,
/// likewise sin (f32 products, as the inference path computes them); `scale` is
/// [`ModelConfig::rope_attention_factor`](crate::model::config::ModelConfig::rope_attention_factor).
pub fn rope_tables(inv_freq: &[f32], scale: f32, len: usize) -> (Vec<f32>, Vec<f32>) {
    let angles = (0..len).flat_map(|t| inv_freq.iter().map(move |f| t as f32 * f));
    angles.map(|a| (scale * a.cos(), scale * a.sin())).unzip()
}

/// Rotates one head vector (HF layout: halves) by its position's angles; `inverse` applies
/// the transpose rotation, which is the backward pass.
pub fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], inverse: bool) {
    let half = x.len() / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let (x1, x2) = x.split_at_mut(half);
    for i in 0..half {
        let (a, b, c, s) = (x1[i], x2[i], cos[i], sign * sin[i]);
        x1[i] = a * c - b * s;
        x2[i] = b * c + a * s;
    }
}

/// How a row of attention scores becomes probabilities: multiplied by `scale`, soft-capped
/// to (−cap, cap) where `cap` is given (Gemma 2), and with only the last `window` keys up to
/// the query visible where `window` is given (sliding-window layers).
#[derive(Clone, Copy, Debug)]
pub struct Scores {
    pub scale: f32,
    pub cap: Option<f32>,
    pub window: Option<usize>,
}

/// Causal softmax, in place, of a block of score rows (`len` apart) for query positions
/// `first..end`, `rep` query heads per position (row r is position first + r / rep), each row
/// seeing keys 0..=its position (the last `window` of them with a window), after `how`'s scale
/// and cap. Hidden entries in the block become 0; columns from `end` on are left alone.
pub fn causal_softmax(
    scores: &mut [f32],
    len: usize,
    rep: usize,
    first: usize,
    end: usize,
    how: Scores,
) {
    causal_softmax_rows(scores, len, rep, first, end, how)
}

wide_fn! {
fn causal_softmax_rows(
    scores: &mut [f32],
    len: usize,
    rep: usize,
    first: usize,
    end: usize,
    how: Scores,
) {
    let Scores { scale, cap, window } = how;
    for (r, row) in scores.chunks_mut(len).enumerate() {
        let visible = first + r / rep + 1;
        let start = window.map_or(0, |w| visible.saturating_sub(w));
        let (before, row) = row[..end].split_at_mut(start);
        before.fill(0.0);
        let (seen, hidden) = row.split_at_mut(visible - start);
        let scale = match cap {
            Some(cap) => {
                seen.iter_mut().for_each(|v| *v = cap * tanh(*v * scale / cap));
                1.0
            }
            None => scale,
        };
        let max = max(seen) * scale;
        seen.iter_mut().for_each(|v| *v = exp(*v * scale - max));
        let inv = 1.0 / sum(seen);
        seen.iter_mut().for_each(|v| *v *= inv);
        hidden.fill(0.0);
    }
}
}

/// tanh through one exponential, vectorisable like [`exp`]: 1 − 2 / (e^2x + 1) (within
/// ~1e-7 of libm's; ±1 from |x| ≈ 9 on).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// Multiplies each gradient of soft-capped scores `grad` by the cap's derivative at its raw
/// score `raw` (both rows × cols, contiguous): ∂/∂s cap · tanh(s · scale / cap) is
/// scale · (1 − tanh²), of which [`causal_softmax_backward`] applied the scale.
pub fn soft_cap_backward(raw: &[f32], grad: &mut [f32], scale: f32, cap: f32) {
    soft_cap_backward_chunk(raw, grad, scale, cap)
}

wide_fn! {
fn soft_cap_backward_chunk(raw: &[f32], grad: &mut [f32], scale: f32, cap: f32) {
    for (g, &s) in grad.iter_mut().zip(raw) {
        let t = tanh(s * scale / cap);
        *g *= 1.0 - t * t;
    }
}
}

/// Turns ∂probs (rows × `cols`) into ∂scores (before scaling) in place:
/// ∂s = scale · p ⊙ (∂p − Σ_j ∂p_j p_j), with p's rows `stride` apart.
pub fn causal_softmax_backward(
    probs: &[f32],
    stride: usize,
    grad: &mut [f32],
    cols: usize,
    scale: f32,
) {
    causal_softmax_backward_rows(probs, stride, grad, cols, scale)
}

wide_fn! {
fn causal_softmax_backward_rows(
    probs: &[f32],
    stride: usize,
    grad: &mut [f32],
    cols: usize,
    scale: f32,
) {
    for (r, g) in grad.chunks_mut(cols).enumerate() {
        let p = &probs[r * stride..r * stride + cols];
        let dot = dot(g, p);
        for (g, p) in g.iter_mut().zip(p) {
            *g = scale * p * (*g - dot);
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Central differences of `f` at `x` along `direction`.
    fn directional(f: impl Fn(&[f32]) -> f64, x: &[f32], direction: &[f32]) -> f64 {
        let eps = 1e-3f32;
        let shifted = |sign: f32| -> Vec<f32> {
            x.iter()
                .zip(direction)
                .map(|(x, d)| x + sign * eps * d)
                .collect()
        };
        (f(&shifted(1.0)) - f(&shifted(-1.0))) / (2.0 * eps as f64)
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum()
    }

    fn assert_close(analytic: f64, numeric: f64) {
        assert!(
            (analytic - numeric).abs() < 2e-2 * numeric.abs().max(1e-2),
            "analytic {analytic} vs numeric {numeric}"
        );
    }

    #[test]
    fn lane_sums_and_maxima_match_plain_folds() {
        for n in [0, 5, 8, 29] {
            let v = values(n, 13);
            let plain: f32 = v.iter().sum();
            assert!(
                (sum(&v) - plain).abs() < 1e-5,
                "{n}: {} vs {plain}",
                sum(&v)
            );
            assert_eq!(max(&v), v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)));
        }
    }

    #[test]
    fn masked_softmax_matches_a_plain_softmax_and_hides_exactly() {
        let (rows, cols, scale) = (40, 7, 0.3f32);
        let scores = values(rows * cols, 5);
        // Two mask rows: the first hides the last three keys, the second only the first.
        let mut mask = vec![0f32; 2 * cols];
        mask[cols - 3..cols].fill(f32::NEG_INFINITY);
        mask[cols] = f32::NEG_INFINITY;
        let mut out = vec![f32::NAN; rows * cols];
        masked_softmax(&scores, &mask, cols, |r| r % 2, scale, &mut out);
        for r in 0..rows {
            let m = &mask[(r % 2) * cols..][..cols];
            let logits: Vec<f64> = (0..cols)
                .map(|j| (scores[r * cols + j] * scale + m[j]) as f64)
                .collect();
            let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|l| (l - top).exp()).sum();
            for j in 0..cols {
                let want = (logits[j] - top).exp() / total;
                let got = out[r * cols + j] as f64;
                assert!(
                    (got - want).abs() < 1e-6,
                    "row {r}, key {j}: {got} vs {want}"
                );
                if m[j] == f32::NEG_INFINITY {
                    assert_eq!(got, 0.0);
                }
            }
        }
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let (rows, width) = (40, 6);
        let (x, weight, probe, dir) = (
            values(rows * width, 1),
            values(width, 2),
            values(rows * width, 3),
            values(rows * width, 4),
        );
        let loss = |x: &[f32]| {
            let (mut y, mut inv) = (vec![0.0; x.len()], vec![0.0; rows]);
            rms_norm(x, &weight, 1e-5, &mut y, &mut inv);
            dot(&y, &probe)
        };
        let (mut y, mut inv) = (vec![0.0; x.len()], vec![0.0; rows]);
        rms_norm(&x, &weight, 1e-5, &mut y, &mut inv);
        let mut grad = vec![0.5; x.len()];
        rms_norm_backward(&x, &weight, &inv, &probe, &mut grad);
        let grad: Vec<f32> = grad.iter().map(|g| g - 0.5).collect();
        assert_close(dot(&grad, &dir), directional(loss, &x, &dir));
    }

    #[test]
    fn gated_activations_backward_matches_finite_differences() {
        let n = 5000;
        let (gate, up, probe, dir) = (values(n, 5), values(n, 6), values(n, 7), values(n, 8));
        for activation in [Activation::Silu, Activation::GeluTanh] {
            let loss = |gate: &[f32], up: &[f32]| {
                let mut out = vec![0.0; n];
                activation.gated(gate, up, &mut out);
                dot(&out, &probe)
            };
            let (mut grad_gate, mut grad_up) = (probe.clone(), vec![0.0; n]);
            activation.gated_backward(&gate, &up, &mut grad_gate, &mut grad_up);
            assert_close(
                dot(&grad_gate, &dir),
                directional(|g| loss(g, &up), &gate, &dir),
            );
            assert_close(
                dot(&grad_up, &dir),
                directional(|u| loss(&gate, u), &up, &dir),
            );
        }
    }

    /// The GELU written as g · σ(2u) is candle's `gelu` (the inference path's), wide inputs
    /// included.
    #[test]
    fn gelu_is_candles_tanh_approximation() -> candle_core::Result<()> {
        let gate: Vec<f32> = values(2000, 3).iter().map(|v| v * 12.0).collect();
        let ones = vec![1f32; gate.len()];
        let mut ours = vec![0f32; gate.len()];
        Activation::GeluTanh.gated(&gate, &ones, &mut ours);
        let device = candle_core::Device::Cpu;
        let candle = candle_core::Tensor::new(gate.as_slice(), &device)?
            .gelu()?
            .to_vec1::<f32>()?;
        for ((a, b), g) in ours.iter().zip(&candle).zip(&gate) {
            assert!(
                (a - b).abs() <= 2e-6 * b.abs().max(1.0),
                "gelu({g}): {a} vs {b}"
            );
        }
        Ok(())
    }

    #[test]
    fn inverse_rotation_undoes_the_rotation() {
        let (cos, sin) = rope_tables(&[1.0, 0.1, 0.01], 1.0, 5);
        let x = values(6, 9);
        let mut y = x.clone();
        rotate(&mut y, &cos[12..15], &sin[12..15], false);
        assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-2));
        rotate(&mut y, &cos[12..15], &sin[12..15], true);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    /// Plain, soft-capped, within a window of 2 keys, and both: the probabilities of each
    /// row (against a plain softmax of what it sees) and their gradient.
    #[test]
    fn causal_softmax_backward_matches_finite_differences() {
        // Positions 2..5 of a 6-token sequence, 2 query heads per position.
        let (rep, len, first, end) = (2, 6, 2, 5);
        let n = rep * (end - first) * len;
        let scores: Vec<f32> = values(n, 10).iter().map(|v| 3.0 * v).collect();
        let dir = values(n, 12);
        // Columns past the block hold no probability: the probe ignores them.
        let probe: Vec<f32> = values(n, 11)
            .iter()
            .enumerate()
            .map(|(i, &v)| if i % len < end { v } else { 0.0 })
            .collect();
        for (cap, window) in [
            (None, None),
            (Some(1.5), None),
            (None, Some(2)),
            (Some(1.5), Some(2)),
        ] {
            let how = Scores {
                scale: 0.7,
                cap,
                window,
            };
            let loss = |s: &[f32]| {
                let mut p = s.to_vec();
                causal_softmax(&mut p, len, rep, first, end, how);
                dot(&p, &probe)
            };
            let mut probs = scores.clone();
            causal_softmax(&mut probs, len, rep, first, end, how);
            for (r, (p, s)) in probs.chunks(len).zip(scores.chunks(len)).enumerate() {
                let visible = first + r / rep + 1;
                let start = window.map_or(0, |w| visible.saturating_sub(w));
                let logits: Vec<f64> = (s[start..visible].iter())
                    .map(|&v| {
                        let v = f64::from(v) * 0.7;
                        cap.map_or(v, |c: f32| f64::from(c) * (v / f64::from(c)).tanh())
                    })
                    .collect();
                let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = logits.iter().map(|l| (l - top).exp()).sum();
                for (j, l) in (start..visible).zip(&logits) {
                    let want = (l - top).exp() / total;
                    assert!((f64::from(p[j]) - want).abs() < 1e-6, "{how:?} row {r}");
                }
                assert!(p[..start].iter().chain(&p[visible..end]).all(|&v| v == 0.0));
                assert_eq!(p[end..], s[end..], "columns past the block are left alone");
            }
            let block =
                |m: &[f32]| -> Vec<f32> { m.chunks(len).flat_map(|r| r[..end].to_vec()).collect() };
            let mut grad = block(&probe);
            causal_softmax_backward(&probs, len, &mut grad, end, how.scale);
            if let Some(cap) = cap {
                soft_cap_backward(&block(&scores), &mut grad, how.scale, cap);
            }
            assert_close(dot(&grad, &block(&dir)), directional(loss, &scores, &dir));
        }
    }
}
