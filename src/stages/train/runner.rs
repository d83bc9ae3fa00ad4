//! The `train.<expert>` stage's runner: learns an SVF expert on the dataset's train split, validates on
//! its val split, and writes the expert. Test-split items are never read.
//!
//! Each step: compose the current expert into a copy of the model, make the step's batch
//! ([`crate::rl::rollout`]), take one trainer step, log the step to `metrics.jsonl`. Every
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

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::stored::StoredRecord;
use crate::eval::runner::Task;
use crate::eval::spec::ResolvedEval;
use crate::eval::spec::{EvaluateSpec, SplitName};
use crate::exec::{StageContext, StageError, StageRunner, failed_to};
use crate::model::Model;
use crate::reward::spec::RewardSpec;
use crate::reward::{Reward, Verdict};
use crate::rl::rollout::{Rollouts, StepBatch};
use crate::rl::schedule::{PromptOrder, learning_rate};
use crate::rl::signal::{no_signal_warning, step_message};
use crate::rl::spec::ExpertSpec;
use crate::rl::spec::{Keep, Objective, Rollout};
use crate::stages::Shared;
use crate::stages::data::read_stored;
use crate::stages::eval::{EvalStage, run_batches};
use crate::stages::ids;
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
        let records =
            read_stored(ctx.upstream_dir(&crate::stages::ids::data(&self.expert.dataset))?)?;
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
        let model = self.shared.model(&record)?;
        let base = record.base_model()?;
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
                    .upstream_dir(&crate::stages::ids::train(from))?
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
            "engine": trainer.engine(),
            "versions": {"tsq": env!("CARGO_PKG_VERSION"), "stage": self.version},
            "seconds_this_run": started.elapsed().as_secs_f64(),
        });
        let save = |z: &Vectors, step: u32, file: &Path| -> Result<(), StageError> {
            let mut expert = expert_of(initial, z)?;
            expert.meta.training =
                json!({"stage": ids::train(&self.name), "step": step, "summary": summary});
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
