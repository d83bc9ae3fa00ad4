//! Deciding what to run (cache keys, statuses) and running it in order.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use super::manifest::{Manifest, differences, key_of};
use super::{Failure, Interrupt, Metrics, RunDir, RunnerFactory, StageContext, StageError};
use crate::dag::{Graph, Stage, StageId};

/// What the user asked for beyond "run what is not cached".
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Re-run these stages and everything downstream of them, cached or not.
    pub force: BTreeSet<StageId>,
    /// Run only these stages (their dependencies must already be finished).
    pub only: Option<BTreeSet<StageId>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", content = "reasons", rename_all = "snake_case")]
pub enum Status {
    /// Finished with the same key: will be skipped.
    Cached,
    /// Finished before, but something it depends on changed (the reasons say what).
    Stale(Vec<String>),
    /// Never finished in this run directory.
    ToRun,
    /// Not selected by `--only` (it may still be finished, which is all its dependents need).
    Skipped,
}

/// One row of a plan.
#[derive(Clone, Debug, Serialize)]
pub struct PlanEntry {
    pub stage: StageId,
    pub deps: Vec<StageId>,
    pub key: String,
    #[serde(flatten)]
    pub status: Status,
    /// What the stage will work on, when it can tell before running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// What the key was computed from, reused when the stage runs (hashing inputs can mean
    /// reading large files, so it is done once per command).
    #[serde(skip)]
    pub inputs: BTreeMap<String, String>,
    /// Finished in the run directory with this key (whatever `--only` or `--force` say).
    #[serde(skip)]
    pub finished: bool,
}

impl PlanEntry {
    /// Whether a run with these options runs the stage.
    pub fn will_run(&self) -> bool {
        matches!(self.status, Status::Stale(_) | Status::ToRun)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    Setup(String),
    #[error("stage `{stage}` failed: {failure}")]
    StageFailed {
        stage: StageId,
        #[source]
        failure: Box<Failure>,
    },
    #[error("interrupted during stage `{0}`; finished stages are kept, run again to resume")]
    Interrupted(StageId),
    /// Jobs on a cluster that ended without finishing their stages.
    #[error("{0}")]
    Cluster(String),
}

/// Runs a graph with runners from a factory.
pub struct Executor<'a> {
    pub graph: &'a Graph,
    pub factory: &'a RunnerFactory<'a>,
}

