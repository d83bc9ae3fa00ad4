//! The parts of a validated pipeline that runners need resolved once: paths relative to the
//! pipeline file made usable, seeds defaulted from the pipeline's, cards loaded, evaluation
//! names and modes settled. Stage kinds read these instead of re-deriving defaults.

use std::path::PathBuf;

use crate::data::card::LoadedCard;
use crate::eval::spec::EvaluateSpec;
use crate::pipeline::spec::DatasetSpec;

/// A dataset with its card loaded and its template paths and split seed resolved.
#[derive(Clone, Debug)]
pub struct ResolvedDataset {
    pub name: String,
    pub spec: DatasetSpec,
    pub card: LoadedCard,
    pub prompt: PathBuf,
    pub target: Option<PathBuf>,
    pub seed: u64,
}

/// One `evaluate` entry with its name, chat setting and seed resolved.
#[derive(Clone, Debug)]
pub struct ResolvedEval {
    /// `eval.<name>` is its stage.
    pub name: String,
    /// Its index in `evaluate` (for locating errors).
    pub index: usize,
    pub spec: EvaluateSpec,
    pub chat: bool,
    /// Seed of shot selection and sampling.
    pub seed: u64,
}

impl ResolvedEval {
    pub fn new(index: usize, spec: &EvaluateSpec, seed: u64) -> Self {
        Self {
            name: spec.stage_name().to_string(),
            index,
            chat: spec.chat.unwrap_or(spec.mode.chats_by_default()),
            spec: spec.clone(),
            seed,
        }
    }

    pub fn stage_id(&self) -> String {
        format!("eval.{}", self.name)
    }
}
