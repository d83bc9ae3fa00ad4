//! The `train` kind: one `train.<expert>` stage per expert. Declared (so pipelines can be
//! written ahead and planned) but not runnable in this version.

use serde_json::json;

use super::{Declared, Env, Kind, rewards_config, to_json};
use crate::dag::Stage;
use crate::exec::StageRunner;
use crate::pipeline::Pipeline;

pub struct TrainKind;

impl Kind for TrainKind {
    fn name(&self) -> &'static str {
        "train"
    }

    fn version(&self) -> u32 {
        1
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        let spec = &p.spec;
        spec.experts
            .iter()
            .map(|(name, ex)| {
                let mut deps = vec!["model".to_string(), format!("data.{}", ex.dataset)];
                if spec.svd.is_some() {
                    deps.push("decompose".into());
                }
                deps.extend(ex.init_from.iter().map(|from| format!("train.{from}")));
                Declared {
                    id: format!("train.{name}"),
                    subject: Some(name.clone()),
                    deps,
                    config: json!({"expert": to_json(ex), "rewards": rewards_config(&spec.rewards, &ex.reward), "seed": spec.seed}),
                    pointer: format!("/experts/{name}"),
                }
            })
            .collect()
    }

    fn runner<'a>(&self, _: &'a Env<'a>, _: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        None
    }
}
