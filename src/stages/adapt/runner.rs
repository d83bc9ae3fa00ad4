//! The `adapt.<name>` stage: what an adaptation prepares before evaluation can use it (each
//! strategy's part is its [`super::strategy::Strategy`]), and the routing machinery the routing
//! strategies share.
//! - `prompt`: the label prior on the routed experts' train prompts (calibration) and a routing
//!   check on their val prompts, saved with the template as `router.json` ([`super::router`]);
//! - `classifier`: a classification expert trained with the RL trainer on the routed experts'
//!   train prompts (`expert.safetensors`, `training.json`, `examples.json`, a metrics line per
//!   step, resumable),
//!   then the same routing check with it applied, in `router.json`;
//! - `few_shot`: the CEM search of mixing weights on the target task's shots, saved as
//!   `expert.safetensors` (the mixture, as `tsq expert combine` writes it) and `alpha.json`;
//!   `metrics.jsonl` has a line per generation, and a killed search resumes from the last
//!   finished generation.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{Value, json};

use super::strategy;
use crate::adapt::classify::{Classified, Classifier, answer};
use crate::adapt::router::{self, ROUTER_FILE, Route, Router, RouterFile};
use crate::adapt::spec::{AdaptationSpec, ClassifierAdaptation, ClassifyMode, Routing};
use crate::data::stored::StoredRecord;
use crate::data::template::TemplateFile;
use crate::exec::{StageContext, StageError, StageRunner, failed_to};
use crate::model::Model;
use crate::reward::spec::RewardSpec;
use crate::rl::spec::ExpertSpec;
use crate::stages::Shared;
use crate::stages::data::read_stored;
use crate::stages::model::ModelRecord;

/// Inputs classified per batch of the first pass.
const ROUTE_BATCH: usize = 16;

pub struct AdaptStage<'a> {
    pub name: String,
    pub spec: AdaptationSpec,
    pub experts: BTreeMap<String, ExpertSpec>,
    pub rewards: BTreeMap<String, RewardSpec>,
    /// The classifier template's path (routing strategies).
    pub template: Option<std::path::PathBuf>,
    pub seed: u64,
    pub shared: &'a Shared,
}

impl StageRunner for AdaptStage<'_> {
    fn inputs(&self) -> Result<BTreeMap<String, String>, StageError> {
        let mut inputs = BTreeMap::new();
        if let Some(t) = &self.template {
            inputs.insert("template".into(), crate::exec::file_input(t)?);
        }
        Ok(inputs)
    }

    fn describe(&self) -> Option<String> {
        Some(strategy::of(&self.spec).describe())
    }

    fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let record = ModelRecord::from_upstream(ctx)?;
        let model = self.shared.model(&record)?;
        strategy::of(&self.spec).prepare(self, ctx, &model, &record)
    }
}

/// A routed expert, its dataset and that dataset's records.
pub(super) type RoutedTask<'a> = (&'a str, &'a str, Vec<StoredRecord>);

/// How a routing strategy's first pass is prepared.
pub(super) struct FirstPass {
    pub(super) mode: ClassifyMode,
    /// Train prompts per task for the label prior (0: none).
    pub(super) calibration: u32,
    /// Val prompts per task for the routing check.
    pub(super) check: u32,
    /// The classification expert applied in the first pass (a file of the stage).
    pub(super) expert: Option<String>,
}

