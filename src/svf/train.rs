//! One SVF optimisation step: minimise a weighted token log-likelihood
//! `−Σ_b Σ_t w[b][t] · log p(ids[b][t] | ids[b][..t])` (REINFORCE puts advantage / batch size on
//! completion tokens) with every target applied as W' = U diag(s ⊙ e(z)) Vᵀ, then clip the
//! gradient norm and take an Adam step on z alone.
//!
//! The model's forward and backward passes run in [`super::backprop`] (hand-written, f32 on the
//! CPU) for a model in f32 on the CPU, and in [`super::autograd_engine`] (candle's autograd on
//! the model's device and dtype) for any other; both give ∂L/∂s' for the scaled singular values
//! s' = s ⊙ e(z), and candle's autograd maps that to ∂L/∂z through the parametrisation
//! ([`super::effective_scale`]), so each parametrisation is written once.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::Parametrization;
use super::adam::{AdamConfig, AdamState};
use super::autograd_engine::AutogradEngine;
use super::backprop::{Engine, Gradients, Sequence};
use super::expert::Expert;
use crate::model::error::{ModelError, Result};
use crate::model::transformer::Transformer;
use crate::svd::cache::Decomposed;

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

/// A trainer's resumable state: every z (by target) and Adam's moments and step count.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct TrainerState {
    pub z: Vec<(String, Vec<f32>)>,
    pub adam: AdamState,
}

struct TrainTarget {
    name: String,
    s: Tensor,
    z: Var,
}

/// Which engine computes ∂L/∂s' (see the module's documentation).
enum Backend {
    Cpu(Engine),
    Autograd(AutogradEngine),
}

impl Backend {
    fn new(base: &Transformer, factors: &[Decomposed]) -> Result<Self> {
        Ok(match (base.device(), base.dtype()) {
            (Device::Cpu, DType::F32) => Self::Cpu(Engine::new(&base.config, base, factors)?),
            _ => Self::Autograd(AutogradEngine::new(base, factors)?),
        })
    }

    /// For records: `backprop (cpu, f32)` or `autograd (cuda, bf16)`.
    fn describe(&self) -> String {
        match self {
            Self::Cpu(_) => "backprop (cpu, f32)".into(),
            Self::Autograd(engine) => format!("autograd ({})", engine.placement()),
        }
    }

    fn gradients(&self, scaled_s: &[Vec<f32>], batch: &[Sequence]) -> Result<Gradients> {
        match self {
            Self::Cpu(engine) => engine.gradients(scaled_s, batch),
            Self::Autograd(engine) => engine.gradients(scaled_s, batch),
        }
    }
}

pub struct SvfTrainer {
    engine: Backend,
    parametrization: Parametrization,
    targets: Vec<TrainTarget>,
    optimizer: AdamState,
    lr: f64,
    clip: f64,
}

