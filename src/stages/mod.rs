//! Stage kinds: the one place each kind of stage is defined. A kind declares which stages a
//! pipeline has of it (id, dependencies, the config subtree in its cache key), carries its own
//! behaviour version, and builds the runner that the executor drives through
//! [`StageRunner`](crate::exec::StageRunner). Adding a kind means one file here and one line in
//! [`KINDS`].
//!
//! Runners share one [`Shared`]: the model is loaded once per run, whichever stages need it.

pub mod adapt;
pub mod data;
pub mod decompose;
pub mod eval;
pub mod model;
pub mod report;
pub mod train;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde_json::Value;

use crate::assets::TsqHome;
use crate::dag::{CycleError, Graph, Stage, StageId};
use crate::exec::{StageError, StageRunner};
use crate::fsutil::ReadError;
use crate::pipeline::Pipeline;
use model::ModelRecord;

/// One kind of stage.
pub trait Kind: Sync {
    /// The kind's name: the first part of its stage ids (`data` in `data.arc`).
    fn name(&self) -> &'static str;
    /// Bumped when stages of this kind would compute something different from the same inputs;
    /// part of every such stage's cache key (the tsq version is not).
    fn version(&self) -> u32;
    /// The stages of this kind that `pipeline` has.
    fn declare(&self, pipeline: &Pipeline) -> Vec<Declared>;
    /// The runner of one of its stages (`None` only for a stage it did not declare).
    fn runner<'a>(&self, env: &'a Env<'a>, stage: &Stage) -> Option<Box<dyn StageRunner + 'a>>;
}

/// The pipeline a run directory was run with (`pipeline.json`), parsed and as written: what
/// readers of a finished run go by (never by which files happen to exist).
pub fn run_pipeline(
    run_dir: &Path,
) -> Result<(crate::pipeline::spec::PipelineSpec, String), ReadError> {
    let path = run_dir.join(crate::exec::PIPELINE_FILE);
    let text = crate::fsutil::read_bounded(&path, crate::fsutil::MAX_TEXT_BYTES)
        .map_err(ReadError::at(&path))?;
    let spec = serde_json::from_str(&text).map_err(|e| {
        ReadError::at(&path)(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    })?;
    Ok((spec, text))
}

/// A task's failure fails the stage running it, with what it was doing and why.
impl From<crate::eval::TaskError> for StageError {
    fn from(e: crate::eval::TaskError) -> Self {
        StageError::failed(e.doing, e.cause)
    }
}

/// The stage ids of each kind, made in one place.
pub mod ids {
    use crate::dag::StageId;

    pub fn model() -> StageId {
        StageId::new("model", None)
    }
    pub fn data(dataset: &str) -> StageId {
        StageId::new("data", Some(dataset))
    }
    pub fn decompose() -> StageId {
        StageId::new("decompose", None)
    }
    pub fn train(expert: &str) -> StageId {
        StageId::new("train", Some(expert))
    }
    pub fn adapt(adaptation: &str) -> StageId {
        StageId::new("adapt", Some(adaptation))
    }
    pub fn eval(evaluation: &str) -> StageId {
        StageId::new("eval", Some(evaluation))
    }
    pub fn report() -> StageId {
        StageId::new("report", None)
    }
}

/// A stage as a kind declares it; [`graph`] adds the kind's name and version.
pub struct Declared {
    pub id: StageId,
    pub subject: Option<String>,
    pub deps: Vec<StageId>,
    pub config: Value,
    pub pointer: String,
}

/// Every kind, in the order their stages are listed before sorting.
const KINDS: &[&dyn Kind] = &[
    &model::ModelKind,
    &data::DataKind,
    &decompose::DecomposeKind,
    &train::TrainKind,
    &adapt::AdaptKind,
    &eval::EvalKind,
    &report::ReportKind,
];

fn kind(name: &str) -> Option<&'static dyn Kind> {
    KINDS.iter().copied().find(|k| k.name() == name)
}

/// The stage graph of a validated pipeline.
pub fn graph(pipeline: &Pipeline) -> Result<Graph, CycleError> {
    let stages = KINDS
        .iter()
        .flat_map(|k| {
            k.declare(pipeline).into_iter().map(|d| Stage {
                id: d.id,
                kind: k.name(),
                version: k.version(),
                subject: d.subject,
                deps: d.deps,
                config: d.config,
                pointer: d.pointer,
            })
        })
        .collect();
    Graph::new(stages)
}

/// What runners are built from: the pipeline and the resources a run shares.
pub struct Env<'a> {
    pub pipeline: &'a Pipeline,
    pub shared: Shared,
}

impl<'a> Env<'a> {
    pub fn new(pipeline: &'a Pipeline, home: TsqHome) -> Self {
        Self {
            pipeline,
            shared: Shared {
                home,
                models: RefCell::default(),
            },
        }
    }

    /// The runner for `stage` (`None` only for a stage no kind declared).
    pub fn runner_for(&'a self, stage: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        kind(stage.kind)?.runner(self, stage)
    }
}

/// Resources loaded once per run and shared by its stages.
pub struct Shared {
    pub home: TsqHome,
    models: RefCell<BTreeMap<PathBuf, Rc<crate::model::Model>>>,
}

impl Shared {
    /// The model the `model` stage recorded, on the device and in the dtype it recorded, loaded
    /// on first use.
    pub fn model(&self, record: &ModelRecord) -> Result<Rc<crate::model::Model>, StageError> {
        let path = &record.path;
        if let Some(model) = self.models.borrow().get(path) {
            return Ok(Rc::clone(model));
        }
        let model = record
            .load()
            .map_err(|e| StageError::at("loading the model", path, e))?;
        let model = Rc::new(model);
        self.models
            .borrow_mut()
            .insert(path.to_path_buf(), Rc::clone(&model));
        Ok(model)
    }
}

/// The reward `name` and every reward it is composed of, by name, as JSON (for cache keys):
/// a change to any part re-runs what it judges.
pub fn rewards_config(
    rewards: &BTreeMap<String, crate::reward::spec::RewardSpec>,
    name: &str,
) -> Value {
    let mut out = serde_json::Map::new();
    let mut todo = vec![name.to_string()];
    while let Some(n) = todo.pop() {
        if out.contains_key(&n) {
            continue;
        }
        let Some(spec) = rewards.get(&n) else {
            continue;
        };
        if let crate::reward::spec::RewardSpec::Composite(c) = spec {
            todo.extend(c.parts.iter().map(|p| p.reward.clone()));
        }
        out.insert(n, to_json(spec));
    }
    Value::Object(out)
}

/// A spec section as JSON (for cache keys).
fn to_json<T: serde::Serialize>(section: &T) -> Value {
    serde_json::to_value(section).expect("spec types serialise to JSON")
}
