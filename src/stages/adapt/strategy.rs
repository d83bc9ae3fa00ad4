//! A two-pass adaptation strategy as the adapt stage runs it: which stages it reads, how `plan`
//! describes it, and what it prepares. Each strategy implements [`Strategy`] for its options
//! type; [`of`] is the one place that maps a pipeline's adaptation to it.
//!
//! Adding a strategy: its options in `adapt/spec.rs` (a variant of `AdaptationSpec`), its
//! checks in `pipeline/check_adapt.rs`, an implementation here (or beside the stage, as
//! `few_shot.rs`) and a line in [`of`]. A strategy that neither routes (`Routing`) nor mixes
//! also needs its second pass taught to `stages/eval/adapted.rs`, `adapter.rs` and the
//! report's `collect/adaptation.rs`.

use serde_json::Value;

use super::runner::{AdaptStage, FirstPass};
use crate::adapt::spec::{AdaptationSpec, ClassifierAdaptation, ClassifyMode, PromptAdaptation};
use crate::dag::StageId;
use crate::exec::{StageContext, StageError};
use crate::model::Model;
use crate::pipeline::spec::PipelineSpec;
use crate::stages::ids;
use crate::stages::model::ModelRecord;

pub trait Strategy {
    /// The stages it reads besides `model`, in order.
    fn deps(&self, spec: &PipelineSpec) -> Vec<StageId>;
    /// The reward it judges with, if any (its config joins the stage's cache key).
    fn reward(&self) -> Option<&str> {
        None
    }
    /// One line for `tsq plan`.
    fn describe(&self) -> String;
    /// Prepares the strategy in the stage's directory; the stage's summary.
    fn prepare(
        &self,
        stage: &AdaptStage,
        ctx: &StageContext,
        model: &Model,
        record: &ModelRecord,
    ) -> Result<Value, StageError>;
}

/// The strategy of an adaptation.
pub fn of(spec: &AdaptationSpec) -> &dyn Strategy {
    match spec {
        AdaptationSpec::Prompt(p) => p,
        AdaptationSpec::Classifier(c) => c,
        AdaptationSpec::FewShot(f) => f,
    }
}

/// The datasets of the experts a routing's labels lead to, each once.
fn routed_data(experts: &[&str], spec: &PipelineSpec) -> Vec<StageId> {
    let mut deps: Vec<StageId> = Vec::new();
    for e in experts {
        let data = ids::data(&spec.experts[*e].dataset);
        if !deps.contains(&data) {
            deps.push(data);
        }
    }
    deps
}

/// The model classifies each input with a prompt template (the paper's first strategy): the
/// label prior on the routed experts' train prompts, a routing check on their val prompts,
/// saved with the template as `router.json`.
impl Strategy for PromptAdaptation {
    fn deps(&self, spec: &PipelineSpec) -> Vec<StageId> {
        use crate::adapt::spec::Routing;
        routed_data(&self.experts(&spec.experts), spec)
    }

    fn describe(&self) -> String {
        format!(
            "prompt routing ({} mode) over {}",
            crate::hash::serde_name(&self.mode),
            self.labels.join(", ")
        )
    }

    fn prepare(
        &self,
        stage: &AdaptStage,
        ctx: &StageContext,
        model: &Model,
        _: &ModelRecord,
    ) -> Result<Value, StageError> {
        let tasks = stage.tasks(ctx, self)?;
        let calibration = match self.mode {
            ClassifyMode::Score => self.calibration,
            ClassifyMode::Generate => 0,
        };
        let first_pass = FirstPass {
            mode: self.mode,
            calibration,
            check: self.check,
            expert: None,
        };
        stage.routing(ctx, model, self, &tasks, first_pass)
    }
}

/// A classification expert trained with the RL trainer on the routed experts' train prompts
/// (the paper's second strategy), then the same routing check with it applied.
impl Strategy for ClassifierAdaptation {
    fn deps(&self, spec: &PipelineSpec) -> Vec<StageId> {
        use crate::adapt::spec::Routing;
        let mut deps = vec![ids::decompose()];
        deps.extend(routed_data(&self.experts(&spec.experts), spec));
        deps
    }

    fn describe(&self) -> String {
        format!(
            "classifier routing over {}, trained {} steps on {} examples per expert",
            self.labels.join(", "),
            self.train.steps,
            self.examples
        )
    }

    fn prepare(
        &self,
        stage: &AdaptStage,
        ctx: &StageContext,
        model: &Model,
        _: &ModelRecord,
    ) -> Result<Value, StageError> {
        let tasks = stage.tasks(ctx, self)?;
        let trained = stage.train_classifier(ctx, self, &tasks)?;
        let mut classifying = model.clone();
        let file = ctx.output(crate::stages::train::EXPERT_FILE);
        crate::svf::compose_expert_file(&mut classifying, &file, &stage.shared.home)
            .map_err(|e| StageError::at("applying the classifier", &file, e))?;
        let first_pass = FirstPass {
            mode: ClassifyMode::Score,
            calibration: 0,
            check: self.check,
            expert: Some(crate::stages::train::EXPERT_FILE.into()),
        };
        let mut out = stage.routing(ctx, &classifying, self, &tasks, first_pass)?;
        out["training"] = trained;
        Ok(out)
    }
}
