//! The `adapt.<name>` stage: what an adaptation prepares before evaluation can use it.
//! - `prompt`: the label prior on the routed experts' train prompts (calibration) and a routing
//!   check on their val prompts, saved with the template as `router.json` ([`super::router`]);
//! - `few_shot`: the CEM search of mixing weights on the target task's shots, saved as
//!   `expert.safetensors` (the mixture, as `tsq expert combine` writes it) and `alpha.json`;
//!   `metrics.jsonl` has a line per generation, and a killed search resumes from the last
//!   finished generation.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{Value, json};

use super::classify::Classified;
use super::router::{self, ROUTER_FILE, Route, Router, RouterFile};
use crate::data::stage::{StoredRecord, read_stored};
use crate::exec::{StageContext, StageError, StageRunner, failed_to};
use crate::model::Model;
use crate::model::stage::ModelRecord;
use crate::pipeline::spec::{
    AdaptationSpec, ClassifyMode, ExpertSpec, PromptAdaptation, RewardSpec, Routing,
};
use crate::stages::Shared;

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
        Some(match &self.spec {
            AdaptationSpec::Prompt(p) => format!(
                "prompt routing ({} mode) over {}",
                crate::hash::serde_name(&p.mode),
                p.labels.join(", ")
            ),
            AdaptationSpec::Classifier(_) => "classifier routing".into(),
            AdaptationSpec::FewShot(f) => format!(
                "CEM mixing of {} on {} `{}` {} shots, {} generations of {}",
                f.experts.join(", "),
                f.shots,
                f.dataset,
                f.split.as_str(),
                f.cem.generations,
                f.cem.population
            ),
        })
    }

    fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let record = ModelRecord::from_upstream(ctx)?;
        let model = self.shared.model(&record.path)?;
        match &self.spec {
            AdaptationSpec::Prompt(p) => self.prompt(ctx, &model, p),
            AdaptationSpec::FewShot(f) => super::few_shot::run(self, ctx, &model, &record, f),
            // The kind builds no runner for it (`run` refuses it up front); kept total anyway.
            AdaptationSpec::Classifier(_) => Err(StageError::failed(
                format!("preparing `{}`", self.name),
                "the classifier strategy is not available in this version",
            )),
        }
    }
}

impl AdaptStage<'_> {
    /// Calibrates the router on train prompts and checks it on val prompts of each routed
    /// expert's task.
    fn prompt(
        &self,
        ctx: &StageContext,
        model: &Model,
        p: &PromptAdaptation,
    ) -> Result<Value, StageError> {
        let routed = p.experts(&self.experts);
        let mut tasks: Vec<(&str, &str, Vec<StoredRecord>)> = Vec::new();
        for expert in &routed {
            let dataset = self.experts[*expert].dataset.as_str();
            let records = read_stored(ctx.upstream_dir(&format!("data.{dataset}"))?)?;
            tasks.push((expert, dataset, records));
        }
        let pick = |split: &str, n: u32| -> Vec<(&str, &StoredRecord)> {
            tasks
                .iter()
                .flat_map(|(e, _, records)| {
                    let of_split = records.iter().filter(move |r| r.split == split);
                    of_split.take(n as usize).map(move |r| (*e, r))
                })
                .collect()
        };
        let calibration = if p.mode == ClassifyMode::Score {
            pick("train", p.calibration)
        } else {
            vec![]
        };
        let check = pick("val", p.check);
        let template = std::fs::read_to_string(self.template.as_ref().expect("routing template"))
            .map_err(failed_to("reading the classifier template"))?;
        let mut file = RouterFile {
            strategy: self.spec.strategy().into(),
            mode: p.mode,
            template,
            labels: p.labels.clone(),
            targets: p
                .labels
                .iter()
                .map(|l| p.target(l, &self.experts).to_string())
                .collect(),
            prior: None,
            calibration_items: count_by_dataset(&tasks, &calibration),
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
}

/// Inputs per dataset among `picked`.
fn count_by_dataset(
    tasks: &[(&str, &str, Vec<StoredRecord>)],
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
