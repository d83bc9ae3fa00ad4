//! The SVF training engine for models off the CPU (CUDA) or in reduced precision: the
//! transformer's differentiable forward pass on the model's own device and dtype, with every SVF
//! target factored as y = U (s' ⊙ (Vᵀ x)) and s' a leaf of candle's autograd.
//!
//! The frozen products attach their result with a backward that computes the input's gradient
//! only ([`crate::model::autograd`]), so no weight-sized gradient is ever made; ∂L/∂s' comes out
//! of the graph. The CPU engine ([`super::backprop`]) is the fast path on the CPU in f32; a test
//! holds the two equal.
//!
//! Not here yet (the CPU engine has them): packing sequences without padding and computing
//! shared prefixes once; activation recomputation. Memory is bounded by running a step as
//! passes of at most [`PASS_BYTES`] of estimated activations, whose gradients add up.

use std::time::Instant;

use candle_core::{D, DType, IndexOp, Tensor, Var};

use super::backprop::{Gradients, Sequence, check_step};
use crate::model::error::Result;
use crate::model::transformer::{Batch, LogitsAt, Mode, Transformer};
use crate::svd::cache::Decomposed;

/// Activations one pass may keep (estimated by [`bytes_per_token`]): a quarter of an 80 GB GPU,
/// so an 8B model's weights (16 GB in bf16), factors and a pass fit on one H100.
const PASS_BYTES: usize = 20 << 30;

struct Target {
    name: String,
    u: Tensor,
    vt: Tensor,
}

pub struct AutogradEngine {
    base: Transformer,
    targets: Vec<Target>,
    ranks: Vec<usize>,
}

