//! The `data` kind: one `data.<dataset>` stage per dataset.

use serde_json::json;

use super::{Declared, Env, Kind, to_json};
use crate::dag::Stage;
use crate::data::stage::DataStage;
use crate::exec::StageRunner;
use crate::pipeline::Pipeline;

pub struct DataKind;

impl Kind for DataKind {
    fn name(&self) -> &'static str {
        "data"
    }

    fn version(&self) -> u32 {
        1
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        p.datasets
            .values()
            .map(|ds| Declared {
                id: format!("data.{}", ds.name),
                subject: Some(ds.name.clone()),
                deps: vec![],
                config: json!({"dataset": to_json(&ds.spec), "split_seed": ds.seed}),
                pointer: format!("/datasets/{}", ds.name),
            })
            .collect()
    }

    fn runner<'a>(&self, env: &'a Env<'a>, stage: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        let ds = env.pipeline.datasets.get(stage.subject.as_deref()?)?;
        Some(Box::new(DataStage {
            dataset: ds.clone(),
            home: env.shared.home.clone(),
        }))
    }
}