impl Executor<'_> {
    /// Every stage's cache inputs (in graph order): config, the stage kind's version, upstream
    /// keys, own inputs. The tsq version is not among them: a release that leaves a stage's
    /// behaviour alone keeps its cached results (its kind's version says when it does not).
    fn inputs(&self) -> Result<BTreeMap<StageId, BTreeMap<String, String>>, ExecError> {
        let mut all: BTreeMap<StageId, BTreeMap<String, String>> = BTreeMap::new();
        for stage in &self.graph.stages {
            let mut inputs = BTreeMap::from([
                (
                    "config".to_string(),
                    crate::hash::json_blake3(&stage.config),
                ),
                (
                    "stage_version".to_string(),
                    format!("{}/{}", stage.kind, stage.version),
                ),
            ]);
            for dep in &stage.deps {
                let dep_key = all.get(dep).map(key_of).unwrap_or_default();
                inputs.insert(format!("upstream:{dep}"), dep_key);
            }
            if let Some(runner) = (self.factory)(stage) {
                let own = runner
                    .inputs()
                    .map_err(|e| ExecError::Setup(format!("stage `{}`: {e}", stage.id)))?;
                inputs.extend(own);
            }
            all.insert(stage.id.clone(), inputs);
        }
        Ok(all)
    }

    /// The status of every stage, without running anything.
    pub fn plan(&self, run: &RunDir, opts: &RunOptions) -> Result<Vec<PlanEntry>, ExecError> {
        let mut inputs = self.inputs()?;
        let forced = self.graph.downstream_of(&opts.force);
        let mut entries = Vec::new();
        for stage in &self.graph.stages {
            let stage_inputs = inputs.remove(&stage.id).unwrap_or_default();
            let key = key_of(&stage_inputs);
            // Checking a stage hashes its outputs: once per stage.
            let manifest = run.finished(&stage.id.0);
            let finished = manifest.as_ref().is_some_and(|m| m.key == key);
            let status = if opts
                .only
                .as_ref()
                .is_some_and(|only| !only.contains(&stage.id))
            {
                Status::Skipped
            } else if forced.contains(&stage.id) {
                Status::Stale(vec!["forced".into()])
            } else {
                match manifest {
                    Some(m) if m.key == key => Status::Cached,
                    Some(m) => Status::Stale(differences(&m.inputs, &stage_inputs)),
                    // A manifest whose outputs no longer match it: read again only then.
                    None if Manifest::read(&run.stage_dir(&stage.id.0)).is_some() => {
                        Status::Stale(vec!["outputs missing or changed".into()])
                    }
                    None => Status::ToRun,
                }
            };
            let detail = (self.factory)(stage).and_then(|r| r.describe());
            entries.push(PlanEntry {
                stage: stage.id.clone(),
                deps: stage.deps.clone(),
                key,
                status,
                detail,
                inputs: stage_inputs,
                finished,
            });
        }
        Ok(entries)
    }

    /// The plan, refused if a stage it runs would depend on an unfinished one.
    pub fn preflight(&self, run: &RunDir, opts: &RunOptions) -> Result<Vec<PlanEntry>, ExecError> {
        let plan = self.plan(run, opts)?;
        check_runnable(&plan)?;
        Ok(plan)
    }

    /// Runs every stage that is not cached, in order; stops at the first failure.
    pub fn run(
        &self,
        run: &RunDir,
        opts: &RunOptions,
        interrupt: &Interrupt,
    ) -> Result<Vec<PlanEntry>, ExecError> {
        let plan = self.preflight(run, opts)?;
        let mut log = EventLog::open(run);
        log.event(
            "run_started",
            None,
            json!({"tsq": crate::VERSION, "machine": machine()}),
        );
        for entry in &plan {
            let stage = self
                .graph
                .get(&entry.stage)
                .expect("plan entries come from the graph");
            if !entry.will_run() {
                if entry.status == Status::Cached {
                    eprintln!("  cached  {}", stage.id);
                    log.event("stage_cached", Some(&stage.id), json!({}));
                }
                continue;
            }
            if interrupt.requested() {
                return Err(ExecError::Interrupted(stage.id.clone()));
            }
            self.run_stage(run, stage, entry, interrupt, &mut log)?;
        }
        Ok(plan)
    }

    fn run_stage(
        &self,
        run: &RunDir,
        stage: &Stage,
        entry: &PlanEntry,
        interrupt: &Interrupt,
        log: &mut EventLog,
    ) -> Result<(), ExecError> {
        let id = &stage.id;
        // Every kind builds runners for the stages it declares; none means a bug in the kind.
        let runner = (self.factory)(stage).ok_or_else(|| {
            ExecError::Setup(format!("internal error: no runner for stage `{id}`"))
        })?;
        let failed = |e: StageError| match e {
            StageError::Interrupted => ExecError::Interrupted(id.clone()),
            StageError::Failed(failure) => ExecError::StageFailed {
                stage: id.clone(),
                failure,
            },
        };
        let io =
            |doing: &'static str| move |e: std::io::Error| failed(StageError::failed(doing, e));
        let _lock = run
            .lock_stage(&id.0)
            .map_err(|e| ExecError::Setup(e.to_string()))?;
        // Another process (a Slurm job, a second `tsq run`) may have finished it meanwhile.
        if !entry.finished && run.finished(&id.0).is_some_and(|m| m.key == entry.key) {
            eprintln!("  cached  {id} (finished by another process)");
            log.event("stage_cached", Some(id), json!({}));
            return Ok(());
        }
        eprintln!("  running {id}");
        log.event("stage_started", Some(id), json!({}));
        let started = Instant::now();
        let started_unix = super::unix_seconds();
        let staged = run
            .staging_dir(&id.0)
            .map_err(io("creating the staging directory"))?;
        let checkpoint_dir = run
            .checkpoint_dir(&id.0, &entry.key)
            .map_err(io("creating the checkpoint directory"))?;
        let upstream = stage
            .deps
            .iter()
            .map(|d| (d.0.clone(), run.stage_dir(&d.0)))
            .collect();
        let ctx = StageContext {
            out_dir: staged.path().to_path_buf(),
            checkpoint_dir,
            upstream,
            interrupt,
            metrics: Metrics::open(staged.path()),
            stage: id.0.clone(),
        };
        let summary = match runner.run(&ctx) {
            Ok(summary) => summary,
            Err(e) => {
                let event = match &e {
                    StageError::Interrupted => ("stage_interrupted", json!({})),
                    StageError::Failed(f) => (
                        "stage_failed",
                        json!({"doing": f.doing, "path": f.path, "why": f.cause.to_string()}),
                    ),
                };
                log.event(event.0, Some(id), event.1);
                return Err(failed(e));
            }
        };
        drop(ctx);
        let mut manifest = Manifest::new(&id.0, entry.inputs.clone());
        manifest.started_unix = started_unix;
        manifest.duration_s = started.elapsed().as_secs_f64();
        manifest.summary = summary;
        manifest
            .record_outputs(staged.path())
            .map_err(io("listing outputs"))?;
        manifest
            .write(staged.path())
            .map_err(io("writing the manifest"))?;
        test_hook_stall(id);
        run.commit(&id.0, staged)
            .map_err(io("committing outputs"))?;
        eprintln!("  done    {id} ({:.1}s)", manifest.duration_s);
        log.event(
            "stage_finished",
            Some(id),
            json!({"duration_s": manifest.duration_s, "key": manifest.key}),
        );
        Ok(())
    }
}

