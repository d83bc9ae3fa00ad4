//! Few-shot mixing: the cross-entropy method ([`crate::adapt::cem`]) searches α so that the mixture
//! e' = Σ_k α_k e_k of the experts' effective scales answers the target task's shots best.
//!
//! A mixture is linear in α: W'(α) = U diag(s ⊙ Σ α_k e_k) Vᵀ = Σ α_k W_k with W_k each expert's
//! composed weight. So each expert is composed once ([`crate::adapt::mixer::Mixer`]) and a candidate costs a weighted
//! sum per target instead of an SVD product; candidates that clamping made equal are scored once.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::runner::AdaptStage;
use super::strategy::Strategy;
use crate::adapt::cem::{self, CemState, Fitness, GenerationRecord};
use crate::adapt::mixer::{Mixer, rows};
use crate::adapt::spec::{FewShotAdaptation, Granularity};
use crate::dag::StageId;
use crate::data::stored::StoredRecord;
use crate::eval::runner::Task;
use crate::eval::spec::EvalMode;
use crate::eval::spec::EvaluateSpec;
use crate::eval::spec::ResolvedEval;
use crate::exec::{StageContext, StageError, failed_to};
use crate::model::Model;
use crate::pipeline::spec::PipelineSpec;
use crate::reward::Verdict;
use crate::stages::data::read_stored;
use crate::stages::eval::EvalStage;
use crate::stages::ids;
use crate::stages::model::ModelRecord;
use crate::svf::expert::{Expert, Mix, combine};

pub const ALPHA_FILE: &str = "alpha.json";
const CHECKPOINT_FILE: &str = "cem.json";
/// Shots scored per batch.
const SHOT_BATCH: usize = 8;

/// `alpha.json`: what the search found and how.
#[derive(Debug, Serialize, Deserialize)]
pub struct AlphaFile {
    pub experts: Vec<String>,
    pub granularity: Granularity,
    /// One row per expert: one weight, or one per layer.
    pub alpha: Vec<Vec<f64>>,
    pub fitness: Fitness,
    pub dataset: String,
    pub split: String,
    /// The ids of the shots (none from a test split).
    pub shots: Vec<String>,
    pub generations: u32,
    /// Distinct candidates scored.
    pub candidates_scored: usize,
    pub search_seconds: f64,
}

/// The resumable search: the CEM state and the metrics lines so far.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    state: CemState,
    history: Vec<GenerationRecord>,
    seconds: f64,
    candidates_scored: usize,
}

/// Mixing weights over experts searched with the CEM on a few labelled examples of the target
/// task (the paper's third strategy).
impl Strategy for FewShotAdaptation {
    fn deps(&self, _: &PipelineSpec) -> Vec<StageId> {
        let mut deps = vec![ids::data(&self.dataset), ids::decompose()];
        deps.extend(self.experts.iter().map(|e| ids::train(e)));
        deps
    }

    fn reward(&self) -> Option<&str> {
        self.reward.as_deref()
    }

    fn describe(&self) -> String {
        format!(
            "CEM mixing of {} on {} `{}` {} shots, {} generations of {}",
            self.experts.join(", "),
            self.shots,
            self.dataset,
            self.split.as_str(),
            self.cem.generations,
            self.cem.population
        )
    }

    fn prepare(
        &self,
        stage: &AdaptStage,
        ctx: &StageContext,
        model: &Model,
        record: &ModelRecord,
    ) -> Result<Value, StageError> {
        search(stage, ctx, model, record, self)
    }
}

