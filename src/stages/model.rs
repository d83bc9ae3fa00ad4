//! The `model` kind: one stage fetching and identifying the base model.

use super::{Declared, Env, Kind, to_json};
use crate::dag::Stage;
use crate::exec::StageRunner;
use crate::model::stage::ModelStage;
use crate::pipeline::Pipeline;

pub struct ModelKind;

impl Kind for ModelKind {
    fn name(&self) -> &'static str {
        "model"
    }

    fn version(&self) -> u32 {
        1
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        vec![Declared {
            id: "model".into(),
            subject: None,
            deps: vec![],
            config: to_json(&p.spec.model),
            pointer: "/model".into(),
        }]
    }

    fn runner<'a>(&self, env: &'a Env<'a>, _: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        let p = env.pipeline;
        Some(Box::new(ModelStage {
            spec: p.spec.model.clone(),
            base_dir: p.dir().to_path_buf(),
            home: env.shared.home.clone(),
        }))
    }
}
