//! The `eval` kind: one `eval.<name>` stage per `evaluate` entry.

use serde_json::json;

use super::{Declared, Env, Kind, rewards_config, to_json};
use crate::dag::Stage;
use crate::eval::stage::EvalStage;
use crate::exec::StageRunner;
use crate::pipeline::Pipeline;

pub struct EvalKind;

impl Kind for EvalKind {
    fn name(&self) -> &'static str {
        "eval"
    }

    /// 2: `code_tests` runs MBPP's setup code after the solution (it may use what it defines).
    fn version(&self) -> u32 {
        2
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        p.evaluations
            .iter()
            .map(|ev| {
                let spec = &ev.spec;
                let mut deps = vec!["model".to_string(), format!("data.{}", spec.dataset)];
                for w in &spec.with {
                    match w.as_str() {
                        "base" => {}
                        "adaptive" => deps.push("adapt".into()),
                        expert => deps.push(format!("train.{expert}")),
                    }
                }
                let reward = spec.reward.as_ref().map(|r| rewards_config(&p.spec.rewards, r));
                Declared {
                    id: ev.stage_id(),
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
            version: format!("{}/{}", self.name(), self.version()),
            shared: &env.shared,
        }))
    }
}