impl SvfTrainer {
    /// Trains `expert` (its z are the starting point) on `base`, whose targets are `factors`.
    /// Adam with the paper's betas and no weight decay; `clip` is the gradient-norm limit
    /// (0 disables it).
    pub fn new(
        base: &Transformer,
        factors: &[Decomposed],
        expert: &Expert,
        lr: f64,
        clip: f64,
    ) -> Result<Self> {
        let engine = Backend::new(base, factors)?;
        let targets = factors
            .iter()
            .map(|d| {
                let (z, _) = expert.vectors.get(&d.name).ok_or_else(|| {
                    ModelError::Input(format!("the expert has no vector for `{}`", d.name))
                })?;
                let on_cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
                Ok(TrainTarget {
                    name: d.name.clone(),
                    s: on_cpu(&d.factors.s)?,
                    z: Var::from_tensor(&on_cpu(z)?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lengths: Vec<usize> = targets
            .iter()
            .map(|t| t.z.as_tensor().elem_count())
            .collect();
        Ok(Self {
            engine,
            parametrization: expert.meta.parametrization,
            optimizer: AdamState::new(AdamConfig::default(), &lengths),
            targets,
            lr,
            clip,
        })
    }

    /// The loss and the gradient of every z (in target order), without changing anything.
    pub fn gradients(&self, batch: &TokenBatch) -> Result<(f64, Vec<Tensor>, StepReport)> {
        let mut report = StepReport::default();
        let clock = Instant::now();
        let scaled = self
            .targets
            .iter()
            .map(|t| &t.s * super::effective_scale(self.parametrization, &t.s, &t.z)?)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let values = scaled
            .iter()
            .map(|s| s.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        report.apply_s = clock.elapsed().as_secs_f64();

        if batch.ids.len() != batch.weights.len() {
            return Err(ModelError::Input(format!(
                "{} sequences but {} weight rows",
                batch.ids.len(),
                batch.weights.len()
            )));
        }
        let sequences: Vec<Sequence> = batch
            .ids
            .iter()
            .zip(&batch.weights)
            .map(|(ids, weights)| Sequence { ids, weights })
            .collect();
        let found = self.engine.gradients(&values, &sequences)?;
        report.forward_s = found.forward_s;
        report.backward_s = found.backward_s;
        report.loss = found.loss;

        // ∂L/∂z through the parametrisation: the gradient of Σ_targets ⟨s', ∂L/∂s'⟩.
        let mut surrogate = Tensor::zeros((), DType::F32, &Device::Cpu)?;
        for (s, g) in scaled.iter().zip(found.scaled_s) {
            let g = Tensor::from_vec(g, s.dims(), &Device::Cpu)?;
            surrogate = (surrogate + (s * g)?.sum_all()?)?;
        }
        let grads = surrogate.backward()?;
        let z_grads = self
            .targets
            .iter()
            .map(|t| match grads.get(t.z.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => t.z.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((found.loss, z_grads, report))
    }

    /// Which engine computes the gradients, and where (see [`Backend`]).
    pub fn engine(&self) -> String {
        self.engine.describe()
    }

    /// Each target's z, in target order.
    pub fn z(&self) -> Result<Vec<(String, Vec<f32>)>> {
        self.targets
            .iter()
            .map(|t| Ok((t.name.clone(), t.z.as_tensor().to_vec1::<f32>()?)))
            .collect()
    }

    /// Everything a resumed run needs to continue exactly: each z and the optimiser's state.
    pub fn state(&self) -> Result<TrainerState> {
        Ok(TrainerState {
            z: self.z()?,
            adam: self.optimizer.clone(),
        })
    }

    /// Continues from a saved state, which must be of these targets (same names, same sizes,
    /// both Adam moments of every vector) and hold only finite numbers.
    pub fn restore(&mut self, state: &TrainerState) -> Result<()> {
        let lengths = |t: &TrainTarget| t.z.as_tensor().elem_count();
        let n = self.targets.len();
        let adam = &state.adam;
        let shapes_match = state.z.len() == n
            && adam.m.len() == n
            && adam.v.len() == n
            && self
                .targets
                .iter()
                .zip(&state.z)
                .zip(adam.m.iter().zip(&adam.v))
                .all(|((t, (name, z)), (m, v))| {
                    *name == t.name
                        && z.len() == lengths(t)
                        && m.len() == z.len()
                        && v.len() == z.len()
                });
        if !shapes_match {
            return Err(ModelError::Input(
                "the saved training state is of other targets than this expert's".into(),
            ));
        }
        let finite = |vs: &[Vec<f32>]| vs.iter().flatten().all(|x| x.is_finite());
        let z: Vec<Vec<f32>> = state.z.iter().map(|(_, z)| z.clone()).collect();
        if !(finite(&z) && finite(&adam.m) && finite(&adam.v))
            || adam.v.iter().flatten().any(|&x| x < 0.0)
        {
            return Err(ModelError::Input(
                "the saved training state holds NaN, infinite or negative second-moment values"
                    .into(),
            ));
        }
        for (t, (_, z)) in self.targets.iter().zip(&state.z) {
            t.z.set(&Tensor::from_vec(z.clone(), z.len(), &Device::Cpu)?)?;
        }
        self.optimizer = state.adam.clone();
        Ok(())
    }

    /// The learning rate of the next steps (schedules set it before each step).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
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
        let grads = z_grads
            .iter()
            .map(|g| (g * factor)?.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut params = self
            .targets
            .iter()
            .map(|t| t.z.as_tensor().to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.optimizer.update(self.lr, &mut params, &grads);
        for (t, p) in self.targets.iter().zip(params) {
            let n = p.len();
            t.z.set(&Tensor::from_vec(p, n, &Device::Cpu)?)?;
        }
        report.optimizer_s = clock.elapsed().as_secs_f64();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Architecture;
    use crate::model::transformer::{Batch, LogitsAt, Mode};
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

    /// A trainer on a tiny random model, with what the reference computation needs.
    struct Fixture {
        base: Transformer,
        factors: Vec<Decomposed>,
        trainer: SvfTrainer,
    }

    fn fixture(p: Parametrization, mlp_only: bool) -> Fixture {
        fixture_as(Architecture::Llama, p, mlp_only)
    }

    fn fixture_as(arch: Architecture, p: Parametrization, mlp_only: bool) -> Fixture {
        let (base, mut factors) = crate::svf::tiny_decomposed_as(arch, 21);
        if mlp_only {
            factors.retain(|d| d.name.contains(".mlp."));
        }
        let s = crate::svd::cache::singular_values(&factors);
        let base_model = BaseModel {
            name: "tiny".into(),
            blake3: "0".repeat(64),
        };
        let expert = Expert::initial(base_model, p, &s, 3).unwrap();
        let trainer = SvfTrainer::new(&base, &factors, &expert, 1e-2, 0.0).unwrap();
        Fixture {
            base,
            factors,
            trainer,
        }
    }

    /// Left-pads sequences into one (batch, width) tensor; returns the padding of each.
    fn left_pad(seqs: &[Vec<u32>]) -> Result<(Tensor, Vec<usize>, usize)> {
        let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let pad: Vec<usize> = seqs.iter().map(|s| width - s.len()).collect();
        let flat: Vec<u32> = seqs
            .iter()
            .zip(&pad)
            .flat_map(|(s, &p)| std::iter::repeat_n(0, p).chain(s.iter().copied()))
            .collect();
        let ids = Tensor::from_vec(flat, (seqs.len(), width), &Device::Cpu)?;
        Ok((ids, pad, width))
    }

    /// The same loss through candle's autograd end to end: composed weights W'(z), full
    /// logits of left-padded sequences, log-softmax from primitives, no chunking.
    fn reference_loss(f: &Fixture, batch: &TokenBatch) -> Result<Tensor> {
        let mut model = f.base.clone();
        for (d, target) in f.factors.iter().zip(&f.trainer.targets) {
            let (u, s, vt) = (&d.factors.u, &d.factors.s, &d.factors.vt);
            let w = crate::svf::adapted_weight(f.trainer.parametrization, u, s, vt, &target.z)?;
            model.replace_weight(&target.name, w)?;
        }
        let (ids, pad, width) = left_pad(&batch.ids)?;
        let mask = Batch::left_padded(&pad, 0, width, &Device::Cpu)?;
        let logits = model.forward(&ids, &mask, None, Mode::Differentiable, LogitsAt::All)?;
        let (mut rows, mut targets, mut weights) = (vec![], vec![], vec![]);
        for (b, (ids, w)) in batch.ids.iter().zip(&batch.weights).enumerate() {
            for t in 1..ids.len() {
                rows.push((b * width + pad[b] + t - 1) as u32);
                targets.push(ids[t]);
                weights.push(w[t]);
            }
        }
        let flat = logits.reshape((batch.ids.len() * width, model.config.vocab_size))?;
        let picked = flat.index_select(&Tensor::new(rows, &Device::Cpu)?, 0)?;
        let max = picked.max_keepdim(D::Minus1)?.detach();
        let shifted = picked.broadcast_sub(&max)?;
        let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
        let y = Tensor::new(targets, &Device::Cpu)?.unsqueeze(1)?;
        let w = Tensor::new(weights, &Device::Cpu)?.unsqueeze(1)?;
        Ok((log_probs.gather(&y, 1)? * w)?.sum_all()?.neg()?)
    }

    /// On every projection of a Llama, a Qwen3 (whose head norms and wider heads the engine's
    /// backward pass must follow) and a SmolLM3 model (a layer without rotation).
    #[test]
    fn chunked_head_gives_autograds_loss_and_gradients() -> TestResult {
        let batch = batch(64);
        let cases = [Parametrization::Sigmoid, Parametrization::Linear]
            .map(|p| (Architecture::Llama, p))
            .into_iter()
            .chain(
                [Architecture::Qwen3, Architecture::SmolLm3].map(|a| (a, Parametrization::Sigmoid)),
            );
        for (arch, p) in cases {
            let f = fixture_as(arch, p, false);
            let t = &f.trainer;
            let (loss, grads, _) = t.gradients(&batch)?;
            let reference = reference_loss(&f, &batch)?;
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
                    "{arch:?} {p:?} {}: {diff} vs {scale}",
                    target.name
                );
            }
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences_through_the_whole_model() -> TestResult {
        let batch = batch(64);
        let t = fixture(Parametrization::Sigmoid, true).trainer;
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
        let mut t = fixture(Parametrization::Sigmoid, true).trainer;
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

        let mut clipped = fixture(Parametrization::Sigmoid, true).trainer;
        clipped.clip = 1e-6;
        let report = clipped.step(&batch)?;
        assert!(report.clipped && report.grad_norm > 1e-6);
        Ok(())
    }

    /// Stopping after two steps, saving the state (through JSON, as a checkpoint would) and
    /// continuing in a new trainer ends bitwise where four uninterrupted steps end.
    #[test]
    fn a_restored_trainer_continues_exactly() -> TestResult {
        let batch = batch(64);
        let mut straight = fixture(Parametrization::Sigmoid, true).trainer;
        for _ in 0..4 {
            straight.step(&batch)?;
        }
        let mut first = fixture(Parametrization::Sigmoid, true).trainer;
        first.step(&batch)?;
        first.step(&batch)?;
        let saved: TrainerState = serde_json::from_str(&serde_json::to_string(&first.state()?)?)?;
        let mut resumed = fixture(Parametrization::Sigmoid, true).trainer;
        resumed.restore(&saved)?;
        resumed.step(&batch)?;
        resumed.step(&batch)?;
        assert_eq!(resumed.state()?, straight.state()?);
        let other = fixture(Parametrization::Sigmoid, false).trainer.state()?;
        assert!(resumed.restore(&other).is_err());
        // A checkpoint damaged in any field is refused, never half-applied.
        let damaged: [fn(&mut TrainerState); 4] = [
            |s| s.adam.v[0].pop().map(drop).unwrap_or_default(),
            |s| s.adam.v.truncate(0),
            |s| s.adam.m[0][0] = f32::NAN,
            |s| s.adam.v[0][0] = -1.0,
        ];
        for damage in damaged {
            let mut state = saved.clone();
            damage(&mut state);
            assert!(resumed.restore(&state).is_err());
        }
        Ok(())
    }

    #[test]
    fn malformed_batches_are_refused_with_the_sequence_named() {
        let f = fixture(Parametrization::Linear, true);
        let (t, vocab) = (&f.trainer, f.base.config.vocab_size as u32);
        let cases = [
            (
                vec![vec![1, 2, 3]],
                vec![vec![0.0, 1.0]],
                "sequence 0: needs one weight per token",
            ),
            (vec![vec![1, 2]], vec![vec![1.0, 1.0]], "none on the first"),
            (
                vec![vec![1, 2], vec![1, vocab]],
                vec![vec![0.0, 1.0]; 2],
                "sequence 1: token",
            ),
            (vec![vec![1, 2]], vec![], "1 sequences but 0 weight rows"),
        ];
        for (ids, weights, expected) in cases {
            let err = t
                .gradients(&TokenBatch { ids, weights })
                .expect_err("an error");
            assert!(err.to_string().contains(expected), "{err}");
        }
    }
}