/// Searches α and writes the mixture (`expert.safetensors`) and `alpha.json`.
fn search(
    stage: &AdaptStage,
    ctx: &StageContext,
    model: &Model,
    record: &ModelRecord,
    f: &FewShotAdaptation,
) -> Result<Value, StageError> {
    let started = Instant::now();
    let base = record.base_model()?;
    let factors =
        crate::stages::decompose::upstream_factors(ctx, model, &base, &stage.shared.home)?;
    let experts = load_experts(ctx, &f.experts)?;
    let records = read_stored(ctx.upstream_dir(&crate::stages::ids::data(&f.dataset))?)?;
    let shots = shots(&records, f)?;
    let fitness_stage = fitness_stage(stage, f);
    let reward = fitness_stage.reward()?;
    let task = fitness_stage.task(&[], reward.as_ref());
    let mixer = Mixer::new(&factors, &experts).map_err(failed_to("composing the experts"))?;
    let dim = experts.len() * mixer.groups(f.granularity);
    let seed = f.cem.seed.unwrap_or(stage.seed);
    let checkpoint = ctx.checkpoint_dir.join(CHECKPOINT_FILE);
    let mut saved = match read_checkpoint(&checkpoint) {
        Some(saved) => {
            let done = saved.state.generation;
            eprintln!("  resuming `adapt.{}` after generation {done}", stage.name);
            saved
        }
        None => Checkpoint {
            state: cem::initial_state(&f.cem, dim, experts.len()),
            history: vec![],
            seconds: 0.0,
            candidates_scored: 0,
        },
    };
    for line in &saved.history {
        ctx.metrics.log(json!(line));
    }
    let mut work = model.clone();
    let mut memo: HashMap<Vec<u64>, Fitness> = HashMap::new();
    let mut progress = ctx.progress(u64::from(f.cem.generations), "generations");
    progress.advance(u64::from(saved.state.generation), String::new());
    let mut session = Instant::now();
    while saved.state.generation < f.cem.generations {
        ctx.check_interrupt()?;
        let candidates = cem::population(&f.cem, &saved.state, seed);
        let mut scores = Vec::with_capacity(candidates.len());
        for alpha in &candidates {
            let key: Vec<u64> = alpha.iter().map(|a| a.to_bits()).collect();
            let fitness = match memo.get(&key) {
                Some(fitness) => *fitness,
                None => {
                    mixer
                        .apply(&mut work.transformer, alpha, f.granularity)
                        .map_err(failed_to("mixing the experts"))?;
                    let fitness = score_shots(&task, &work, &stage.name, &shots, f.mode)?;
                    saved.candidates_scored += 1;
                    *memo.entry(key).or_insert(fitness)
                }
            };
            scores.push(fitness);
        }
        let line = cem::advance(&f.cem, &mut saved.state, candidates, &scores);
        ctx.metrics.log(json!(&line));
        let message = format!(
            "best acc {:.0}%",
            100.0 * saved.state.best.as_ref().map_or(0.0, |b| b.1.accuracy)
        );
        saved.history.push(line);
        saved.seconds += session.elapsed().as_secs_f64();
        session = Instant::now();
        crate::fsutil::write_json(&checkpoint, &saved)
            .map_err(|e| StageError::at("writing", &checkpoint, e))?;
        progress.advance(1, message);
    }
    let (alpha, fitness) = saved
        .state
        .best
        .clone()
        .ok_or_else(|| StageError::failed("searching α", "no candidate was scored"))?;
    let rows = rows(&alpha, experts.len());
    let mix = match f.granularity {
        Granularity::Expert => Mix::PerExpert(rows.iter().map(|r| r[0]).collect()),
        Granularity::Layer => Mix::PerLayer(rows.clone()),
    };
    let mixed = combine(&experts, &mix).map_err(failed_to("combining the experts"))?;
    let out = ctx.output(crate::stages::train::EXPERT_FILE);
    mixed
        .save(&out)
        .map_err(|e| StageError::at("writing", &out, e))?;
    let summary = AlphaFile {
        experts: f.experts.clone(),
        granularity: f.granularity,
        alpha: rows,
        fitness,
        dataset: f.dataset.clone(),
        split: f.split.as_str().into(),
        shots: shots.iter().map(|r| r.id.clone()).collect(),
        generations: saved.state.generation,
        candidates_scored: saved.candidates_scored,
        search_seconds: saved.seconds,
    };
    crate::fsutil::write_json(&ctx.output(ALPHA_FILE), &summary)
        .map_err(|e| StageError::at("writing", &ctx.output(ALPHA_FILE), e))?;
    Ok(json!({
        "alpha": summary.alpha,
        "shot_accuracy": fitness.accuracy,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// The first `shots` records of the shot split; never a test item.
fn shots<'r>(
    records: &'r [StoredRecord],
    f: &FewShotAdaptation,
) -> Result<Vec<&'r StoredRecord>, StageError> {
    let split = f.split.as_str();
    let shots: Vec<&StoredRecord> = records
        .iter()
        .filter(|r| r.split == split)
        .take(f.shots as usize)
        .collect();
    if shots.is_empty() {
        return Err(StageError::failed(
            "choosing shots",
            format!("dataset `{}` has no {split} split", f.dataset),
        ));
    }
    assert!(
        shots.iter().all(|r| r.split != "test"),
        "shots come from a train or val split"
    );
    Ok(shots)
}

fn load_experts(ctx: &StageContext, names: &[String]) -> Result<Vec<(String, Expert)>, StageError> {
    names
        .iter()
        .map(|name| {
            let file = ctx
                .upstream_dir(&crate::stages::ids::train(name))?
                .join(crate::stages::train::EXPERT_FILE);
            let expert = Expert::load(&file).map_err(|e| StageError::at("loading", &file, e))?;
            Ok((name.clone(), expert))
        })
        .collect()
}

/// How shots are judged: an evaluation of the shot split with the adaptation's settings.
fn fitness_stage<'a>(stage: &'a AdaptStage, f: &FewShotAdaptation) -> EvalStage<'a> {
    let spec = EvaluateSpec {
        name: Some(format!("{}_shots", stage.name)),
        dataset: f.dataset.clone(),
        split: f.split,
        with: vec![stage.name.clone()],
        reward: f.reward.clone(),
        mode: f.mode,
        chat: f.chat,
        shots: 0,
        limit: Some(f.shots),
        max_new_tokens: f.max_new_tokens,
        temperature: 0.0,
        stop: f.stop.clone(),
        options: f.options,
        batch_size: SHOT_BATCH as u32,
    };
    EvalStage {
        eval: ResolvedEval::new(0, &spec, stage.seed),
        rewards: stage.rewards.clone(),
        adaptations: Default::default(),
        version: String::new(),
        shared: stage.shared,
    }
}

