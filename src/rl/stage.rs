//! The `train.<expert>` stage: learns an SVF expert on the dataset's train split, validates on
//! its val split, and writes the expert. Test-split items are never read.
//!
//! Each step: compose the current expert into a copy of the model, make the step's batch
//! ([`super::rollout`]), take one trainer step, log the step to `metrics.jsonl`. Every
//! `checkpoint_every` steps the whole state (z, Adam moments, step, best vector so far,
//! validations, the metrics lines) goes to `state.json` in the stage's checkpoint directory,
//! written atomically; a rerun continues from it. Each step's prompts and sampling seed are
//! functions of (seed, step), so a resumed run makes the same batches as an uninterrupted one.
//!
//! Outputs: `expert.safetensors` (the best validated vector, or the last with `keep: last`),
//! `last.safetensors`, `training.json` (validations, the kept step, timings).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::rollout::{Rollouts, StepBatch};
use crate::data::stored::StoredRecord;
use crate::eval::runner::Task;
use crate::eval::stage::{EvalStage, run_batches};
use crate::exec::{StageContext, StageError, StageRunner, failed_to};
use crate::model::Model;
use crate::pipeline::ResolvedEval;
use crate::pipeline::spec::{EvaluateSpec, ExpertSpec, SplitName};
use crate::reward::spec::{RewardSpec, RewardValues};
use crate::reward::{Reward, Verdict};
use crate::rl::spec::{Baseline, Keep, Objective, Rollout, Schedule};
use crate::stages::Shared;
use crate::stages::data::read_stored;
use crate::stages::model::ModelRecord;
use crate::svd::cache::Decomposed;
use crate::svf::apply::{Application, apply};
use crate::svf::expert::{BaseModel, Expert};
use crate::svf::train::{SvfTrainer, TrainerState};

pub const EXPERT_FILE: &str = "expert.safetensors";
pub const LAST_FILE: &str = "last.safetensors";
pub const TRAINING_FILE: &str = "training.json";
const STATE_FILE: &str = "state.json";

pub struct TrainStage<'a> {
    pub name: String,
    pub expert: ExpertSpec,
    pub rewards: BTreeMap<String, RewardSpec>,
    pub seed: u64,
    /// The stage kind's `kind/version`, recorded in `training.json`.
    pub version: String,
    pub shared: &'a Shared,
}

/// Each target's z.
type Vectors = Vec<(String, Vec<f32>)>;

/// One validation of the vector after `step` steps.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Validation {
    pub step: u32,
    pub accuracy: f64,
    pub items: usize,
}

/// Everything a rerun needs to continue where a run stopped.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    /// Steps finished.
    step: u32,
    trainer: TrainerState,
    /// The best validated vector so far and its validation.
    best: Option<(Validation, Vectors)>,
    validations: Vec<Validation>,
    /// The `metrics.jsonl` lines of the finished steps (the stage directory is rewritten by a
    /// rerun).
    metrics: Vec<Value>,
}

impl StageRunner for TrainStage<'_> {
    fn inputs(&self) -> Result<BTreeMap<String, String>, StageError> {
        Ok(BTreeMap::new())
    }

    fn describe(&self) -> Option<String> {
        let t = &self.expert.train;
        let how = match (t.objective, t.rollout) {
            (Objective::Sft, _) => "sft on targets".to_string(),
            (Objective::Rl, Rollout::Options) => {
                format!(
                    "RL on options ({})",
                    crate::hash::serde_name(&t.option_policy)
                )
            }
            (Objective::Rl, Rollout::Generate) => {
                format!("RL on {} samples per prompt", t.samples_per_prompt)
            }
        };
        Some(format!(
            "{} steps of {} `{}` train prompts, {how}",
            t.steps, t.prompts_per_step, self.expert.dataset
        ))
    }

    fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let records = read_stored(ctx.upstream_dir(&format!("data.{}", self.expert.dataset))?)?;
        self.train_on(ctx, &records)
    }
}