impl AutogradEngine {
    /// `base` (on its device, in its dtype) with `factors` as the SVF targets, in that order.
    pub fn new(base: &Transformer, factors: &[Decomposed]) -> Result<Self> {
        let (device, dtype) = (base.device(), base.dtype());
        let targets = factors
            .iter()
            .map(|d| {
                let on_device = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
                Ok(Target {
                    name: d.name.clone(),
                    u: on_device(&d.factors.u)?,
                    vt: on_device(&d.factors.vt)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ranks = targets
            .iter()
            .map(|t| t.vt.dim(0))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            base: base.clone(),
            targets,
            ranks,
        })
    }

    /// Device and dtype, e.g. `cuda, bf16`.
    pub fn placement(&self) -> String {
        let device = match self.base.device() {
            candle_core::Device::Cpu => "cpu",
            candle_core::Device::Cuda(_) => "cuda",
            candle_core::Device::Metal(_) => "metal",
        };
        format!("{device}, {}", self.base.dtype().as_str())
    }

    /// The loss −Σ w · log p and ∂loss/∂s' per target for scaled singular values `scaled_s`.
    pub fn gradients(&self, scaled_s: &[Vec<f32>], batch: &[Sequence]) -> Result<Gradients> {
        let config = &self.base.config;
        check_step(config, &self.ranks, scaled_s, batch)?;
        let device = self.base.device();
        let mut out = Gradients {
            loss: 0.0,
            scaled_s: self.ranks.iter().map(|&r| vec![0f32; r]).collect(),
            forward_s: 0.0,
            backward_s: 0.0,
        };
        for pass in passes(batch, |width| bytes_per_token(&self.base, width)) {
            let vars = scaled_s
                .iter()
                .map(|s| Var::from_vec(s.clone(), s.len(), device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let clock = Instant::now();
            let loss = self.pass_loss(&vars, pass)?;
            out.loss += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            out.forward_s += clock.elapsed().as_secs_f64();
            let clock = Instant::now();
            let grads = loss.backward()?;
            for (sum, var) in out.scaled_s.iter_mut().zip(&vars) {
                // A target no weighted token depends on gets no gradient.
                if let Some(g) = grads.get(var.as_tensor()) {
                    let g = g.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    sum.iter_mut().zip(g).for_each(|(a, b)| *a += b);
                }
            }
            out.backward_s += clock.elapsed().as_secs_f64();
        }
        Ok(out)
    }

    /// −Σ w · log p over one pass's sequences, left-padded into one batch, as a scalar f32 node
    /// of the graph whose leaves are `vars`.
    fn pass_loss(&self, vars: &[Var], seqs: &[Sequence]) -> Result<Tensor> {
        let device = self.base.device();
        let mut model = self.base.clone();
        for (target, var) in self.targets.iter().zip(vars) {
            model.set_factored(
                &target.name,
                target.u.clone(),
                target.vt.clone(),
                var.as_tensor().clone(),
            )?;
        }
        let width = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let pad: Vec<usize> = seqs.iter().map(|s| width - s.ids.len()).collect();
        let ids: Vec<u32> = seqs
            .iter()
            .zip(&pad)
            .flat_map(|(s, &p)| std::iter::repeat_n(0, p).chain(s.ids.iter().copied()))
            .collect();
        let ids = Tensor::from_vec(ids, (seqs.len(), width), device)?;
        let batch = Batch::left_padded(&pad, 0, width, device)?;
        let hidden = model.hidden(&ids, &batch, None, Mode::Differentiable, LogitsAt::All)?;
        // Only the weighted positions reach the LM head: row t predicts token t + 1.
        let (mut rows, mut tokens, mut weights) = (vec![], vec![], vec![]);
        for (b, seq) in seqs.iter().enumerate() {
            for (t, (&token, &weight)) in seq.ids.iter().zip(seq.weights).enumerate().skip(1) {
                if weight != 0.0 {
                    rows.push((b * width + pad[b] + t - 1) as u32);
                    tokens.push(token);
                    weights.push(weight);
                }
            }
        }
        if rows.is_empty() {
            return Ok(Tensor::zeros((), DType::F32, device)?);
        }
        let hidden = hidden.reshape((seqs.len() * width, self.base.config.hidden_size))?;
        let picked = hidden.index_select(&Tensor::new(rows, device)?, 0)?;
        let logits = model.head_logits(&picked, Mode::Differentiable)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let tokens = Tensor::new(tokens, device)?.unsqueeze(1)?;
        let log_p = shifted.gather(&tokens, 1)?.sub(&log_z)?.i((.., 0))?;
        let weights = Tensor::new(weights, device)?;
        Ok((log_p * weights)?.sum_all()?.neg()?)
    }
}

/// What candle's graph keeps per padded token of a pass `width` tokens wide, roughly: every
/// intermediate of each block (~32 hidden-sized and ~8 intermediate-sized vectors in the
/// model's dtype, counted from the differentiable forward) and the attention scores, mask and
/// probabilities in f32.
fn bytes_per_token(model: &Transformer, width: usize) -> usize {
    let c = &model.config;
    let element = model.dtype().size_in_bytes();
    let block = (32 * c.hidden_size + 8 * c.intermediate_size) * element + 12 * c.num_heads * width;
    c.num_layers * block
}

/// Consecutive runs of sequences whose padded tokens' activations (`per_token(width)` bytes
/// each) stay within [`PASS_BYTES`]; a sequence too long for that gets a pass of its own.
fn passes<'b, 'a>(
    batch: &'b [Sequence<'a>],
    per_token: impl Fn(usize) -> usize,
) -> Vec<&'b [Sequence<'a>]> {
    let mut out = vec![];
    let (mut start, mut longest) = (0, 0);
    for (i, seq) in batch.iter().enumerate() {
        let wider = longest.max(seq.ids.len());
        if i > start && wider * (i + 1 - start) * per_token(wider) > PASS_BYTES {
            out.push(&batch[start..i]);
            (start, longest) = (i, seq.ids.len());
        } else {
            longest = wider;
        }
    }
    if start < batch.len() {
        out.push(&batch[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svf::backprop::Engine;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn sequences() -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
        let lengths = [40usize, 29, 35, 12];
        let ids: Vec<Vec<u32>> = lengths
            .iter()
            .enumerate()
            .map(|(b, &n)| (0..n).map(|t| ((t * 7 + b * 13) % 60) as u32).collect())
            .collect();
        let weights = lengths
            .iter()
            .zip([0.5f32, -0.25, 1.0, 0.75])
            .map(|(&n, a)| (0..n).map(|t| if t >= n / 2 { a } else { 0.0 }).collect())
            .collect();
        (ids, weights)
    }

    /// `ids` with their token weights, as a step takes them.
    fn as_batch<'a>(ids: &'a [Vec<u32>], weights: &'a [Vec<f32>]) -> Vec<Sequence<'a>> {
        ids.iter()
            .zip(weights)
            .map(|(ids, weights)| Sequence { ids, weights })
            .collect()
    }

    /// On the CPU in f32 the autograd engine gives the hand-written engine's loss and ∂L/∂s';
    /// in bf16 it stays within bf16's precision of them. For Llama, Qwen3 (head norms),
    /// SmolLM3 (an unrotated layer), Mistral with a window of 9 (sequences past it), Gemma 2
    /// and 3 (norms after attention and MLP, GELU, soft caps, a local rotation base, a window;
    /// Gemma 3 with one key/value head, as its 270M and 1B have), Phi-3 with LongRoPE on half
    /// of each head (Phi-4-mini's kind): the engine that trains on GPUs and in bf16.
    #[test]
    fn matches_the_cpu_engine_in_f32_and_bf16() -> TestResult {
        use crate::model::config::Architecture::*;
        use crate::model::config::{LongRope, ModelConfig, RopeScaling};
        type Change = fn(&mut ModelConfig);
        let plain: Change = |_| {};
        let window: Change = |c| c.sliding_window = Some(9);
        let longrope_on_half: Change = |c| {
            c.partial_rotary_dim = Some(c.head_dim / 2);
            let quarter = c.head_dim / 4;
            c.rope_scaling = Some(RopeScaling::LongRope(LongRope {
                short: (0..quarter).map(|i| 1.0 + i as f32).collect(),
                long: vec![8.0; quarter],
                original_context: 64,
                attention_factor: 1.2,
            }));
        };
        for (arch, change, kv_heads) in [
            (Llama, plain, None),
            (Qwen3, plain, None),
            (SmolLm3, plain, None),
            (Mistral, window, None),
            (Gemma2, window, None),
            (Gemma3, window, Some(1)),
            (Phi3, longrope_on_half, None),
        ] {
            matches_the_cpu_engine(arch, change, kv_heads)?;
        }
        Ok(())
    }

    fn matches_the_cpu_engine(
        arch: crate::model::config::Architecture,
        change: fn(&mut crate::model::config::ModelConfig),
        kv_heads: Option<usize>,
    ) -> TestResult {
        let (base, factors) = crate::svf::tiny_decomposed_as(arch, 21);
        let mut config = base.config.clone();
        change(&mut config);
        let mut tensors = base.tensors()?;
        if let Some(kv_heads) = kv_heads {
            // Keys and values of the first `kv_heads` heads only.
            let width = kv_heads * config.head_dim;
            for layer in 0..config.num_layers {
                for m in ["k_proj", "v_proj"] {
                    let name = format!("layers.{layer}.attn.{m}.weight");
                    let narrowed = tensors[&name].narrow(0, 0, width)?;
                    tensors.insert(name, narrowed);
                }
            }
            config.num_kv_heads = kv_heads;
        }
        let base = Transformer::new(config, tensors)?;
        // (k and v narrowed: their factors no longer fit.)
        let factors: Vec<_> = (factors.into_iter())
            .filter(|d| kv_heads.is_none() || !d.name.contains(".attn."))
            .collect();
        let (ids, weights) = sequences();
        let batch = as_batch(&ids, &weights);
        let scaled: Vec<Vec<f32>> = factors
            .iter()
            .map(|d| {
                let s = d.factors.s.to_vec1::<f32>()?;
                Ok(s.iter()
                    .enumerate()
                    .map(|(i, v)| v * (0.8 + 0.05 * (i % 7) as f32))
                    .collect())
            })
            .collect::<candle_core::Result<_>>()?;
        let cpu = Engine::new(&base.config, &base, &factors)?.gradients(&scaled, &batch)?;
        for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
            let tensors = base
                .tensors()?
                .into_iter()
                .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)));
            let model = Transformer::new(
                base.config.clone(),
                tensors.collect::<candle_core::Result<_>>()?,
            )?;
            let ours = AutogradEngine::new(&model, &factors)?.gradients(&scaled, &batch)?;
            let loss_error = (ours.loss - cpu.loss).abs() / cpu.loss.abs();
            assert!(
                loss_error < tolerance,
                "{arch:?} {dtype:?}: loss {} vs {}",
                ours.loss,
                cpu.loss
            );
            for (d, (a, b)) in factors.iter().zip(ours.scaled_s.iter().zip(&cpu.scaled_s)) {
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    scale > 0.0 && (diff / scale) < 10.0 * tolerance as f32,
                    "{arch:?} {dtype:?} {}: {diff} vs {scale}",
                    d.name
                );
            }
        }
        Ok(())
    }

    /// Gemma's layers (norms after attention and MLP, GELU, soft caps, a local rotation base):
    /// the autograd engine's ∂L/∂s' against central differences of its loss, a check of both
    /// engines independent of their agreement.
    #[test]
    fn gemma_gradients_match_finite_differences() -> TestResult {
        use crate::model::config::Architecture;
        for arch in [Architecture::Gemma2, Architecture::Gemma3] {
            let (base, factors) = crate::svf::tiny_decomposed_as(arch, 5);
            let (ids, weights) = sequences();
            let batch = as_batch(&ids, &weights);
            let scaled: Vec<Vec<f32>> = factors
                .iter()
                .map(|d| d.factors.s.to_vec1::<f32>())
                .collect::<candle_core::Result<_>>()?;
            let engine = AutogradEngine::new(&base, &factors)?;
            let gradients = engine.gradients(&scaled, &batch)?;
            let loss_at = |target: usize, i: usize, delta: f32| -> Result<f64> {
                let mut moved = scaled.clone();
                moved[target][i] += delta;
                Ok(engine.gradients(&moved, &batch)?.loss)
            };
            let last = factors.len() - 1;
            for (target, i) in [(0, 0), (3, 2), (last, 1), (last - 4, 0)] {
                let h = 1e-2 * scaled[target][i].abs();
                let numeric = (loss_at(target, i, h)? - loss_at(target, i, -h)?) / (2.0 * h as f64);
                let analytic = f64::from(gradients.scaled_s[target][i]);
                let size = numeric.abs().max(analytic.abs());
                assert!(
                    size > 1e-3 && (numeric - analytic).abs() < 2e-2 * size,
                    "{arch:?} {} [{i}]: {analytic} vs {numeric}",
                    factors[target].name
                );
            }
        }
        Ok(())
    }

    #[test]
    fn passes_keep_within_their_memory() {
        let ids: Vec<Vec<u32>> = [1000, 1000, 1000, 1000, 1000, 5000, 10]
            .iter()
            .map(|&n| vec![0; n])
            .collect();
        let weights: Vec<Vec<f32>> = ids.iter().map(|s| vec![0.0; s.len()]).collect();
        let batch = as_batch(&ids, &weights);
        // 4096 padded tokens a pass.
        let sizes: Vec<usize> = passes(&batch, |_| PASS_BYTES / 4096)
            .iter()
            .map(|p| p.len())
            .collect();
        assert_eq!(sizes, [4, 1, 1, 1]);
    }
}
