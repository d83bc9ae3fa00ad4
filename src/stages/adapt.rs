//! The `adapt` kind: the two-pass adaptation stage. Declared but not runnable in this version.

use super::{Declared, Env, Kind, to_json};
use crate::dag::Stage;
use crate::exec::StageRunner;
use crate::pipeline::Pipeline;

pub struct AdaptKind;

impl Kind for AdaptKind {
    fn name(&self) -> &'static str {
        "adapt"
    }

    fn version(&self) -> u32 {
        1
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        p.spec
            .adaptation
            .iter()
            .map(|ad| Declared {
                id: "adapt".into(),
                subject: None,
                deps: ad.experts.iter().map(|e| format!("train.{e}")).collect(),
                config: to_json(ad),
                pointer: "/adaptation".into(),
            })
            .collect()
    }

    fn runner<'a>(&self, _: &'a Env<'a>, _: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        None
    }
}
