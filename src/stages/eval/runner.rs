//! The `eval.<name>` stage: evaluates a dataset split with each model of `with`, batch by batch.
//! Finished batches are appended to `<with>.jsonl` in the stage's checkpoint directory, so a
//! killed evaluation resumes where it stopped; the outputs are written once every item is done.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::time::Instant;

use polars::prelude::*;
use serde_json::{Value, json};

use super::adapted::{Models, mixture_result};
use crate::adapt::spec::AdaptationSpec;
use crate::data::stored::StoredRecord;
use crate::eval::results::{
    ModelResult, NSamples, RESULTS_JSON, RESULTS_MD, Results, SAMPLES_FILE,
};
use crate::eval::runner::{Sample, Task};
use crate::eval::spec::EvalMode;
use crate::eval::spec::ResolvedEval;
use crate::exec::{StageContext, StageError, StageRunner, failed_to, file_input};
use crate::reward::Reward;
use crate::reward::spec::{RewardSpec, RewardValues};
use crate::stages::Shared;
use crate::stages::data::read_stored;
use crate::stages::ids;
use crate::stages::model::ModelRecord;

pub struct EvalStage<'a> {
    pub eval: ResolvedEval,
    pub rewards: BTreeMap<String, RewardSpec>,
    /// The pipeline's adaptations (those `with` names are evaluated through them).
    pub adaptations: BTreeMap<String, AdaptationSpec>,
    /// The stage kind's `kind/version`, recorded in `results.json`.
    pub version: String,
    pub shared: &'a Shared,
}

impl StageRunner for EvalStage<'_> {
    fn inputs(&self) -> Result<BTreeMap<String, String>, StageError> {
        // Everything is in the config subtree and the upstream keys.
        Ok(BTreeMap::new())
    }

    fn describe(&self) -> Option<String> {
        let spec = &self.eval.spec;
        let mode = match spec.mode {
            EvalMode::Generate => "generate",
            EvalMode::Loglik => "loglik",
        };
        let items = spec
            .limit
            .map(|l| format!("{l} items of the "))
            .unwrap_or_default();
        Some(format!(
            "{items}{} split of `{}`, {mode}, {}-shot, with {}",
            spec.split.as_str(),
            spec.dataset,
            spec.shots,
            spec.with.join(", ")
        ))
    }

    fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let started = Instant::now();
        let spec = &self.eval.spec;
        let model_record = ModelRecord::from_upstream(ctx)?;
        let data_dir = ctx.upstream_dir(&crate::stages::ids::data(&spec.dataset))?;
        let records = read_stored(data_dir)?;
        let (items, original) = self.items(&records);
        let train = train_split(&records);
        let reward = self.reward()?;
        let task = self.task(&train, reward.as_ref());
        let mut results = BTreeMap::new();
        let mut all_samples = Vec::new();
        let mut models = Models::new(self.shared, &model_record)?;
        for with in &spec.with {
            let (samples, timing, adaptation) = match self.adaptations.get(with) {
                Some(ad) if ad.routing().is_some() => {
                    self.evaluate_routed(ctx, &task, &mut models, with, &items, ad.strategy())?
                }
                Some(ad) => {
                    let dir = ctx.upstream_dir(&crate::stages::ids::adapt(with))?;
                    let model =
                        models.expert(with, &dir.join(crate::stages::train::EXPERT_FILE))?;
                    let (samples, timing) = self.evaluate_with(ctx, &task, &model, with, &items)?;
                    let adaptation = mixture_result(dir, ad.strategy())?;
                    (samples, timing, Some(adaptation))
                }
                None => {
                    let model = models.named(ctx, with)?;
                    let (samples, timing) = self.evaluate_with(ctx, &task, &model, with, &items)?;
                    (samples, timing, None)
                }
            };
            let refs: Vec<&Sample> = samples.iter().collect();
            let mut result = ModelResult::of(&refs, timing.seconds, timing.items, timing.tokens);
            result.adaptation = adaptation;
            results.insert(with.clone(), result);
            all_samples.extend(samples);
        }
        let mut inputs = BTreeMap::from([(
            "records".to_string(),
            file_input(&data_dir.join(crate::stages::data::RECORDS_FILE))?,
        )]);
        if let Some(hash) = &model_record.blake3 {
            inputs.insert("model".into(), hash.clone());
        }
        inputs.extend(models.hashes);
        let out = Results {
            task: ids::eval(&self.eval.name).to_string(),
            dataset: spec.dataset.clone(),
            split: spec.split.as_str().into(),
            mode: crate::hash::serde_name(&spec.mode),
            results,
            n_shot: spec.shots,
            n_samples: NSamples {
                original,
                effective: items.len(),
            },
            config: json!({"evaluate": spec, "chat": self.eval.chat, "seed": self.eval.seed, "reward": spec.reward.as_ref().map(|r| crate::stages::rewards_config(&self.rewards, r))}),
            versions: BTreeMap::from([
                ("tsq".to_string(), env!("CARGO_PKG_VERSION").to_string()),
                ("stage".to_string(), self.version.clone()),
            ]),
            inputs,
            total_evaluation_time_seconds: started.elapsed().as_secs_f64(),
        };
        write_samples(&ctx.output(SAMPLES_FILE), &all_samples)?;
        crate::fsutil::write_json(&ctx.output(RESULTS_JSON), &out)
            .map_err(|e| StageError::at("writing", &ctx.output(RESULTS_JSON), e))?;
        crate::fsutil::write_atomic(&ctx.output(RESULTS_MD), out.markdown().as_bytes())
            .map_err(|e| StageError::at("writing", &ctx.output(RESULTS_MD), e))?;
        Ok(json!({
            "items": items.len(),
            "sandbox": reward.as_ref().and_then(Reward::sandbox_summary),
            "acc": out.results.iter().map(|(w, r)| (w.clone(), json!(r.acc.value))).collect::<serde_json::Map<_, _>>(),
        }))
    }
}