impl AdaptStage<'_> {
    /// Each expert some label leads to, with its dataset's records.
    pub(super) fn tasks<'a>(
        &'a self,
        ctx: &StageContext,
        r: &'a dyn Routing,
    ) -> Result<Vec<RoutedTask<'a>>, StageError> {
        r.experts(&self.experts)
            .into_iter()
            .map(|expert| {
                let dataset = self.experts[expert].dataset.as_str();
                let records = read_stored(ctx.upstream_dir(&crate::stages::ids::data(dataset))?)?;
                Ok((expert, dataset, records))
            })
            .collect()
    }

    /// Calibrates the router on train prompts and checks it on val prompts of each routed
    /// expert's task; `model` is the first pass's model.
    pub(super) fn routing(
        &self,
        ctx: &StageContext,
        model: &Model,
        r: &dyn Routing,
        tasks: &[RoutedTask],
        first_pass: FirstPass,
    ) -> Result<Value, StageError> {
        let calibration = pick(tasks, "train", first_pass.calibration);
        let check = pick(tasks, "val", first_pass.check);
        let template = self.template.as_ref().expect("routing template");
        let template = crate::fsutil::read_bounded(template, crate::fsutil::MAX_TEXT_BYTES)
            .map_err(failed_to("reading the classifier template"))?;
        let mut file = RouterFile {
            strategy: self.spec.strategy().into(),
            mode: first_pass.mode,
            template,
            labels: r.labels().to_vec(),
            targets: r
                .labels()
                .iter()
                .map(|l| r.target(l, &self.experts).to_string())
                .collect(),
            first_pass_expert: first_pass.expert,
            prior: None,
            calibration_items: count_by_dataset(tasks, &calibration),
            expert_datasets: tasks
                .iter()
                .map(|(e, d, _)| (e.to_string(), d.to_string()))
                .collect(),
            check: None,
        };
        let router = Router::new(file.clone()).map_err(failed_to("building the router"))?;
        let mut progress = ctx.progress((calibration.len() + check.len()) as u64, "prompts");
        if !calibration.is_empty() {
            let prompts: Vec<String> = calibration.iter().map(|(_, r)| r.prompt.clone()).collect();
            let (raw, _) = classify_batches(ctx, &router, model, &prompts, &mut progress)?;
            file.prior = Some(router.classifier().prior(&raw));
        }
        let router = Router::new(file.clone()).map_err(failed_to("building the router"))?;
        if !check.is_empty() {
            let prompts: Vec<String> = check.iter().map(|(_, r)| r.prompt.clone()).collect();
            let (raw, seconds) = classify_batches(ctx, &router, model, &prompts, &mut progress)?;
            let routes: Vec<Route> = raw.iter().map(|r| router.follow(r)).collect();
            let truth: Vec<&str> = check.iter().map(|(e, _)| *e).collect();
            let result = router::check("val", &truth, &routes, seconds);
            ctx.metrics.log(json!({"check": &result}));
            file.check = Some(result);
        }
        crate::fsutil::write_json(&ctx.output(ROUTER_FILE), &file)
            .map_err(|e| StageError::at("writing", &ctx.output(ROUTER_FILE), e))?;
        Ok(json!({
            "prior": file.prior,
            "routing_accuracy": file.check.as_ref().map(|c| c.accuracy.value),
        }))
    }

    /// Trains the classification expert with the RL trainer on labelled train-split prompts of
    /// the routed experts' tasks (validated on their val split): the options are the labels'
    /// answers, the right one the label leading to the prompt's expert.
    pub(super) fn train_classifier(
        &self,
        ctx: &StageContext,
        c: &ClassifierAdaptation,
        tasks: &[RoutedTask],
    ) -> Result<Value, StageError> {
        let template = TemplateFile::load(self.template.as_ref().expect("routing template"))
            .map_err(failed_to("reading the classifier template"))?;
        let classifier = Classifier::new(template, c.labels.clone())
            .map_err(failed_to("building the classifier"))?;
        let answers: Vec<String> = c.labels.iter().map(|l| answer(l)).collect();
        let mut records = Vec::new();
        for task in tasks {
            let (expert, dataset, _) = task;
            let gold = c
                .labels
                .iter()
                .position(|l| c.target(l, &self.experts) == *expert)
                .expect("a routed expert is some label's target");
            for split in ["train", "val"] {
                for (_, r) in pick(std::slice::from_ref(task), split, c.examples) {
                    let question = classifier.prompt(&r.prompt).map_err(|e| {
                        StageError::failed(format!("rendering the question for `{}`", r.id), e)
                    })?;
                    let fields = json!({"choices": answers, "gold": gold});
                    records.push(StoredRecord {
                        id: format!("{dataset}/{}", r.id),
                        split: split.into(),
                        prompt: question,
                        target: None,
                        fields: fields.as_object().cloned().unwrap_or_default(),
                    });
                }
            }
        }
        let listed: Vec<Value> = records
            .iter()
            .map(|r| json!({"id": r.id, "split": r.split, "gold": r.fields["gold"]}))
            .collect();
        crate::fsutil::write_json(&ctx.output(EXAMPLES_FILE), &listed)
            .map_err(|e| StageError::at("writing", &ctx.output(EXAMPLES_FILE), e))?;
        let reward: RewardSpec = serde_json::from_value(json!({"kind": "multiple_choice"}))
            .expect("a multiple_choice reward with its defaults");
        let trainer = crate::stages::train::TrainStage {
            name: self.name.clone(),
            expert: ExpertSpec {
                dataset: format!("{} examples", self.name),
                reward: LABEL_REWARD.into(),
                init_from: None,
                train: c.training(),
            },
            rewards: BTreeMap::from([(LABEL_REWARD.to_string(), reward)]),
            seed: self.seed,
            version: "adapt/2".into(),
            shared: self.shared,
        };
        trainer.train_on(ctx, &records)
    }
}

/// The classifier's labelled examples: `<dataset>/<id>`, split and the right label's index.
pub const EXAMPLES_FILE: &str = "examples.json";

/// The classifier's reward: the right label's answer.
const LABEL_REWARD: &str = "label";

/// The first `n` records of `split` of each task, with their expert.
fn pick<'a>(tasks: &'a [RoutedTask], split: &str, n: u32) -> Vec<(&'a str, &'a StoredRecord)> {
    tasks
        .iter()
        .flat_map(|(e, _, records)| {
            let of_split = records.iter().filter(move |r| r.split == split);
            of_split.take(n as usize).map(move |r| (*e, r))
        })
        .collect()
}

/// Inputs per dataset among `picked`.
fn count_by_dataset(
    tasks: &[RoutedTask],
    picked: &[(&str, &StoredRecord)],
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (expert, dataset, _) in tasks {
        let n = picked.iter().filter(|(e, _)| e == expert).count();
        out.insert(dataset.to_string(), n);
    }
    out
}

/// The router's raw first pass over `inputs` in batches (interruptible, with progress), and its
/// wall time.
pub fn classify_batches(
    ctx: &StageContext,
    router: &Router,
    model: &Model,
    inputs: &[String],
    progress: &mut crate::exec::Progress,
) -> Result<(Vec<Classified>, f64), StageError> {
    let started = Instant::now();
    let mut out = Vec::with_capacity(inputs.len());
    for batch in inputs.chunks(ROUTE_BATCH) {
        ctx.check_interrupt()?;
        out.extend(
            router
                .classify(model, batch)
                .map_err(failed_to("classifying inputs"))?,
        );
        progress.advance(batch.len() as u64, String::new());
    }
    Ok((out, started.elapsed().as_secs_f64()))
}
