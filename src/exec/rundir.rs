//! A run directory: per-stage locks that keep two processes from running one stage at once
//! (stages of one run may run in several processes, on several machines sharing the directory,
//! as Slurm jobs do), staging, and atomic stage commits.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::manifest::Manifest;
use crate::dag::{Graph, StageId};
use crate::fsutil::{MAX_TEXT_BYTES, ReadError, sync_dir};

/// The effective pipeline (after `--set`) of the latest run.
pub const PIPELINE_FILE: &str = "pipeline.json";
/// The stage graph of the latest run: each stage's id and dependencies, in run order. Readers of
/// a finished run (the report) go by it, never by re-deriving the graph or by which files exist.
const STAGES_FILE: &str = "stages.json";
const LOCKS: &str = ".locks";
const STAGING: &str = ".staging";
const CHECKPOINTS: &str = ".checkpoints";

/// One stage of [`STAGES_FILE`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecordedStage {
    pub id: StageId,
    pub deps: Vec<StageId>,
}

/// Why a run directory cannot be opened for writing.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot {doing} `{}`: {source}", path.display())]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stage `{stage}` is being run by another tsq process (lock `{}`)", lock.display())]
    Locked { stage: String, lock: PathBuf },
}

impl RunDirError {
    fn io(doing: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io {
            doing,
            path,
            source,
        }
    }
}

/// Why a stage has no finished result in a run directory (a report lists it as missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unfinished {
    #[error("not run")]
    NotRun,
    #[error("its manifest is missing or unreadable")]
    NoManifest,
    #[error("its outputs do not match its manifest (changed or removed files)")]
    OutputsChanged,
}

/// A run directory.
#[derive(Debug)]
pub struct RunDir {
    root: PathBuf,
}

/// The right to run one stage of a run directory: held (flock, released when dropped or when
/// the process dies) while the stage runs and commits.
#[derive(Debug)]
pub struct StageLock {
    _file: File,
}

