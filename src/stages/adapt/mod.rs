//! The `adapt` kind: one `adapt.<name>` stage per adaptation: the runner ([`runner`]: routing
//! checks, the classifier's training), the few-shot search ([`few_shot`]: CEM over α, resumable
//! per generation) and a finished run's adaptation for `generate --adapt` and `chat`
//! ([`adapter`]).
//!
//! Routing strategies depend on the routed experts' datasets (calibration, the classifier's
//! examples, the routing check; the classifier also on the decomposition); few-shot mixing on
//! the target task's data, the decomposition and the experts it mixes.

pub mod adapter;
pub mod few_shot;
mod runner;
mod strategy;

pub use runner::{AdaptStage, classify_batches};

use serde_json::json;

use super::{Declared, Env, Kind, ids, rewards_config, to_json};
use crate::dag::Stage;
use crate::exec::StageRunner;
use crate::pipeline::Pipeline;

pub struct AdaptKind;

impl Kind for AdaptKind {
    fn name(&self) -> &'static str {
        "adapt"
    }

    /// 2: named adaptations, the first version that runs.
    fn version(&self) -> u32 {
        2
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        let spec = &p.spec;
        spec.adaptations
            .iter()
            .map(|(name, ad)| {
                let strategy = strategy::of(ad);
                let mut deps = vec![ids::model()];
                deps.extend(strategy.deps(spec));
                let reward = (strategy.reward()).map_or(json!(null), |r| rewards_config(&spec.rewards, r));
                Declared {
                    id: ids::adapt(name),
                    subject: Some(name.clone()),
                    deps,
                    config: json!({"adaptation": to_json(ad), "rewards": reward, "seed": spec.seed}),
                    pointer: format!("/adaptations/{name}"),
                }
            })
            .collect()
    }

    fn runner<'a>(&self, env: &'a Env<'a>, stage: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        let name = stage.subject.as_deref()?;
        let p = env.pipeline;
        let spec = p.spec.adaptations.get(name)?;
        Some(Box::new(AdaptStage {
            name: name.to_string(),
            spec: spec.clone(),
            experts: p.spec.experts.clone(),
            rewards: p.spec.rewards.clone(),
            template: spec.routing().map(|r| p.path(r.template())),
            seed: p.spec.seed,
            shared: &env.shared,
        }))
    }
}