/// Accuracy on the shots, ties broken by the mean log-likelihood of the right answers: the
/// gold option (`loglik`) or the rendered target (`generate`, when the dataset has one).
fn score_shots(
    task: &Task,
    model: &Model,
    name: &str,
    shots: &[&StoredRecord],
    mode: EvalMode,
) -> Result<Fitness, StageError> {
    let mut samples = Vec::with_capacity(shots.len());
    for batch in shots.chunks(SHOT_BATCH) {
        samples.extend(task.run(model, name, batch)?);
    }
    let right = samples
        .iter()
        .filter(|s| s.verdict == Verdict::Correct)
        .count();
    let logliks: Vec<f64> = match mode {
        EvalMode::Loglik => samples
            .iter()
            .zip(shots)
            .filter_map(|(s, r)| {
                let gold = task.scored_options(&r.fields).ok()?.1;
                s.option_logliks.as_ref()?.get(gold).copied()
            })
            .collect(),
        EvalMode::Generate => {
            let pairs: Vec<(String, String)> = samples
                .iter()
                .zip(shots)
                .filter_map(|(s, r)| Some((s.prompt.clone(), r.target.clone()?)))
                .collect();
            crate::model::score::score(model, &pairs)
                .map_err(failed_to("scoring the shots' targets"))?
                .iter()
                .map(|s| s.sum)
                .collect()
        }
    };
    Ok(Fitness {
        accuracy: right as f64 / samples.len().max(1) as f64,
        tie_break: logliks.iter().sum::<f64>() / logliks.len().max(1) as f64,
    })
}

fn read_checkpoint(path: &Path) -> Option<Checkpoint> {
    crate::fsutil::read_json(path, crate::fsutil::MAX_TEXT_BYTES).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shots_never_come_from_the_test_split() {
        let record = |id: &str, split: &str| StoredRecord {
            id: id.into(),
            split: split.into(),
            prompt: String::new(),
            target: None,
            fields: Default::default(),
        };
        let records = vec![
            record("t1", "test"),
            record("a", "train"),
            record("v", "val"),
        ];
        let spec: FewShotAdaptation = serde_json::from_value(json!({
            "experts": ["a"], "dataset": "d", "shots": 5
        }))
        .unwrap();
        let picked = shots(&records, &spec).unwrap();
        assert_eq!(
            picked.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
    }
}