impl RunDir {
    /// Opens for reading only (plan): nothing created.
    pub fn read_only(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// Opens for writing: creates the directory. Stages are locked one by one as they run.
    pub fn open(root: &Path) -> Result<Self, RunDirError> {
        std::fs::create_dir_all(root).map_err(RunDirError::io("create run directory", root))?;
        Ok(Self::read_only(root))
    }

    /// Takes stage `stage`'s lock, failing if another process holds it, and clears the
    /// staging a killed run of it left behind.
    pub fn lock_stage(&self, stage: &str) -> Result<StageLock, RunDirError> {
        let lock = self.root.join(LOCKS).join(stage);
        let file = crate::fsutil::open_lock_file(&lock).map_err(RunDirError::io("open", &lock))?;
        file.try_lock().map_err(|_| RunDirError::Locked {
            stage: stage.to_string(),
            lock: lock.clone(),
        })?;
        let staging = self.root.join(STAGING).join(stage);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(RunDirError::io("clear", &staging))?;
        }
        Ok(StageLock { _file: file })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn stage_dir(&self, stage: &str) -> PathBuf {
        self.root.join(stage)
    }

    /// Records what this run is: the effective pipeline and its stage graph.
    pub fn record_run(
        &self,
        pipeline: &impl serde::Serialize,
        graph: &Graph,
    ) -> std::io::Result<()> {
        crate::fsutil::write_json(&self.root.join(PIPELINE_FILE), pipeline)?;
        let stages: Vec<RecordedStage> = graph
            .stages
            .iter()
            .map(|s| RecordedStage {
                id: s.id.clone(),
                deps: s.deps.clone(),
            })
            .collect();
        crate::fsutil::write_json(&self.root.join(STAGES_FILE), &stages)
    }

    /// The stage graph the latest run recorded, in run order.
    pub fn recorded_stages(&self) -> Result<Vec<RecordedStage>, ReadError> {
        let path = self.root.join(STAGES_FILE);
        crate::fsutil::read_json(&path, MAX_TEXT_BYTES).map_err(ReadError::at(&path))
    }

    /// The finished manifest of a stage, if it has one with intact outputs.
    pub fn finished(&self, stage: &str) -> Option<Manifest> {
        self.finished_or_why(stage).ok()
    }

    /// The finished manifest of a stage, or why it has none (for reports of what is missing).
    pub fn finished_or_why(&self, stage: &str) -> Result<Manifest, Unfinished> {
        let dir = self.stage_dir(stage);
        if !dir.exists() {
            return Err(Unfinished::NotRun);
        }
        let manifest = Manifest::read(&dir).ok_or(Unfinished::NoManifest)?;
        if !manifest.outputs_intact(&dir) {
            return Err(Unfinished::OutputsChanged);
        }
        Ok(manifest)
    }

    /// A fresh empty directory to write a stage's outputs into before commit (under
    /// `.staging/<stage>/`, which only the holder of the stage's lock touches).
    pub fn staging_dir(&self, stage: &str) -> std::io::Result<tempfile::TempDir> {
        let staging = self.root.join(STAGING).join(stage);
        std::fs::create_dir_all(&staging)?;
        tempfile::Builder::new().prefix("out-").tempdir_in(staging)
    }

    /// The checkpoint directory of a stage for one cache key (created); checkpoints of other
    /// keys are removed, so a changed input never resumes from stale state.
    pub fn checkpoint_dir(&self, stage: &str, key: &str) -> std::io::Result<PathBuf> {
        let stage_dir = self.root.join(CHECKPOINTS).join(stage);
        if let Ok(entries) = std::fs::read_dir(&stage_dir) {
            for entry in entries.flatten() {
                if entry.file_name() != key {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = stage_dir.join(key);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Moves a complete staging directory into place as the stage's directory. The previous
    /// version stays intact until the new one is complete, and is removed only afterwards.
    pub fn commit(&self, stage: &str, staged: tempfile::TempDir) -> std::io::Result<()> {
        let staged = staged.keep();
        sync_dir(&staged)?;
        let dest = self.stage_dir(stage);
        let old = if dest.exists() {
            let aside = self.root.join(STAGING).join(stage).join("old");
            std::fs::rename(&dest, &aside)?;
            Some(aside)
        } else {
            None
        };
        std::fs::rename(&staged, &dest)?;
        sync_dir(&self.root)?;
        if let Some(old) = old {
            std::fs::remove_dir_all(old)?;
        }
        let _ = std::fs::remove_dir(self.root.join(STAGING).join(stage));
        // The stage is committed: its resumable state has served its purpose.
        let _ = std::fs::remove_dir_all(self.root.join(CHECKPOINTS).join(stage));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One stage is run by one process at a time; other stages are free, and a stage's lock
    /// clears what a killed run of it left in staging, and nothing of other stages'.
    #[test]
    fn a_stage_has_one_runner_and_its_staging_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::open(dir.path()).unwrap();
        let held = run.lock_stage("a").unwrap();
        let refused = RunDir::open(dir.path()).unwrap().lock_stage("a");
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("stage `a` is being run by another tsq process")
        );
        let _b = run.lock_stage("b").unwrap();
        for stage in ["a", "b"] {
            let staged = run.staging_dir(stage).unwrap();
            std::fs::write(staged.path().join("x"), "1").unwrap();
            let _ = staged.keep();
        }
        drop(held);
        let _a = run.lock_stage("a").unwrap();
        let left = |stage: &str| {
            std::fs::read_dir(dir.path().join(STAGING).join(stage))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        assert_eq!((left("a"), left("b")), (0, 1));
    }

    /// A reader of the run gets the graph the run had, in its order, from the run directory.
    #[test]
    fn a_run_records_its_stage_graph() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::open(dir.path()).unwrap();
        assert!(run.recorded_stages().is_err());
        let stage = |id: &str, deps: &[&str]| crate::dag::Stage {
            id: StageId(id.into()),
            kind: "test",
            version: 1,
            subject: None,
            deps: deps.iter().map(|d| StageId(d.to_string())).collect(),
            config: serde_json::Value::Null,
            pointer: String::new(),
        };
        let graph = Graph::new(vec![stage("b", &["a"]), stage("a", &[])]).unwrap();
        run.record_run(&serde_json::json!({"name": "x"}), &graph)
            .unwrap();
        let recorded = RunDir::read_only(dir.path()).recorded_stages().unwrap();
        let ids: Vec<&str> = recorded.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(recorded[1].deps, [StageId("a".into())]);
    }

    #[test]
    fn commit_replaces_previous_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::open(dir.path()).unwrap();
        for content in ["one", "two"] {
            let staged = run.staging_dir("s").unwrap();
            std::fs::write(staged.path().join("out"), content).unwrap();
            run.commit("s", staged).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("s/out")).unwrap(),
            "two"
        );
    }

    /// A manifest vouches for its outputs' bytes: the same size with other content is caught.
    #[test]
    fn an_output_changed_in_place_unfinishes_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::open(dir.path()).unwrap();
        let staged = run.staging_dir("s").unwrap();
        std::fs::create_dir(staged.path().join("sub")).unwrap();
        std::fs::write(staged.path().join("sub/out"), "good").unwrap();
        let mut manifest = Manifest::new("s", Default::default());
        manifest.record_outputs(staged.path()).unwrap();
        manifest.write(staged.path()).unwrap();
        run.commit("s", staged).unwrap();
        assert!(run.finished("s").is_some());
        std::fs::write(dir.path().join("s/sub/out"), "evil").unwrap();
        assert_eq!(
            run.finished_or_why("s").unwrap_err(),
            Unfinished::OutputsChanged
        );
    }
}
