//! One SVF optimisation step: run the model's differentiable forward with every target applied in
//! factored form, y = U (s ⊙ e(z) ⊙ (Vᵀ x)), and minimise a weighted token log-likelihood
//! `−Σ_b Σ_t w[b][t] · log p(ids[b][t] | ids[b][..t])` (REINFORCE puts advantage / batch size on
//! completion tokens), then clip the gradient norm and take an Adam step on z alone.
//!
//! Why factored rather than composing W'(z) = U diag(s ⊙ e) Vᵀ: composing costs a matmul per
//! target and its backward two more (gradients for U and Vᵀ that nobody needs) on top of the
//! weight gradient ∂L/∂W'; the factored form needs only input gradients through the frozen U and
//! Vᵀ, and ∂L/∂e falls out of one elementwise product. (The tests check the result against
//! end-to-end autograd through composed weights.)
//!
//! Memory: frozen weights get no gradients (see `model::frozen`); the LM head's logits and
//! log-softmax are never built for the whole batch (the loss and its gradient with respect to the
//! final hidden states are computed analytically in row chunks); and blocks are checkpointed
//! (see [`SvfTrainer::gradients`]). Gradients move from one piece to the next by seeding each
//! piece's backward pass with ∂L/∂y (`autograd::backward_from`).

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::Serialize;

use super::expert::Expert;
use crate::model::autograd;
use crate::model::error::{ModelError, Result};
use crate::model::transformer::{Batch, Mode, Transformer};
use crate::pipeline::spec::Parametrization;
use crate::svd::cache::Decomposed;

/// Rows of the LM head computed at once: 256 × 49k vocabulary × 4 bytes ≈ 50 MB per buffer.
const HEAD_CHUNK_ROWS: usize = 256;

