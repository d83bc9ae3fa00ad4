//! The `eval` kind: one `eval.<name>` stage per `evaluate` entry; the runner ([`runner`]) and
//! its adapted settings ([`adapted`]: models composed once, routed items grouped by expert).

mod adapted;
mod runner;

pub use runner::{EvalStage, run_batches, train_split};

use serde_json::json;

use super::{Declared, Env, Kind, ids, rewards_config, to_json};
use crate::adapt::spec::BASE;
use crate::dag::Stage;
use crate::exec::StageRunner;
use crate::pipeline::Pipeline;

pub struct EvalKind;

impl Kind for EvalKind {
    fn name(&self) -> &'static str {
        "eval"
    }

    /// 2: `code_tests` runs MBPP's setup code after the solution (it may use what it defines).
    /// 3: adaptations in `with`; samples say where each item was routed.
    fn version(&self) -> u32 {
        3
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        p.evaluations
            .iter()
            .map(|ev| {
                let spec = &ev.spec;
                let mut deps = vec![ids::model(), ids::data(&spec.dataset)];
                for w in &spec.with {
                    let more = match p.spec.adaptations.get(w) {
                        // A routed item is answered by one of the experts the labels lead to.
                        Some(ad) => std::iter::once(ids::adapt(w))
                            .chain(ad.routing().into_iter().flat_map(|r| {
                                r.experts(&p.spec.experts).into_iter().map(ids::train)
                            }))
                            .collect(),
                        None if w == BASE => vec![],
                        None => vec![ids::train(w)],
                    };
                    for dep in more {
                        if !deps.contains(&dep) {
                            deps.push(dep);
                        }
                    }
                }
                let reward = spec.reward.as_ref().map(|r| rewards_config(&p.spec.rewards, r));
                Declared {
                    id: ids::eval(&ev.name),
                    subject: Some(ev.name.clone()),
                    deps,
                    config: json!({"evaluate": to_json(spec), "rewards": reward, "chat": ev.chat, "seed": ev.seed}),
                    pointer: format!("/evaluate/{}", ev.index),
                }
            })
            .collect()
    }

    fn runner<'a>(&self, env: &'a Env<'a>, stage: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        let name = stage.subject.as_deref()?;
        let eval = env.pipeline.evaluations.iter().find(|e| e.name == name)?;
        Some(Box::new(EvalStage {
            eval: eval.clone(),
            rewards: env.pipeline.spec.rewards.clone(),
            adaptations: env.pipeline.spec.adaptations.clone(),
            version: format!("{}/{}", self.name(), self.version()),
            shared: &env.shared,
        }))
    }
}
