//! The parts of a validated pipeline that runners need resolved once: paths relative to the
//! pipeline file made usable, seeds defaulted from the pipeline's, cards loaded, evaluation
//! names and modes settled ([`crate::eval::spec::ResolvedEval`]). Stage kinds read these instead
//! of re-deriving defaults.

use std::path::PathBuf;

use crate::data::card::LoadedCard;
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
