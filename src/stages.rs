//! Wiring: which runner implements each kind of stage. The executor only sees the
//! [`StageRunner`] trait; this is the one place that maps stage kinds to the modules doing the work.

use crate::assets::TsqHome;
use crate::dag::{Stage, StageKind};
use crate::data::stage::DataStage;
use crate::exec::StageRunner;
use crate::model::stage::ModelStage;
use crate::pipeline::Pipeline;

/// The runner for `stage`, or `None` for kinds this version cannot run.
pub fn runner_for<'a>(
    pipeline: &'a Pipeline,
    home: &'a TsqHome,
    stage: &Stage,
) -> Option<Box<dyn StageRunner + 'a>> {
    let spec = &pipeline.spec;
    match &stage.kind {
        StageKind::Model => Some(Box::new(ModelStage {
            spec: spec.model.clone(),
            base_dir: pipeline.dir().to_path_buf(),
            home: home.clone(),
        })),
        StageKind::Data { dataset } => {
            let ds = spec.datasets.get(dataset)?;
            Some(Box::new(DataStage {
                name: dataset.clone(),
                spec: ds.clone(),
                card: pipeline.cards.get(dataset)?.clone(),
                prompt: pipeline.path(&ds.prompt),
                target: ds.target.as_ref().map(|t| pipeline.path(t)),
                seed: ds.split.seed.unwrap_or(spec.seed),
                home: home.clone(),
            }))
        }
        StageKind::Decompose => Some(Box::new(crate::svd::stage::DecomposeStage {
            spec: spec.svd.clone()?,
            model_source: spec.model.source.clone(),
            base_dir: pipeline.dir().to_path_buf(),
            home: home.clone(),
        })),
        StageKind::Train { .. } | StageKind::Adapt | StageKind::Eval { .. } | StageKind::Report => {
            None
        }
    }
}