/// Refuses up front a run that would depend on an unfinished stage it does not run.
fn check_runnable(plan: &[PlanEntry]) -> Result<(), ExecError> {
    let status: BTreeMap<&StageId, &PlanEntry> = plan.iter().map(|e| (&e.stage, e)).collect();
    for entry in plan.iter().filter(|e| e.will_run()) {
        for dep in &entry.deps {
            if status
                .get(dep)
                .is_some_and(|d| d.status == Status::Skipped && !d.finished)
            {
                return Err(ExecError::Setup(format!(
                    "`{}` needs `{dep}`, which is not finished and not selected by --only",
                    entry.stage
                )));
            }
        }
    }
    Ok(())
}

/// Test hook: `TSQ_TEST_STALL_BEFORE_COMMIT=<stage>` makes the process announce itself and hang
/// just before committing that stage, so tests can SIGKILL a run mid-stage at a known point.
fn test_hook_stall(id: &StageId) {
    if std::env::var("TSQ_TEST_STALL_BEFORE_COMMIT").is_ok_and(|s| s == id.0) {
        eprintln!("stalling before commit of {id}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Appends one JSON object per line to `events.jsonl` in the run directory.
struct EventLog {
    file: Option<std::fs::File>,
}

impl EventLog {
    fn open(run: &RunDir) -> Self {
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(run.root().join("events.jsonl"))
            .ok();
        Self { file }
    }

    fn event(&mut self, event: &str, stage: Option<&StageId>, mut fields: serde_json::Value) {
        let ts = super::unix_seconds();
        if let Some(obj) = fields.as_object_mut() {
            obj.insert("ts".into(), json!(ts));
            obj.insert("event".into(), json!(event));
            if let Some(stage) = stage {
                obj.insert("stage".into(), json!(stage.0));
            }
        }
        if let Some(file) = &mut self.file {
            // One write of the whole line: stages running in other processes (Slurm jobs)
            // append to the same log, and `writeln!` on a file writes piece by piece, which
            // interleaved their lines byte by byte.
            let _ = file.write_all(format!("{fields}\n").as_bytes());
        }
    }
}

/// This machine in a few words, for provenance: OS, architecture, cores and memory.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: f64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!(", {:.0} GiB", kb / (1024.0 * 1024.0)))
        })
        .unwrap_or_default();
    format!(
        "{} {}, {cores} cores{memory}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writers appending to one event log at once (stages running as Slurm jobs), each through
    /// a handle of its own, leave whole lines.
    #[test]
    fn concurrent_writers_leave_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::open(dir.path()).unwrap();
        std::thread::scope(|s| {
            for writer in 0..4 {
                let run = &run;
                s.spawn(move || {
                    let mut log = EventLog::open(run);
                    for i in 0..300 {
                        let fields = json!({"writer": writer, "i": i, "pad": "x".repeat(300)});
                        log.event("stage_started", None, fields);
                    }
                });
            }
        });
        let text = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 1200);
        for line in text.lines() {
            assert!(
                serde_json::from_str::<serde_json::Value>(line).is_ok(),
                "{line}"
            );
        }
    }
}
