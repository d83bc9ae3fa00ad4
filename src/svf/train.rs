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
//! Memory: frozen weights get no gradients (see `model::frozen`), and the LM head's logits and
//! log-softmax are never built for the whole batch: the loss and its gradient with respect to the
//! final hidden states are computed analytically in row chunks, then pushed through the rest of
//! the graph with one backward pass of `Σ h ⊙ ∂L/∂h`.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::Serialize;

use super::expert::Expert;
use crate::model::error::{ModelError, Result};
use crate::model::transformer::{Batch, LogitsAt, Mode, Transformer};
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

    /// Each target's gradient from a [`GradStore`] returned by [`SvfTrainer::gradients`].
    pub fn gradient_vectors(&self, grads: &GradStore) -> Result<Vec<(String, Tensor)>> {
        self.targets
            .iter()
            .map(|t| {
                let g = grads.get(t.z.as_tensor()).ok_or_else(|| {
                    ModelError::Input(format!("`{}` received no gradient", t.name))
                })?;
                Ok((t.name.clone(), g.clone()))
            })
            .collect()
    }

    /// The loss and the gradient of every z, without changing anything.
    pub fn gradients(&self, batch: &TokenBatch) -> Result<(f64, GradStore, StepReport)> {
        let mut report = StepReport::default();
        let clock = Instant::now();
        let mut model = self.base.clone();
        for t in &self.targets {
            let scaled_s = (&t.s * super::effective_scale(self.parametrization, &t.s, &t.z)?)?;
            model.set_factored(&t.name, t.u.clone(), t.vt.clone(), scaled_s)?;
        }
        report.apply_s = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let (ids, pad, width) = left_pad(&batch.ids, model.device())?;
        let mask = Batch::left_padded(&pad, 0, width, model.device())?;
        let hidden = model.hidden(&ids, &mask, None, Mode::Differentiable, LogitsAt::All)?;
        let (rows, targets, weights) = scored_rows(batch, &pad, width)?;
        let flat = hidden.reshape((batch.ids.len() * width, model.config.hidden_size))?;
        let picked = flat.index_select(&Tensor::new(rows, model.device())?, 0)?;
        report.forward_s = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let (loss, grad_hidden) =
            weighted_nll(&picked.detach(), model.head_weight(), &targets, &weights)?;
        let grads = (picked * grad_hidden)?.sum_all()?.backward()?;
        report.backward_s = clock.elapsed().as_secs_f64();
        report.loss = loss;
        Ok((loss, grads, report))
    }

    /// One optimisation step.
    pub fn step(&mut self, batch: &TokenBatch) -> Result<StepReport> {
        let (_, mut grads, mut report) = self.gradients(batch)?;
        let clock = Instant::now();
        let mut squares = 0f64;
        for t in &self.targets {
            let g = grads
                .get(t.z.as_tensor())
                .ok_or_else(|| ModelError::Input(format!("`{}` received no gradient", t.name)))?;
            squares += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        report.grad_norm = squares.sqrt();
        if self.clip > 0.0 && report.grad_norm > self.clip {
            report.clipped = true;
            let factor = self.clip / report.grad_norm;
            for t in &self.targets {
                let g = (grads.get(t.z.as_tensor()).expect("checked above") * factor)?;
                grads.insert(t.z.as_tensor(), g);
            }
        }
        self.optimizer.step(&grads)?;
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
        let logits = h.narrow(0, start, n)?.matmul(&head.t()?)?;
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
        grads.push(grad_logits.matmul(head)?);
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
        let s: Vec<(String, Tensor)> = factors
            .iter()
            .map(|d| (d.name.clone(), d.factors.s.clone()))
            .collect();
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
            for target in &t.targets {
                let ours = grads.get(target.z.as_tensor()).expect("gradient");
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
        let analytic: Vec<f32> = grads
            .get(target.z.as_tensor())
            .expect("gradient")
            .to_vec1()?;
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