/// Sequences (unpadded) and per-token loss weights of one step. `weights[b][t]` weighs the
/// log-probability of `ids[b][t]` given the tokens before it, so `weights[b][0]` must be 0.
pub struct TokenBatch {
    pub ids: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f32>>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StepReport {
    pub loss: f64,
    /// Gradient norm over all z before clipping.
    pub grad_norm: f64,
    pub clipped: bool,
    pub apply_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

struct TrainTarget {
    name: String,
    u: Tensor,
    s: Tensor,
    vt: Tensor,
    z: Var,
}

pub struct SvfTrainer {
    base: Transformer,
    parametrization: Parametrization,
    targets: Vec<TrainTarget>,
    optimizer: AdamW,
    clip: f64,
}

impl SvfTrainer {
    /// Trains `expert` (its z are the starting point) on `base`, whose targets are `factors`.
    /// Adam with the paper's betas and no weight decay; `clip` is the gradient-norm limit
    /// (0 disables it).
    pub fn new(
        base: Transformer,
        factors: &[Decomposed],
        expert: &Expert,
        lr: f64,
        clip: f64,
    ) -> Result<Self> {
        if base.dtype() != DType::F32 {
            return Err(ModelError::Input(
                "SVF training needs the model in f32".into(),
            ));
        }
        let device = base.device().clone();
        let targets = factors
            .iter()
            .map(|d| {
                let (z, _) = expert.vectors.get(&d.name).ok_or_else(|| {
                    ModelError::Input(format!("the expert has no vector for `{}`", d.name))
                })?;
                let to = |t: &Tensor| t.to_device(&device);
                Ok(TrainTarget {
                    name: d.name.clone(),
                    u: to(&d.factors.u)?,
                    s: to(&d.factors.s)?,
                    vt: to(&d.factors.vt)?,
                    z: Var::from_tensor(&to(z)?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let params = ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        };
        let optimizer = AdamW::new(targets.iter().map(|t| t.z.clone()).collect(), params)?;
        Ok(Self {
            base,
            parametrization: expert.meta.parametrization,
            targets,
            optimizer,
            clip,
        })
    }

    /// The loss and the gradient of every z (in target order), without changing anything.
    ///
    /// Activation checkpointing per block: a first pass without a graph (fast kernels) keeps
    /// only each block's input; the head's gradient is computed in chunks; then each block, last
    /// to first, is recomputed with a graph and back-propagated on its own. Memory holds one
    /// block's graph instead of all of them (for 8 × 256 tokens on SmolLM2, ~0.2 GB instead of
    /// ~6 GB) for the price of a second forward pass.
    pub fn gradients(&self, batch: &TokenBatch) -> Result<(f64, Vec<Tensor>, StepReport)> {
        let mut report = StepReport::default();
        let clock = Instant::now();
        let (mut tracked, mut constant) = (self.base.clone(), self.base.clone());
        for t in &self.targets {
            let scaled_s = (&t.s * super::effective_scale(self.parametrization, &t.s, &t.z)?)?;
            constant.set_factored(&t.name, t.u.clone(), t.vt.clone(), scaled_s.detach())?;
            tracked.set_factored(&t.name, t.u.clone(), t.vt.clone(), scaled_s)?;
        }
        report.apply_s = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let (ids, pad, width) = left_pad(&batch.ids, self.base.device())?;
        let positions = constant.positions(
            &Batch::left_padded(&pad, 0, width, self.base.device())?,
            batch.ids.len(),
            width,
        )?;
        let mut inputs = Vec::with_capacity(constant.num_layers());
        let mut x = constant.embed(&ids)?;
        for index in 0..constant.num_layers() {
            let next = constant.block(index, &x, &positions, &mut None, Mode::Fast)?;
            inputs.push(x);
            x = next;
        }
        report.forward_s = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let (rows, targets, weights) = scored_rows(batch, &pad, width)?;
        let last = Var::from_tensor(&x)?;
        let hidden = tracked.final_norm(last.as_tensor(), Mode::Differentiable)?;
        let flat = hidden.reshape((batch.ids.len() * width, self.base.config.hidden_size))?;
        let picked = flat.index_select(&Tensor::new(rows, self.base.device())?, 0)?;
        let (loss, grad_picked) = weighted_nll(
            &picked.detach(),
            self.base.head_weight(),
            &targets,
            &weights,
        )?;
        let grads = autograd::backward_from(&picked, &grad_picked)?;
        let mut grad_out = grads.get(last.as_tensor()).cloned();
        let mut z_grads: Vec<Option<Tensor>> = vec![None; self.targets.len()];
        for (index, input) in inputs.into_iter().enumerate().rev() {
            let Some(grad) = grad_out.take() else { break };
            // The first block's input (embeddings) needs no gradient.
            let input = if index == 0 {
                input
            } else {
                Var::from_tensor(&input)?.as_tensor().clone()
            };
            let out = tracked.block(index, &input, &positions, &mut None, Mode::Differentiable)?;
            let grads = autograd::backward_from(&out, &grad)?;
            for (t, acc) in self.targets.iter().zip(z_grads.iter_mut()) {
                if let Some(g) = grads.get(t.z.as_tensor()) {
                    *acc = Some(match acc.take() {
                        Some(previous) => (previous + g)?,
                        None => g.clone(),
                    });
                }
            }
            grad_out = grads.get(&input).cloned();
        }
        report.backward_s = clock.elapsed().as_secs_f64();
        report.loss = loss;
        let z_grads = z_grads
            .into_iter()
            .zip(&self.targets)
            .map(|(g, t)| g.map_or_else(|| t.z.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((loss, z_grads, report))
    }

    pub fn target_names(&self) -> impl Iterator<Item = &str> {
        self.targets.iter().map(|t| t.name.as_str())
    }

    /// One optimisation step.
    pub fn step(&mut self, batch: &TokenBatch) -> Result<StepReport> {
        let (_, z_grads, mut report) = self.gradients(batch)?;
        let clock = Instant::now();
        let mut squares = 0f64;
        for g in &z_grads {
            squares += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        report.grad_norm = squares.sqrt();
        let factor = if self.clip > 0.0 && report.grad_norm > self.clip {
            report.clipped = true;
            self.clip / report.grad_norm
        } else {
            1.0
        };
        let mut store = GradStore::default();
        for (t, g) in self.targets.iter().zip(z_grads) {
            store.insert(t.z.as_tensor(), (g * factor)?);
        }
        self.optimizer.step(&store)?;
        report.optimizer_s = clock.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// Left-pads sequences into one (batch, width) tensor; returns the padding of each.
fn left_pad(seqs: &[Vec<u32>], device: &Device) -> Result<(Tensor, Vec<usize>, usize)> {
    let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let pad: Vec<usize> = seqs.iter().map(|s| width - s.len()).collect();
    let flat: Vec<u32> = seqs
        .iter()
        .zip(&pad)
        .flat_map(|(s, &p)| std::iter::repeat_n(0, p).chain(s.iter().copied()))
        .collect();
    Ok((
        Tensor::from_vec(flat, (seqs.len(), width), device)?,
        pad,
        width,
    ))
}

/// For every weighted token: the flat row of the position that predicts it, the token, the weight.
fn scored_rows(
    batch: &TokenBatch,
    pad: &[usize],
    width: usize,
) -> Result<(Vec<u32>, Vec<u32>, Vec<f32>)> {
    let (mut rows, mut targets, mut weights) = (vec![], vec![], vec![]);
    for (b, (ids, w)) in batch.ids.iter().zip(&batch.weights).enumerate() {
        if ids.len() != w.len() || w.first().is_some_and(|&x| x != 0.0) {
            return Err(ModelError::Input(format!(
                "sequence {b}: needs one weight per token and none on the first"
            )));
        }
        for t in 1..ids.len() {
            if w[t] != 0.0 {
                rows.push((b * width + pad[b] + t - 1) as u32);
                targets.push(ids[t]);
                weights.push(w[t]);
            }
        }
    }
    Ok((rows, targets, weights))
}

/// `−Σ_i w_i log softmax(h_i headᵀ)[y_i]` and its gradient with respect to h, in row chunks.
/// d/dlogits = w (softmax − onehot(y)); d/dh = that · head.
fn weighted_nll(
    h: &Tensor,
    head: &Tensor,
    targets: &[u32],
    weights: &[f32],
) -> Result<(f64, Tensor)> {
    let device = h.device();
    let mut loss = 0f64;
    let mut grads = Vec::new();
    for start in (0..targets.len()).step_by(HEAD_CHUNK_ROWS) {
        let n = HEAD_CHUNK_ROWS.min(targets.len() - start);
        let y = Tensor::new(&targets[start..start + n], device)?.unsqueeze(1)?;
        let w = Tensor::new(&weights[start..start + n], device)?.unsqueeze(1)?;
        let logits = autograd::plain_matmul_t(&h.narrow(0, start, n)?, head)?;
        let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?)?;
        let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(1)?.log()?)?;
        let picked = log_probs.gather(&y, 1)?;
        loss -= (&picked * &w)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let grad_logits = log_probs
            .exp()?
            .broadcast_mul(&w)?
            .scatter_add(&y, &w.neg()?, 1)?;
        grads.push(autograd::matmul(&grad_logits, head)?);
    }
    let grad = if grads.is_empty() {
        h.zeros_like()?
    } else {
        Tensor::cat(&grads, 0)?
    };
    Ok((loss, grad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::transformer::LogitsAt;
    use crate::svf::expert::BaseModel;
    use candle_core::D;
    use rand::{Rng, SeedableRng};

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// Three sequences of different lengths (more weighted rows than one head chunk), with
    /// advantage-like weights of both signs on the "completion" half.
    fn batch(vocab: u32) -> TokenBatch {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let lengths = [120usize, 97, 110];
        let advantages = [0.5f32, -0.25, 1.0];
        let ids = lengths
            .iter()
            .map(|&n| (0..n).map(|_| rng.random_range(0..vocab)).collect())
            .collect();
        let weights = lengths
            .iter()
            .zip(advantages)
            .map(|(&n, a)| (0..n).map(|t| if t >= n / 2 { a } else { 0.0 }).collect())
            .collect();
        TokenBatch { ids, weights }
    }

    fn trainer(p: Parametrization, mlp_only: bool) -> SvfTrainer {
        let (base, mut factors) = crate::svf::tiny_decomposed(21);
        if mlp_only {
            factors.retain(|d| d.name.contains(".mlp."));
        }
        let s = crate::svd::cache::singular_values(&factors);
        let base_model = BaseModel {
            name: "tiny".into(),
            blake3: "0".into(),
        };
        let expert = Expert::initial(base_model, p, &s, 3).unwrap();
        SvfTrainer::new(base, &factors, &expert, 1e-2, 0.0).unwrap()
    }

    /// The same loss through candle's autograd end to end: full logits, log-softmax from
    /// primitives, no chunking.
    fn reference_loss(t: &SvfTrainer, batch: &TokenBatch) -> Result<Tensor> {
        let mut model = t.base.clone();
        for target in &t.targets {
            let w = crate::svf::adapted_weight(
                t.parametrization,
                &target.u,
                &target.s,
                &target.vt,
                &target.z,
            )?;
            model.replace_weight(&target.name, w)?;
        }
        let (ids, pad, width) = left_pad(&batch.ids, &Device::Cpu)?;
        let mask = Batch::left_padded(&pad, 0, width, &Device::Cpu)?;
        let logits = model.forward(&ids, &mask, None, Mode::Differentiable, LogitsAt::All)?;
        let (rows, targets, weights) = scored_rows(batch, &pad, width)?;
        let flat = logits.reshape((batch.ids.len() * width, model.config.vocab_size))?;
        let picked = flat.index_select(&Tensor::new(rows, &Device::Cpu)?, 0)?;
        let max = picked.max_keepdim(D::Minus1)?.detach();
        let shifted = picked.broadcast_sub(&max)?;
        let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
        let y = Tensor::new(targets, &Device::Cpu)?.unsqueeze(1)?;
        let w = Tensor::new(weights, &Device::Cpu)?.unsqueeze(1)?;
        Ok((log_probs.gather(&y, 1)? * w)?.sum_all()?.neg()?)
    }

    #[test]
    fn chunked_head_gives_autograds_loss_and_gradients() -> TestResult {
        let batch = batch(64);
        for p in [Parametrization::Sigmoid, Parametrization::Linear] {
            let t = trainer(p, false);
            let (loss, grads, _) = t.gradients(&batch)?;
            let reference = reference_loss(&t, &batch)?;
            let expected = reference.to_scalar::<f32>()? as f64;
            assert!(
                (loss - expected).abs() < 1e-3 * expected.abs().max(1.0),
                "{p:?}: {loss} vs {expected}"
            );
            let expected_grads = reference.backward()?;
            for (target, ours) in t.targets.iter().zip(&grads) {
                let theirs = expected_grads.get(target.z.as_tensor()).expect("gradient");
                let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?;
                let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    scale > 0.0 && diff < 1e-3 * scale,
                    "{p:?} {}: {diff} vs {scale}",
                    target.name
                );
            }
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences_through_the_whole_model() -> TestResult {
        let batch = batch(64);
        let t = trainer(Parametrization::Sigmoid, true);
        let (_, grads, _) = t.gradients(&batch)?;
        let target = &t.targets[1];
        let analytic: Vec<f32> = grads[1].to_vec1()?;
        let original = target.z.as_tensor().copy()?;
        for i in [0usize, 5] {
            let eps = 1e-2f32;
            let at = |d: f32| -> Result<f64> {
                let mut v: Vec<f32> = original.to_vec1()?;
                v[i] += d;
                target.z.set(&Tensor::new(v, &Device::Cpu)?)?;
                Ok(t.gradients(&batch)?.0)
            };
            let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps as f64);
            target.z.set(&original)?;
            let rel = (numeric - analytic[i] as f64).abs() / numeric.abs().max(1e-4);
            assert!(
                rel < 5e-2,
                "z[{i}]: analytic {} numeric {numeric}",
                analytic[i]
            );
        }
        Ok(())
    }

    #[test]
    fn steps_lower_the_loss_and_clipping_engages_above_the_limit() -> TestResult {
        let batch = batch(64);
        let mut t = trainer(Parametrization::Sigmoid, true);
        let first = t.step(&batch)?;
        let mut last = first.clone();
        for _ in 0..5 {
            last = t.step(&batch)?;
        }
        assert!(
            last.loss < first.loss - 1e-3,
            "{} -> {}",
            first.loss,
            last.loss
        );
        assert!(first.grad_norm.is_finite() && first.grad_norm > 0.0);

        let mut clipped = trainer(Parametrization::Sigmoid, true);
        clipped.clip = 1e-6;
        let report = clipped.step(&batch)?;
        assert!(report.clipped && report.grad_norm > 1e-6);
        Ok(())
    }
}
