//! An adaptation of a finished run, for inference outside the pipeline (`tsq generate --adapt`,
//! `tsq chat`): the run's base model, and either its router with the experts the labels lead to
//! or its few-shot mixture. Each input gets a [`Choice`] (why) and the model that answers it
//! (experts are composed once, on first use).

use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::few_shot::{ALPHA_FILE, AlphaFile};
use crate::adapt::router::{ROUTER_FILE, Route, Router};
use crate::adapt::spec::BASE;
use crate::assets::TsqHome;
use crate::exec::RunDir;
use crate::model::Model;
use crate::stages::ids;
use crate::stages::model::ModelRecord;
use crate::stages::train::EXPERT_FILE;
use crate::svf::Composed;

/// Why a finished run's adaptation cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("`{run_dir}` has no finished `{stage}` stage: run the pipeline first (`tsq run`)")]
    NotFinished { run_dir: PathBuf, stage: String },
    #[error("the pipeline run in `{run_dir}` has no adaptation `{name}`")]
    NoAdaptation { run_dir: PathBuf, name: String },
    /// The run's own files (pipeline.json, model.json, alpha.json) do not read.
    #[error(transparent)]
    RunFile(#[from] crate::fsutil::ReadError),
    #[error(transparent)]
    Adapt(#[from] crate::adapt::AdaptError),
    #[error("`{path}`: {source}")]
    Model {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl AdapterError {
    fn model(path: &Path, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Model {
            path: path.to_path_buf(),
            source: source.into(),
        }
    }
}

/// The stage `stage` of the run in `run_dir`, finished (its outputs intact), or why not.
fn finished(run: &RunDir, run_dir: &Path, stage: &str) -> Result<(), AdapterError> {
    match run.finished(stage) {
        Some(_) => Ok(()),
        None => Err(AdapterError::NotFinished {
            run_dir: run_dir.to_path_buf(),
            stage: stage.to_string(),
        }),
    }
}

/// The base model of the finished run in `run_dir`, as its `model` stage resolved it.
pub fn run_model(run_dir: &Path) -> Result<Model, AdapterError> {
    let run = RunDir::read_only(run_dir);
    finished(&run, run_dir, ids::model().as_str())?;
    let record = ModelRecord::read(&run.stage_dir(ids::model().as_str()))?;
    record
        .load()
        .map_err(|e| AdapterError::model(&record.path, e))
}

/// What the first pass decided for one input.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum Choice {
    /// A routing strategy's label and where it led.
    Routed {
        label: String,
        target: String,
        labels: Vec<String>,
        probs: Vec<f64>,
    },
    /// The few-shot mixture (the same for every input of its task).
    Mixed {
        experts: Vec<String>,
        alpha: Vec<Vec<f64>>,
    },
}

impl Choice {
    /// Which model answers: an expert, `base`, or the mixture.
    pub fn answered_by(&self) -> String {
        match self {
            Self::Routed { target, .. } => target.clone(),
            Self::Mixed { .. } => "mixture".into(),
        }
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Routed {
                label,
                target,
                labels,
                probs,
            } => {
                let scores: Vec<String> = labels
                    .iter()
                    .zip(probs)
                    .map(|(l, p)| format!("{l} {p:.2}"))
                    .collect();
                write!(
                    f,
                    "expert `{target}` (label `{label}`; {})",
                    scores.join(", ")
                )
            }
            Self::Mixed { experts, alpha } => {
                let parts: Vec<String> = experts
                    .iter()
                    .zip(alpha)
                    .map(|(e, a)| format!("{e} {a:.2?}"))
                    .collect();
                write!(f, "mixture α: {}", parts.join(", "))
            }
        }
    }
}

enum Strategy {
    /// The router and the model its first pass runs with.
    Routed(Box<Router>, Rc<Model>),
    Mixed(AlphaFile),
}

pub struct Adapter {
    run: RunDir,
    /// The `adapt.<name>` stage directory.
    dir: PathBuf,
    strategy: Strategy,
    /// The base model and the adapted ones by target (`mixture` for the few-shot one).
    models: Composed,
}

impl Adapter {
    /// Opens adaptation `name` of the finished run in `run_dir`.
    pub fn open(run_dir: &Path, name: &str, home: TsqHome) -> Result<Self, AdapterError> {
        Self::with_base(run_dir, name, Rc::new(run_model(run_dir)?), home)
    }

    /// [`Adapter::open`] with the run's base model already loaded (`base`; a server holding
    /// several adaptations shares one).
    pub fn with_base(
        run_dir: &Path,
        name: &str,
        base: Rc<Model>,
        home: TsqHome,
    ) -> Result<Self, AdapterError> {
        let run = RunDir::read_only(run_dir);
        let stage = ids::adapt(name).to_string();
        let dir = run.stage_dir(&stage);
        finished(&run, run_dir, &stage)?;
        let (spec, _) = crate::stages::run_pipeline(run_dir)?;
        let routed = match spec.adaptations.get(name) {
            Some(ad) => ad.routing().is_some(),
            None => {
                return Err(AdapterError::NoAdaptation {
                    run_dir: run_dir.to_path_buf(),
                    name: name.to_string(),
                });
            }
        };
        let mut models = Composed::new(base, home);
        let strategy = if routed {
            let router = Router::load(&dir.join(ROUTER_FILE))?;
            let first_pass = match &router.file.first_pass_expert {
                Some(file) => {
                    let path = dir.join(file);
                    (models.with_expert("first pass", &path))
                        .map_err(|e| AdapterError::model(&path, e))?
                }
                None => Rc::clone(&models.base),
            };
            Strategy::Routed(Box::new(router), first_pass)
        } else {
            let path = dir.join(ALPHA_FILE);
            Strategy::Mixed(
                crate::fsutil::read_json(&path, crate::fsutil::MAX_TEXT_BYTES)
                    .map_err(crate::fsutil::ReadError::at(&path))?,
            )
        };
        Ok(Self {
            run,
            dir,
            strategy,
            models,
        })
    }

    /// The first pass on each input.
    pub fn choose(&self, inputs: &[String]) -> Result<Vec<Choice>, AdapterError> {
        match &self.strategy {
            Strategy::Routed(router, first_pass) => Ok(router
                .route(first_pass, inputs)?
                .into_iter()
                .map(|r: Route| Choice::Routed {
                    label: r.label,
                    target: r.target,
                    labels: router.file.labels.clone(),
                    probs: r.probs,
                })
                .collect()),
            Strategy::Mixed(a) => Ok(inputs
                .iter()
                .map(|_| Choice::Mixed {
                    experts: a.experts.clone(),
                    alpha: a.alpha.clone(),
                })
                .collect()),
        }
    }

    /// The expert file that answers after `choice` (none: the base model answers).
    fn expert_file(&self, choice: &Choice) -> Option<PathBuf> {
        match choice {
            Choice::Routed { target, .. } if target == BASE => None,
            Choice::Routed { target, .. } => Some(
                self.run
                    .stage_dir(ids::train(target).as_str())
                    .join(EXPERT_FILE),
            ),
            Choice::Mixed { .. } => Some(self.dir.join(EXPERT_FILE)),
        }
    }

    /// The model that answers after `choice`.
    pub fn model_for(&mut self, choice: &Choice) -> Result<Rc<Model>, AdapterError> {
        let Some(file) = self.expert_file(choice) else {
            return Ok(Rc::clone(&self.models.base));
        };
        self.models
            .with_expert(&choice.answered_by(), &file)
            .map_err(|e| AdapterError::model(&file, e))
    }

    /// One model that answers every input after its choice, in one batch: the chosen model when
    /// all choices agree; otherwise the base model with a table of the chosen experts, and the
    /// row of that table each input uses (per-sequence application).
    pub fn answering(
        &mut self,
        choices: &[Choice],
    ) -> Result<(Rc<Model>, Option<Vec<u32>>), AdapterError> {
        let targets: std::collections::BTreeSet<String> =
            choices.iter().map(Choice::answered_by).collect();
        let Some(first) = choices.first() else {
            return Ok((Rc::clone(&self.models.base), None));
        };
        if targets.len() == 1 {
            return Ok((self.model_for(first)?, None));
        }
        // Each chosen expert file once, in order of its target.
        let files: Vec<(String, PathBuf)> = choices
            .iter()
            .filter_map(|c| Some((c.answered_by(), self.expert_file(c)?)))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect();
        let paths: Vec<&Path> = files.iter().map(|(_, f)| f.as_path()).collect();
        let table = crate::svf::expert_table(&self.models.base, &paths, self.models.home())
            .map_err(|e| AdapterError::model(&self.dir, e))?;
        // Row 0 of the table is the base model, row k + 1 the k-th file.
        let rows = choices
            .iter()
            .map(|c| {
                let target = c.answered_by();
                files
                    .iter()
                    .position(|(t, _)| *t == target)
                    .map_or(0, |k| k as u32 + 1)
            })
            .collect();
        Ok((Rc::new(table), Some(rows)))
    }
}