impl TrainStage<'_> {
    /// Trains on the train split of `records`, validating on their val split; writes the
    /// stage's outputs into `ctx`'s directory.
    pub fn train_on(
        &self,
        ctx: &StageContext,
        records: &[StoredRecord],
    ) -> Result<Value, StageError> {
        let started = Instant::now();
        let spec = &self.expert.train;
        let record = ModelRecord::from_upstream(ctx)?;
        let model = self.shared.model(&record.path)?;
        let base = BaseModel::of_file(&record.path).map_err(failed_to("identifying the model"))?;
        let factors =
            crate::stages::decompose::upstream_factors(ctx, &model, &base, &self.shared.home)?;
        let split = |name: &str| -> Vec<&StoredRecord> {
            records.iter().filter(|r| r.split == name).collect()
        };
        let (train, val) = (split("train"), split("val"));
        if train.is_empty() {
            return Err(StageError::failed(
                format!("training `{}`", self.name),
                format!("dataset `{}` has no train split", self.expert.dataset),
            ));
        }
        let reward = Reward::compile(&self.expert.reward, &self.rewards)
            .map_err(failed_to("compiling the reward"))?;
        let validation = self.validation_stage();
        let no_shots: Vec<StoredRecord> = Vec::new();
        let task = validation.task(&no_shots, Some(&reward));
        let rollouts = Rollouts {
            spec,
            task: &task,
            reward: &reward,
            base: &model,
        };
        let initial = self.initial_expert(ctx, &base, &factors)?;
        let mut trainer =
            SvfTrainer::new(&model.transformer, &factors, &initial, spec.lr, spec.clip)
                .map_err(failed_to("setting up the trainer"))?;
        let mut state = self.resume(ctx, &mut trainer)?;
        for line in &state.metrics {
            ctx.metrics.log(line.clone());
        }
        let mut progress = ctx.progress(spec.steps as u64, "steps");
        progress.advance(state.step as u64, String::new());
        let order = PromptOrder::new(train.len(), spec.prompts_per_step as usize, self.seed);
        let mut z = trainer.z().map_err(failed_to("reading z"))?;
        // The model with the current z, when a validation already composed it.
        let mut composed: Option<Model> = None;
        while state.step < spec.steps {
            let step = state.step;
            let lr = learning_rate(spec, step);
            trainer.set_lr(lr);
            let policy = match composed.take() {
                Some(policy) => policy,
                None => compose(&model, &factors, &expert_of(&initial, &z)?)?,
            };
            let items: Vec<&StoredRecord> = order.step(step).iter().map(|&i| train[i]).collect();
            let clock = Instant::now();
            let made = self.batch(&rollouts, &policy, &items, step)?;
            let rollout_s = clock.elapsed().as_secs_f64();
            let mut line = self.train_step(&mut trainer, &made, step, lr, rollout_s, &mut z)?;
            state.step += 1;
            let validate_now = (spec.validate_every > 0 && state.step % spec.validate_every == 0)
                || state.step == spec.steps;
            if validate_now && !val.is_empty() {
                let policy = compose(&model, &factors, &expert_of(&initial, &z)?)?;
                let v = self.validate(&task, &policy, &val, state.step)?;
                composed = Some(policy);
                line["val_accuracy"] = json!(v.accuracy);
                if state
                    .best
                    .as_ref()
                    .is_none_or(|(b, _)| v.accuracy > b.accuracy)
                {
                    state.best = Some((v.clone(), z.clone()));
                }
                state.validations.push(v);
            }
            state.metrics.push(line);
            if let Some(warning) = no_signal_warning(&state.metrics, spec.baseline, &task.values) {
                progress.warn(&warning);
                state.metrics.last_mut().expect("just pushed")["warning"] = json!(warning);
            }
            let line = state.metrics.last().expect("just pushed");
            ctx.metrics.log(line.clone());
            progress.advance(1, step_message(line));
            let interrupted = ctx.interrupt.requested();
            if interrupted || state.step % spec.checkpoint_every == 0 || state.step == spec.steps {
                state.trainer = trainer.state().map_err(failed_to("reading z"))?;
                save_checkpoint(&ctx.checkpoint_dir, &state)?;
            }
            if interrupted {
                return Err(StageError::Interrupted);
            }
        }
        let mut summary = self.write_outputs(ctx, &initial, &trainer, &state, started)?;
        summary["sandbox"] = json!(reward.sandbox_summary());
        Ok(summary)
    }

    /// The starting vector: another expert's (`init_from`) or the parametrisation's initial one.
    fn initial_expert(
        &self,
        ctx: &StageContext,
        base: &BaseModel,
        factors: &[Decomposed],
    ) -> Result<Expert, StageError> {
        let mut expert = match &self.expert.init_from {
            Some(from) => {
                let file = ctx
                    .upstream_dir(&format!("train.{from}"))?
                    .join(EXPERT_FILE);
                let expert =
                    Expert::load(&file).map_err(|e| StageError::at("loading", &file, e))?;
                let ranks: Vec<(String, usize)> = factors
                    .iter()
                    .map(|d| (d.name.clone(), d.factors.s.dims1().unwrap_or(0)))
                    .collect();
                expert
                    .check_compatible(&file, base, &ranks)
                    .map_err(|e| StageError::at("loading", &file, e))?;
                if expert.meta.parametrization != self.expert.train.parametrization {
                    return Err(StageError::at(
                        "starting from",
                        &file,
                        "its parametrisation differs from this expert's `train.parametrization`",
                    ));
                }
                expert
            }
            None => {
                let s = crate::svd::cache::singular_values(factors);
                Expert::initial(
                    base.clone(),
                    self.expert.train.parametrization,
                    &s,
                    self.seed,
                )
                .map_err(failed_to("initialising the expert"))?
            }
        };
        expert.meta.training = Value::Null;
        Ok(expert)
    }

    /// The stored state of an interrupted run, or a fresh one.
    fn resume(
        &self,
        ctx: &StageContext,
        trainer: &mut SvfTrainer,
    ) -> Result<Checkpoint, StageError> {
        let file = ctx.checkpoint_dir.join(STATE_FILE);
        if !file.exists() {
            return Ok(Checkpoint {
                step: 0,
                trainer: trainer.state().map_err(failed_to("reading z"))?,
                best: None,
                validations: Vec::new(),
                metrics: Vec::new(),
            });
        }
        let state: Checkpoint = crate::fsutil::read_json(&file, crate::fsutil::MAX_EXPERT_BYTES)
            .map_err(|e| StageError::at("reading", &file, e))?;
        trainer
            .restore(&state.trainer)
            .map_err(|e| StageError::at("resuming from", &file, e))?;
        eprintln!("  resuming `train.{}` after step {}", self.name, state.step);
        Ok(state)
    }

    fn batch(
        &self,
        rollouts: &Rollouts,
        policy: &Model,
        items: &[&StoredRecord],
        step: u32,
    ) -> Result<StepBatch, StageError> {
        let seed = self.seed ^ (u64::from(step) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let batch = match (self.expert.train.objective, self.expert.train.rollout) {
            (Objective::Sft, _) => rollouts.sft(policy, items),
            (Objective::Rl, Rollout::Options) => rollouts.options(policy, items, seed),
            (Objective::Rl, Rollout::Generate) => rollouts.generate(policy, items, seed),
        };
        batch.map_err(StageError::from)
    }

    /// One optimiser step on `made` at learning rate `lr`, leaving the new vectors in `z`; the
    /// step's metrics line.
    fn train_step(
        &self,
        trainer: &mut SvfTrainer,
        made: &StepBatch,
        step: u32,
        lr: f64,
        rollout_s: f64,
        z: &mut Vectors,
    ) -> Result<Value, StageError> {
        let clock = Instant::now();
        let mut line = json!({
            "step": step + 1,
            "lr": lr,
            "rollout": made.stats,
            "time_rollout_s": rollout_s - made.stats.reward_s,
            "time_reward_s": made.stats.reward_s,
        });
        if made.batch.ids.is_empty() {
            // Every group was uniform: nothing to learn from this step.
            line["skipped"] = json!(true);
            return Ok(line);
        }
        let report = trainer
            .step(&made.batch)
            .map_err(failed_to("taking a training step"))?;
        *z = trainer.z().map_err(failed_to("reading z"))?;
        let z_finite = z.iter().all(|(_, z)| z.iter().all(|v| v.is_finite()));
        if !report.loss.is_finite() || !report.grad_norm.is_finite() || !z_finite {
            return Err(StageError::failed(
                format!("training step {}", step + 1),
                format!(
                    "the loss ({}) or the gradient norm ({}) or z is not finite; the last checkpoint is kept (lower `lr` or raise `clip`)",
                    report.loss, report.grad_norm
                ),
            ));
        }
        let train_s = clock.elapsed().as_secs_f64();
        let tokens: usize = made.batch.ids.iter().map(Vec::len).sum();
        line["loss"] = json!(report.loss);
        line["grad_norm"] = json!(report.grad_norm);
        line["clipped"] = json!(report.clipped);
        line["time_train_s"] = json!(train_s);
        line["trained_tokens"] = json!(tokens);
        line["tokens_per_s"] = json!((made.stats.tokens + tokens) as f64 / (rollout_s + train_s));
        Ok(line)
    }

    /// The evaluation this expert is validated with: its dataset's val split, in its rollout's
    /// format (option ranking, or greedy generation judged by the reward).
    fn validation_stage(&self) -> EvalStage<'_> {
        let t = &self.expert.train;
        let spec = EvaluateSpec {
            name: Some(format!("{}_val", self.name)),
            dataset: self.expert.dataset.clone(),
            split: SplitName::Val,
            with: vec![self.name.clone()],
            reward: Some(self.expert.reward.clone()),
            mode: t.rollout.eval_mode(),
            chat: Some(t.chat()),
            shots: 0,
            limit: Some(t.validate_limit),
            max_new_tokens: t.max_new_tokens,
            temperature: 0.0,
            stop: t.stop.clone(),
            options: t.options,
            batch_size: 8,
        };
        EvalStage {
            eval: ResolvedEval::new(0, &spec, self.seed),
            rewards: self.rewards.clone(),
            adaptations: Default::default(),
            version: String::new(),
            shared: self.shared,
        }
    }

    fn validate(
        &self,
        task: &Task,
        policy: &Model,
        val: &[&StoredRecord],
        step: u32,
    ) -> Result<Validation, StageError> {
        let limit = self.expert.train.validate_limit as usize;
        let mut items: Vec<&StoredRecord> = val.iter().take(limit).copied().collect();
        task.sort_for_batching(&mut items);
        let mut correct = 0;
        run_batches(task, policy, &self.name, &items, 8, &mut |samples, _| {
            correct += samples
                .iter()
                .filter(|s| s.verdict == Verdict::Correct)
                .count();
            Ok(())
        })?;
        Ok(Validation {
            step,
            accuracy: correct as f64 / items.len().max(1) as f64,
            items: items.len(),
        })
    }

    fn write_outputs(
        &self,
        ctx: &StageContext,
        initial: &Expert,
        trainer: &SvfTrainer,
        state: &Checkpoint,
        started: Instant,
    ) -> Result<Value, StageError> {
        let last_z = trainer.z().map_err(failed_to("reading z"))?;
        let (kept_step, kept_z) = match (&self.expert.train.keep, &state.best) {
            (Keep::Best, Some((v, z))) => (v.step, z.clone()),
            _ => (state.step, last_z.clone()),
        };
        let summary = json!({
            "expert": self.name,
            "dataset": self.expert.dataset,
            "steps": state.step,
            "kept_step": kept_step,
            "keep": self.expert.train.keep,
            "validations": state.validations,
            "best_val_accuracy": state.best.as_ref().map(|(v, _)| v.accuracy),
            "train": self.expert.train,
            "seed": self.seed,
            "versions": {"tsq": env!("CARGO_PKG_VERSION"), "stage": self.version},
            "seconds_this_run": started.elapsed().as_secs_f64(),
        });
        let save = |z: &Vectors, step: u32, file: &Path| -> Result<(), StageError> {
            let mut expert = expert_of(initial, z)?;
            expert.meta.training =
                json!({"stage": format!("train.{}", self.name), "step": step, "summary": summary});
            expert
                .save(file)
                .map_err(|e| StageError::at("writing", file, e))
        };
        save(&kept_z, kept_step, &ctx.output(EXPERT_FILE))?;
        save(&last_z, state.step, &ctx.output(LAST_FILE))?;
        crate::fsutil::write_json(&ctx.output(TRAINING_FILE), &summary)
            .map_err(|e| StageError::at("writing", &ctx.output(TRAINING_FILE), e))?;
        Ok(
            json!({"steps": state.step, "kept_step": kept_step, "best_val_accuracy": summary["best_val_accuracy"]}),
        )
    }
}

