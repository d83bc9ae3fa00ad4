//! Running a stage graph: run directories, manifests and cache keys, atomic stage commits, the run
//! lock, interruption, progress and the JSONL event log.
//!
//! Run directory layout (`<runs>/<pipeline name>/`):
//! - `.lock`: held (flock) by the one tsq process writing this run,
//! - `.staging/`: stage outputs being written; cleared at the start of every run,
//! - `<stage>/`: a finished stage's outputs plus `manifest.json`, written last and moved into place
//!   with its directory, so a stage directory that exists is complete,
//! - `events.jsonl`: one JSON object per event (stage started / finished / cached / failed),
//! - `pipeline.json`: the effective pipeline (after `--set`) of the latest run.

mod executor;
mod interrupt;
mod manifest;
mod rundir;

pub use executor::{ExecError, Executor, PlanEntry, RunOptions, Status};
pub use interrupt::Interrupt;
pub use manifest::Manifest;
pub use rundir::RunDir;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::dag::Stage;

/// What a stage runner gets while running: where to write, and how to notice Ctrl-C.
pub struct StageContext<'a> {
    /// The (staging) directory this stage writes its outputs into.
    pub out_dir: PathBuf,
    /// Finished upstream stages' directories, by stage id.
    pub upstream: BTreeMap<String, PathBuf>,
    pub interrupt: &'a Interrupt,
}

impl StageContext<'_> {
    /// Path of an output file of this stage.
    pub fn output(&self, name: &str) -> PathBuf {
        self.out_dir.join(name)
    }

    /// Returns an error if the user asked to stop; long stages call this between units of work.
    pub fn check_interrupt(&self) -> Result<(), StageError> {
        if self.interrupt.requested() {
            Err(StageError::Interrupted)
        } else {
            Ok(())
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Failed(String),
}

impl StageError {
    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed(message.into())
    }
}

/// One kind of stage's behaviour. The executor knows stages only through this trait.
///
/// Convention: `inputs` names everything outside the stage's config subtree that its result
/// depends on (file contents, asset identities) as `name → hash`; upstream stage keys and the tsq
/// version are added by the executor. `run` writes only under `ctx.out_dir` and returns a small
/// JSON summary kept in the manifest.
pub trait StageRunner {
    fn inputs(&self) -> Result<BTreeMap<String, String>, StageError>;
    /// What the stage will work on, for `plan`, computed without running or fetching anything.
    fn describe(&self) -> Option<String> {
        None
    }
    fn run(&self, ctx: &StageContext) -> Result<Value, StageError>;
}

/// Builds the runner for a stage, or `None` if this version of tsq cannot run that kind of stage.
pub type RunnerFactory<'a> = dyn Fn(&Stage) -> Option<Box<dyn StageRunner + 'a>> + 'a;

/// The blake3 of a file, as a stage input.
pub fn file_input(path: &Path) -> Result<String, StageError> {
    crate::hash::file_blake3(path)
        .map_err(|e| StageError::failed(format!("cannot read `{}`: {e}", path.display())))
}