/// Wall time and tokens of the items this process evaluated.
#[derive(Default)]
pub struct Timing {
    pub seconds: f64,
    pub items: usize,
    pub tokens: usize,
}

impl Timing {
    pub(super) fn add(&mut self, other: &Timing) {
        self.seconds += other.seconds;
        self.items += other.items;
        self.tokens += other.tokens;
    }
}

/// What happens to each finished batch: its samples and how many seconds it took.
pub type BatchDone<'a> = dyn FnMut(&[Sample], f64) -> Result<(), StageError> + 'a;

/// Evaluates `items` in batches of `batch_size`, handing each batch's samples (and its seconds)
/// to `each`; what the stage and `tsq bench eval` share.
pub fn run_batches(
    task: &Task,
    model: &crate::model::Model,
    with: &str,
    items: &[&StoredRecord],
    batch_size: usize,
    each: &mut BatchDone,
) -> Result<Timing, StageError> {
    let started = Instant::now();
    let (mut timed_items, mut tokens) = (0, 0);
    for batch in items.chunks(batch_size.max(1)) {
        let batch_started = Instant::now();
        let samples = task.run(model, with, batch)?;
        timed_items += samples.len();
        tokens += samples
            .iter()
            .map(|s| s.prompt_tokens + s.new_tokens)
            .sum::<usize>();
        each(&samples, batch_started.elapsed().as_secs_f64())?;
    }
    Ok(Timing {
        seconds: started.elapsed().as_secs_f64(),
        items: timed_items,
        tokens,
    })
}

impl EvalStage<'_> {
    /// The split's items (after `limit`) and how many the split has.
    pub fn items<'r>(&self, records: &'r [StoredRecord]) -> (Vec<&'r StoredRecord>, usize) {
        let split = self.eval.spec.split.as_str();
        let all: Vec<&StoredRecord> = records.iter().filter(|r| r.split == split).collect();
        let original = all.len();
        let limit = self.eval.spec.limit.map_or(original, |l| l as usize);
        (all.into_iter().take(limit).collect(), original)
    }

    /// The entry's reward, compiled.
    pub fn reward(&self) -> Result<Option<Reward>, StageError> {
        self.eval
            .spec
            .reward
            .as_ref()
            .map(|name| Reward::compile(name, &self.rewards))
            .transpose()
            .map_err(failed_to("compiling the reward"))
    }

    pub fn task<'t>(&'t self, train: &'t [StoredRecord], reward: Option<&'t Reward>) -> Task<'t> {
        let choice = self
            .eval
            .spec
            .reward
            .as_ref()
            .and_then(|r| self.rewards.get(r));
        let (values, choices, gold) = match choice {
            Some(RewardSpec::MultipleChoice(c)) => {
                (c.values.clone(), c.choices.clone(), c.gold.clone())
            }
            _ => (RewardValues::default(), "choices".into(), "gold".into()),
        };
        let multiple_choice = matches!(choice, Some(RewardSpec::MultipleChoice(_)));
        Task {
            eval: &self.eval,
            train,
            reward,
            values,
            choices,
            multiple_choice,
            gold,
        }
    }

    /// Evaluates `items` with one model, resuming from the checkpoint of finished batches.
    pub(super) fn evaluate_with(
        &self,
        ctx: &StageContext,
        task: &Task,
        model: &crate::model::Model,
        with: &str,
        items: &[&StoredRecord],
    ) -> Result<(Vec<Sample>, Timing), StageError> {
        let checkpoint = ctx.checkpoint_dir.join(format!("{with}.jsonl"));
        let mut done = read_checkpoint(&checkpoint);
        let finished: BTreeSet<&str> = done.iter().map(|s| s.id.as_str()).collect();
        let mut todo: Vec<&StoredRecord> = items
            .iter()
            .copied()
            .filter(|r| !finished.contains(r.id.as_str()))
            .collect();
        task.sort_for_batching(&mut todo);
        let mut progress = ctx.progress(items.len() as u64, "items");
        progress.advance(done.len() as u64, String::new());
        let mut append = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&checkpoint)
            .map_err(|e| StageError::at("opening", &checkpoint, e))?;
        let total = items.len();
        let timing = run_batches(
            task,
            model,
            with,
            &todo,
            self.eval.spec.batch_size as usize,
            &mut |samples, seconds| {
                ctx.check_interrupt()?;
                for s in samples {
                    let line = serde_json::to_string(s).map_err(failed_to("saving samples"))?;
                    writeln!(append, "{line}")
                        .map_err(|e| StageError::at("writing", &checkpoint, e))?;
                }
                append
                    .sync_data()
                    .map_err(|e| StageError::at("writing", &checkpoint, e))?;
                done.extend(samples.iter().cloned());
                let correct = done
                    .iter()
                    .filter(|s| s.verdict == crate::reward::Verdict::Correct)
                    .count();
                let acc = correct as f64 / done.len().max(1) as f64;
                ctx.metrics.log(json!({
                    "with": with, "items_done": done.len(), "items_total": total,
                    "running_acc": acc, "batch_seconds": seconds,
                }));
                progress.advance(samples.len() as u64, format!("acc {:.1}%", 100.0 * acc));
                Ok(())
            },
        )?;
        // Back in split order, whatever order batches ran or resumed in.
        let position: BTreeMap<&str, usize> = items
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id.as_str(), i))
            .collect();
        done.retain(|s| position.contains_key(s.id.as_str()));
        done.sort_by_key(|s| position[s.id.as_str()]);
        done.dedup_by(|a, b| a.id == b.id);
        Ok((done, timing))
    }
}