/// The train-split indices of each step: a seeded permutation per epoch, taken in order.
struct PromptOrder {
    len: usize,
    per_step: usize,
    seed: u64,
}

impl PromptOrder {
    fn new(len: usize, per_step: usize, seed: u64) -> Self {
        Self {
            len,
            per_step,
            seed,
        }
    }

    fn epoch(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ (epoch as u64 + 1));
        order.shuffle(&mut rng);
        order
    }

    fn step(&self, step: u32) -> Vec<usize> {
        let first = step as usize * self.per_step;
        // A step spans at most a few epochs: shuffle each once.
        let mut epoch: Option<(usize, Vec<usize>)> = None;
        (first..first + self.per_step)
            .map(|at| {
                let number = at / self.len;
                if epoch.as_ref().is_none_or(|(n, _)| *n != number) {
                    epoch = Some((number, self.epoch(number)));
                }
                epoch.as_ref().map_or(0, |(_, order)| order[at % self.len])
            })
            .collect()
    }
}

/// The learning rate of `step` (0-based): linear warm-up, then constant or cosine to 0.
fn learning_rate(spec: &crate::rl::spec::TrainSpec, step: u32) -> f64 {
    let warmup = spec.warmup_steps;
    if step < warmup {
        return spec.lr * f64::from(step + 1) / f64::from(warmup);
    }
    match spec.schedule {
        Schedule::Constant => spec.lr,
        Schedule::Cosine => {
            let span = spec.steps.saturating_sub(warmup).max(1);
            let t = f64::from(step - warmup) / f64::from(span);
            spec.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

/// `template` with its vectors replaced by `z`.
fn expert_of(template: &Expert, z: &[(String, Vec<f32>)]) -> Result<Expert, StageError> {
    let mut expert = template.clone();
    for (name, values) in z {
        let (slot, _) = expert.vectors.get_mut(name).ok_or_else(|| {
            StageError::failed("building the expert", format!("no target `{name}`"))
        })?;
        *slot =
            candle_core::Tensor::from_vec(values.clone(), values.len(), &candle_core::Device::Cpu)
                .map_err(failed_to("building the expert"))?;
    }
    Ok(expert)
}

/// A copy of `model` with `expert` composed into its weights.
fn compose(model: &Model, factors: &[Decomposed], expert: &Expert) -> Result<Model, StageError> {
    let mut policy = model.clone();
    let scales = expert
        .effective_scales()
        .map_err(failed_to("applying the expert"))?;
    apply(
        &mut policy.transformer,
        factors,
        &scales,
        Application::Compose,
    )
    .map_err(failed_to("applying the expert"))?;
    Ok(policy)
}

fn save_checkpoint(dir: &Path, state: &Checkpoint) -> Result<(), StageError> {
    let file: PathBuf = dir.join(STATE_FILE);
    crate::fsutil::write_json(&file, state).map_err(|e| StageError::at("writing", &file, e))
}

/// Steps in a row with most groups uniform before the trainer warns.
const NO_SIGNAL_STEPS: usize = 3;
/// Steps after a warning before the next one.
const WARN_AGAIN_AFTER: usize = 12;

/// A warning when most prompt groups of the last [`NO_SIGNAL_STEPS`] steps got equal rewards for
/// all their samples: under a group baseline those groups have no advantage, so the steps learn
/// (next to) nothing. (Without a baseline every reward is its own advantage: no warning.)
/// Derived from the metrics lines alone, so a resumed run warns as an uninterrupted one.
fn no_signal_warning(lines: &[Value], baseline: Baseline, values: &RewardValues) -> Option<String> {
    if baseline == Baseline::None {
        return None;
    }
    let frac = |line: &Value| {
        line.pointer("/rollout/frac_reward_zero_std")
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    };
    let streak = lines.iter().rev().take_while(|l| frac(l) > 0.5).count();
    // Earlier lines (the current one is the last) that already carry a warning.
    let earlier = &lines[..lines.len().saturating_sub(1)];
    let warned_lately =
        (earlier.iter().rev().take(WARN_AGAIN_AFTER)).any(|l| l.get("warning").is_some());
    if streak < NO_SIGNAL_STEPS || warned_lately {
        return None;
    }
    let recent = &lines[lines.len() - streak..];
    let mean = |f: &dyn Fn(&Value) -> f64| recent.iter().map(f).sum::<f64>() / streak as f64;
    let reward = mean(&|l| {
        l.pointer("/rollout/reward")
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    });
    // Where the mean reward sits between a wrong and a right answer.
    let span = values.correct - values.wrong;
    let right = if span.abs() > 0.0 {
        (reward - values.wrong) / span
    } else {
        0.5
    };
    let why = if right > 0.9 {
        "nearly every sample is right: the task is too easy for this model"
    } else if right < 0.1 {
        "nearly every sample is wrong: the task is too hard, or the reward never matches the completions (look at a few with an evaluation in generate mode)"
    } else {
        "the samples of a prompt tend to agree"
    };
    Some(format!(
        "for {streak} steps {:.0}% of prompt groups got the same reward for every sample (mean reward {reward:.2}) and taught nothing: {why}. Raise `samples_per_prompt` or `temperature`, change the data or its prompt, or use `rollout: options` on multiple-choice data",
        100.0 * mean(&frac)
    ))
}

/// The progress line of a step.
fn step_message(line: &Value) -> String {
    let num = |key: &str| line.pointer(key).and_then(Value::as_f64);
    let mut parts = Vec::new();
    if let Some(r) = num("/rollout/reward") {
        parts.push(format!("reward {r:.3}"));
    }
    if let Some(l) = num("/loss") {
        parts.push(format!("loss {l:.4}"));
    }
    if let Some(v) = num("/val_accuracy") {
        parts.push(format!("val {v:.3}"));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rl::spec::TrainSpec;

    #[test]
    fn prompts_are_drawn_without_replacement_within_an_epoch() {
        let order = PromptOrder::new(10, 4, 7);
        let first: Vec<usize> = (0..2)
            .flat_map(|s| order.step(s))
            .chain(order.step(2)[..2].to_vec())
            .collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "{first:?}");
        assert_eq!(order.step(3), PromptOrder::new(10, 4, 7).step(3));
        assert_ne!(order.epoch(0), order.epoch(1));
    }

    /// The warning comes after three uniform steps in a row, says why from the mean reward,
    /// and is not repeated every step.
    #[test]
    fn a_run_without_reward_signal_is_warned_about() {
        let values = RewardValues::default();
        let line = |frac: f64, reward: f64| json!({"rollout": {"frac_reward_zero_std": frac, "reward": reward}});
        let mut lines = vec![line(0.9, 0.0), line(0.2, 0.5)];
        let warnings: Vec<Option<String>> = (0..16)
            .map(|_| {
                lines.push(line(0.875, 0.02));
                let warning = no_signal_warning(&lines, Baseline::Rloo, &values);
                if let Some(w) = &warning {
                    lines.last_mut().unwrap()["warning"] = json!(w);
                }
                warning
            })
            .collect();
        let at: Vec<usize> = (0..16).filter(|&i| warnings[i].is_some()).collect();
        assert_eq!(
            at,
            vec![2, 15],
            "after 3 uniform steps, then 12 steps later"
        );
        let text = warnings[2].as_deref().unwrap();
        assert!(
            text.contains("for 3 steps 88%") && text.contains("too hard"),
            "{text}"
        );
        let easy = [
            line(0.0, 0.5),
            line(0.6, 0.97),
            line(0.7, 0.95),
            line(0.8, 0.99),
        ];
        let easy = no_signal_warning(&easy, Baseline::Rloo, &values).unwrap();
        assert!(easy.contains("too easy"), "{easy}");
    }

    #[test]
    fn schedules_warm_up_and_decay() {
        let spec = TrainSpec {
            steps: 10,
            lr: 1.0,
            warmup_steps: 2,
            schedule: Schedule::Cosine,
            ..TrainSpec::default()
        };
        let lrs: Vec<f64> = (0..10).map(|s| learning_rate(&spec, s)).collect();
        assert_eq!((lrs[0], lrs[1], lrs[2]), (0.5, 1.0, 1.0));
        assert!(
            lrs[9] < 0.05 && lrs.windows(2).skip(2).all(|w| w[1] <= w[0]),
            "{lrs:?}"
        );
        let constant = TrainSpec {
            lr: 0.1,
            ..TrainSpec::default()
        };
        assert_eq!(learning_rate(&constant, 50), 0.1);
    }
}
