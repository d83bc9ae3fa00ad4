//! The `report` kind: renders the run's report. Declared but not runnable in this version.

use super::{Declared, Env, Kind, to_json};
use crate::dag::Stage;
use crate::exec::StageRunner;
use crate::pipeline::Pipeline;

pub struct ReportKind;

impl Kind for ReportKind {
    fn name(&self) -> &'static str {
        "report"
    }

    fn version(&self) -> u32 {
        1
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        p.spec
            .report
            .iter()
            .map(|report| Declared {
                id: "report".into(),
                subject: None,
                deps: p.evaluations.iter().map(|e| e.stage_id()).collect(),
                config: to_json(report),
                pointer: "/report".into(),
            })
            .collect()
    }

    fn runner<'a>(&self, _: &'a Env<'a>, _: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        None
    }
}
