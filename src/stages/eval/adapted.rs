//! Evaluating through adaptations: the models an evaluation answers with (base, experts and
//! mixtures, each composed once per stage), and routed evaluation — the first pass routes every
//! item (saved, so a resumed stage does not route again), then each expert answers its items as
//! one group, so items routed to different experts still run in batches.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use super::runner::{EvalStage, Timing};
use crate::adapt::router::{ROUTER_FILE, Route, Router};
use crate::adapt::spec::BASE;
use crate::data::stored::StoredRecord;
use crate::eval::Proportion;
use crate::eval::results::AdaptationResult;
use crate::eval::runner::{Sample, Task};
use crate::exec::{StageContext, StageError, file_input};
use crate::model::Model;
use crate::stages::Shared;
use crate::stages::adapt::classify_batches;
use crate::stages::adapt::few_shot::{ALPHA_FILE, AlphaFile};
use crate::stages::model::ModelRecord;
use crate::svf::Composed;

/// The base model and the adapted models made from it, composed on first use, with the hashes
/// of the expert files used.
pub struct Models {
    composed: Composed,
    /// Content hashes of the expert files used (inputs of the results).
    pub hashes: BTreeMap<String, String>,
}

impl Models {
    pub fn new(shared: &Shared, record: &ModelRecord) -> Result<Self, StageError> {
        Ok(Self {
            composed: Composed::new(shared.model(record)?, shared.home.clone()),
            hashes: BTreeMap::new(),
        })
    }

    /// `base` or the expert of that name (from its `train.<name>` stage).
    pub fn named(&mut self, ctx: &StageContext, name: &str) -> Result<Rc<Model>, StageError> {
        if name == BASE {
            return Ok(Rc::clone(&self.composed.base));
        }
        let file = ctx
            .upstream_dir(&crate::stages::ids::train(name))?
            .join(crate::stages::train::EXPERT_FILE);
        self.expert(name, &file)
    }

    /// The base model with the expert in `file` composed into it, known as `label`.
    pub fn expert(&mut self, label: &str, file: &Path) -> Result<Rc<Model>, StageError> {
        let hash = file_input(file)?;
        self.hashes.insert(format!("expert.{label}"), hash);
        self.composed
            .with_expert(label, file)
            .map_err(|e| StageError::at("applying the expert", file, e))
    }
}

/// The first pass's routes, kept across kills.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct SavedRoutes {
    routes: BTreeMap<String, Route>,
    /// Wall time and items of the first passes that made them.
    seconds: f64,
    items: usize,
}

impl EvalStage<'_> {
    /// Routes every item with the adaptation's first pass, then answers each expert's items
    /// with that expert.
    pub(super) fn evaluate_routed(
        &self,
        ctx: &StageContext,
        task: &Task,
        models: &mut Models,
        with: &str,
        items: &[&StoredRecord],
        strategy: &str,
    ) -> Result<(Vec<Sample>, Timing, Option<AdaptationResult>), StageError> {
        let dir = ctx.upstream_dir(&crate::stages::ids::adapt(with))?;
        let router = Router::load(&dir.join(ROUTER_FILE))
            .map_err(|e| StageError::failed("loading the router", e))?;
        let first_pass = match &router.file.first_pass_expert {
            Some(file) => models.expert(&format!("{with} (first pass)"), &dir.join(file))?,
            None => models.named(ctx, BASE)?,
        };
        let saved = self.route(ctx, &router, &first_pass, with, items)?;
        let mut groups: BTreeMap<&str, Vec<&StoredRecord>> = BTreeMap::new();
        for item in items {
            groups
                .entry(saved.routes[&item.id].target.as_str())
                .or_default()
                .push(item);
        }
        let (mut samples, mut timing) = (Vec::new(), Timing::default());
        for (target, group) in &groups {
            let model = models.named(ctx, target)?;
            let (answered, t) = self.evaluate_with(ctx, task, &model, with, group)?;
            timing.add(&t);
            samples.extend(answered);
        }
        let position: BTreeMap<&str, usize> = items
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id.as_str(), i))
            .collect();
        samples.sort_by_key(|s| position[s.id.as_str()]);
        for s in &mut samples {
            let route = &saved.routes[&s.id];
            s.route_label = Some(route.label.clone());
            s.routed_to = Some(route.target.clone());
        }
        let expected = router
            .file
            .expert_datasets
            .iter()
            .find(|(_, d)| **d == self.eval.spec.dataset)
            .map(|(e, _)| e.clone());
        let per_item = |seconds: f64, n: usize| (n > 0).then(|| seconds / n as f64);
        let first = per_item(saved.seconds, saved.items);
        let second = per_item(timing.seconds, timing.items);
        let result = AdaptationResult {
            strategy: strategy.into(),
            routed: groups
                .iter()
                .map(|(t, g)| (t.to_string(), g.len()))
                .collect(),
            routing_accuracy: expected.as_ref().map(|e| {
                let right = samples.iter().filter(|s| s.routed_to.as_ref() == Some(e));
                Proportion::of(right.count(), samples.len())
            }),
            expected,
            first_pass_seconds_per_item: first,
            second_pass_seconds_per_item: second,
            first_pass_fraction: first.zip(second).map(|(a, b)| a / b),
            ..AdaptationResult::default()
        };
        Ok((samples, timing, Some(result)))
    }

    /// Every item's route: those saved by an earlier attempt, the rest from a first pass.
    fn route(
        &self,
        ctx: &StageContext,
        router: &Router,
        base: &Model,
        with: &str,
        items: &[&StoredRecord],
    ) -> Result<SavedRoutes, StageError> {
        let path = ctx.checkpoint_dir.join(format!("{with}.routes.json"));
        let mut saved: SavedRoutes =
            crate::fsutil::read_json(&path, crate::fsutil::MAX_TEXT_BYTES).unwrap_or_default();
        let todo: Vec<&StoredRecord> = items
            .iter()
            .copied()
            .filter(|r| !saved.routes.contains_key(&r.id))
            .collect();
        if todo.is_empty() {
            return Ok(saved);
        }
        let inputs: Vec<String> = todo.iter().map(|r| r.prompt.clone()).collect();
        let mut progress = ctx.progress(inputs.len() as u64, "routed");
        let (raw, seconds) = classify_batches(ctx, router, base, &inputs, &mut progress)?;
        for (item, r) in todo.iter().zip(&raw) {
            saved.routes.insert(item.id.clone(), router.follow(r));
        }
        saved.seconds += seconds;
        saved.items += todo.len();
        crate::fsutil::write_json(&path, &saved)
            .map_err(|e| StageError::at("writing", &path, e))?;
        Ok(saved)
    }
}

/// What a mixture's search found, from its `alpha.json`.
pub fn mixture_result(dir: &Path, strategy: &str) -> Result<AdaptationResult, StageError> {
    let path = dir.join(ALPHA_FILE);
    let alpha: AlphaFile = crate::fsutil::read_json(&path, crate::fsutil::MAX_TEXT_BYTES)
        .map_err(|e| StageError::at("reading", &path, e))?;
    Ok(AdaptationResult {
        strategy: strategy.into(),
        search_seconds: Some(alpha.search_seconds),
        alpha: Some(alpha.alpha),
        ..AdaptationResult::default()
    })
}
