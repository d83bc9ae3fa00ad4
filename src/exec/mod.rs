//! Running a stage graph: run directories, manifests and cache keys, atomic stage commits, the run
//! lock, interruption, progress and the JSONL event log.
//!
//! Run directory layout (`<runs>/<pipeline name>/`):
//! - `.locks/<stage>`: held (flock) by the one tsq process running that stage; stages of one
//!   run may run in several processes at once (`--only`, Slurm jobs),
//! - `.staging/<stage>/`: the stage's outputs being written; cleared when its lock is taken,
//! - `<stage>/`: a finished stage's outputs plus `manifest.json`, written last and moved into place
//!   with its directory, so a stage directory that exists is complete,
//! - `.checkpoints/<stage>/<key>/`: resumable state of a long stage, kept across kills and
//!   reruns, removed when the stage commits,
//! - `events.jsonl`: one JSON object per event (stage started / finished / cached / failed),
//! - `pipeline.json`: the effective pipeline (after `--set`) of the latest run,
//! - `stages.json`: that run's stage graph (ids and dependencies, in run order).

mod executor;
mod interrupt;
mod manifest;
mod metrics;
mod progress;
mod rundir;
mod slurm;

pub use executor::{ExecError, Executor, PlanEntry, RunOptions, Status};
pub use interrupt::Interrupt;
pub use manifest::Manifest;
pub use metrics::Metrics;
pub use progress::Progress;
pub use rundir::{PIPELINE_FILE, RecordedStage, RunDir, RunDirError, StageLock, Unfinished};
pub use slurm::{JobCommand, SlurmRun, job_options, job_script, queued_jobs, submit_script};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::dag::{Stage, StageId};

/// What a stage runner gets while running: where to write, where to keep checkpoints, how to
/// report progress and metrics, and how to notice Ctrl-C.
pub struct StageContext<'a> {
    /// The (staging) directory this stage writes its outputs into.
    pub out_dir: PathBuf,
    /// A directory that survives kills and reruns until the stage commits, specific to this
    /// stage's cache key (a changed input starts from scratch). Long stages keep their
    /// resumable state here.
    pub checkpoint_dir: PathBuf,
    /// Finished upstream stages' directories, by stage id.
    pub upstream: BTreeMap<String, PathBuf>,
    pub interrupt: &'a Interrupt,
    /// `metrics.jsonl` in the stage directory: one JSON object per line, flushed as written.
    pub metrics: Metrics,
    pub(crate) stage: String,
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

    /// A progress bar over `total` units for this stage (plain lines when stderr is no terminal).
    pub fn progress(&self, total: u64, unit: &str) -> Progress {
        Progress::new(&self.stage, total, unit)
    }

    /// The directory of a finished upstream stage.
    pub fn upstream_dir(&self, stage: &StageId) -> Result<&Path, StageError> {
        self.upstream
            .get(&stage.0)
            .map(PathBuf::as_path)
            .ok_or_else(|| {
                StageError::failed(
                    format!("finding the `{stage}` stage's outputs"),
                    "it is not a dependency of this stage",
                )
            })
    }
}

/// Why a stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Failed(Box<Failure>),
}

/// The cause of a failure: the error itself (its own sources kept), or a message.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A failed stage: what it was doing, on which file if any, and why. The message says all
/// three; the cause is also the error's source, so callers can walk the chain.
#[derive(Debug, thiserror::Error)]
#[error("{doing}{}: {cause}", path.as_ref().map(|p| format!(" `{}`", p.display())).unwrap_or_default())]
pub struct Failure {
    /// What the stage was doing, as a phrase ("reading records", "scoring options").
    pub doing: String,
    /// The file or directory concerned.
    pub path: Option<PathBuf>,
    #[source]
    pub cause: Cause,
}

impl StageError {
    /// `doing` failed because of `cause` (an error, or a message saying why).
    pub fn failed(doing: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self::Failed(Box::new(Failure {
            doing: doing.into(),
            path: None,
            cause: cause.into(),
        }))
    }

    /// `doing` failed on `path` because of `cause`.
    pub fn at(doing: impl Into<String>, path: &Path, cause: impl Into<Cause>) -> Self {
        Self::Failed(Box::new(Failure {
            doing: doing.into(),
            path: Some(path.to_path_buf()),
            cause: cause.into(),
        }))
    }
}

/// A closure turning an error into a failure of `doing`, for `map_err`.
pub fn failed_to<E: Into<Cause>>(doing: &str) -> impl Fn(E) -> StageError + '_ {
    move |e| StageError::failed(doing, e)
}

/// One kind of stage's behaviour. The executor knows stages only through this trait.
///
/// Convention: `inputs` names everything outside the stage's config subtree that its result
/// depends on (file contents, asset identities) as `name → hash`; upstream stage keys and the
/// stage kind's version are added by the executor. `run` writes only under `ctx.out_dir` and returns a small
/// JSON summary kept in the manifest.
pub trait StageRunner {
    fn inputs(&self) -> Result<BTreeMap<String, String>, StageError>;
    /// What the stage will work on, for `plan`, computed without running or fetching anything.
    fn describe(&self) -> Option<String> {
        None
    }
    fn run(&self, ctx: &StageContext) -> Result<Value, StageError>;
}

/// Builds the runner for a stage (`None` only for a stage its kind did not declare: a bug).
pub type RunnerFactory<'a> = dyn Fn(&Stage) -> Option<Box<dyn StageRunner + 'a>> + 'a;

/// Now, in seconds since the Unix epoch: the time stamps of events, metrics and manifests.
pub fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The blake3 of a file, as a stage input.
pub fn file_input(path: &Path) -> Result<String, StageError> {
    crate::hash::path_blake3(path).map_err(|e| StageError::at("hashing", path, e))
}
