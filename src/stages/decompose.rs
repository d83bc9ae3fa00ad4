//! The `decompose` kind: the SVD of the selected matrices, when the pipeline has `svd`.

use super::{Declared, Env, Kind, to_json};
use crate::dag::Stage;
use crate::exec::StageRunner;
use crate::pipeline::Pipeline;
use crate::svd::stage::DecomposeStage;

pub struct DecomposeKind;

impl Kind for DecomposeKind {
    fn name(&self) -> &'static str {
        "decompose"
    }

    fn version(&self) -> u32 {
        1
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        p.spec
            .svd
            .iter()
            .map(|svd| Declared {
                id: "decompose".into(),
                subject: None,
                deps: vec!["model".into()],
                config: to_json(svd),
                pointer: "/svd".into(),
            })
            .collect()
    }

    fn runner<'a>(&self, env: &'a Env<'a>, _: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        let p = env.pipeline;
        Some(Box::new(DecomposeStage {
            spec: p.spec.svd.clone()?,
            model_source: p.spec.model.source.clone(),
            base_dir: p.dir().to_path_buf(),
            shared: &env.shared,
        }))
    }
}