/// The records shots may come from.
pub fn train_split(records: &[StoredRecord]) -> Vec<StoredRecord> {
    records
        .iter()
        .filter(|r| r.split == "train")
        .cloned()
        .collect()
}

/// Samples saved by an earlier, interrupted attempt; a torn last line is dropped.
fn read_checkpoint(path: &Path) -> Vec<Sample> {
    let Ok(file) = crate::fsutil::open_regular(path) else {
        return vec![];
    };
    std::io::BufReader::new(file.take(crate::fsutil::MAX_LOG_BYTES))
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str(&line).ok())
        .collect()
}

fn write_samples(path: &Path, samples: &[Sample]) -> Result<(), StageError> {
    let col = |name: &str, v: Vec<Option<String>>| Column::new(name.into(), v);
    let text = |f: &dyn Fn(&Sample) -> Option<String>| samples.iter().map(f).collect::<Vec<_>>();
    let mut df = DataFrame::new_infer_height(vec![
        col("with", text(&|s| Some(s.with.clone()))),
        col("id", text(&|s| Some(s.id.clone()))),
        col("prompt", text(&|s| Some(s.prompt.clone()))),
        col("completion", text(&|s| s.completion.clone())),
        col(
            "options",
            text(&|s| s.options.as_ref().map(|o| json!(o).to_string())),
        ),
        col(
            "option_logliks",
            text(&|s| s.option_logliks.as_ref().map(|o| json!(o).to_string())),
        ),
        col("extracted", text(&|s| s.extracted.clone())),
        col("gold", text(&|s| Some(s.gold.clone()))),
        col(
            "verdict",
            text(&|s| Some(crate::hash::serde_name(&s.verdict))),
        ),
        Column::new(
            "reward".into(),
            samples.iter().map(|s| s.reward).collect::<Vec<f64>>(),
        ),
        Column::new(
            "correct_norm".into(),
            samples
                .iter()
                .map(|s| s.correct_norm)
                .collect::<Vec<Option<bool>>>(),
        ),
        col("detail", text(&|s| s.detail.clone())),
        col("route_label", text(&|s| s.route_label.clone())),
        col("routed_to", text(&|s| s.routed_to.clone())),
        col("finish_reason", text(&|s| s.finish_reason.clone())),
        Column::new(
            "prompt_tokens".into(),
            samples
                .iter()
                .map(|s| s.prompt_tokens as u64)
                .collect::<Vec<u64>>(),
        ),
        Column::new(
            "new_tokens".into(),
            samples
                .iter()
                .map(|s| s.new_tokens as u64)
                .collect::<Vec<u64>>(),
        ),
    ])
    .map_err(failed_to("building the samples table"))?;
    crate::data::write_parquet(path, &mut df).map_err(|e| StageError::at("writing", path, e))
}
