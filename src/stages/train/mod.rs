//! The `train` kind: one `train.<expert>` stage per expert (the runner: [`runner`]).

mod runner;

pub use runner::{EXPERT_FILE, TrainStage};

use serde_json::json;

use super::{Declared, Env, Kind, ids, rewards_config, to_json};
use crate::dag::Stage;
use crate::exec::StageRunner;
use crate::pipeline::Pipeline;

pub struct TrainKind;

impl Kind for TrainKind {
    fn name(&self) -> &'static str {
        "train"
    }

    /// 2: the first version that trains.
    fn version(&self) -> u32 {
        2
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        let spec = &p.spec;
        spec.experts
            .iter()
            .map(|(name, ex)| {
                let mut deps = vec![ids::model(), ids::data(&ex.dataset)];
                if spec.svd.is_some() {
                    deps.push(ids::decompose());
                }
                deps.extend(ex.init_from.iter().map(|from| ids::train(from)));
                Declared {
                    id: ids::train(name),
                    subject: Some(name.clone()),
                    deps,
                    config: json!({"expert": to_json(ex), "rewards": rewards_config(&spec.rewards, &ex.reward), "seed": spec.seed}),
                    pointer: format!("/experts/{name}"),
                }
            })
            .collect()
    }

    fn runner<'a>(&self, env: &'a Env<'a>, stage: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        let name = stage.subject.as_deref()?;
        let spec = &env.pipeline.spec;
        Some(Box::new(TrainStage {
            name: name.to_string(),
            expert: spec.experts.get(name)?.clone(),
            rewards: spec.rewards.clone(),
            seed: spec.seed,
            version: format!("{}/{}", self.name(), self.version()),
            shared: &env.shared,
        }))
    }
}
