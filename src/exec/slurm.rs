//! Stages as Slurm jobs. Each stage that is not cached becomes a job running `tsq run FILE
//! --only STAGE` on the same run directory (shared storage), held until the jobs of the stages
//! it needs have succeeded (`--dependency=afterok`), so independent stages run at once. Slurm
//! schedules; tsq submits, follows (`squeue`), reports, and cancels what it submitted when
//! interrupted (`scancel`), as Snakemake's and Nextflow's executors do. Everything a local run
//! guarantees holds because each job *is* a local run of one stage: cache keys, per-stage
//! locks, atomic commits, checkpoints.
//!
//! A job's name carries its stage, its cache key and its run directory
//! (`tsq.<pipeline>.<stage>.<hash of both>`): a driver run again after being killed finds the
//! jobs still queued or running under those names and does not submit them twice, and another
//! project's pipeline of the same name is not mistaken for this one.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{ExecError, Interrupt, PlanEntry, RunDir, Status};
use crate::dag::Graph;
use crate::pipeline::spec::{ExecutorSpec, JobResources};

/// Where the job scripts and logs go, in the run directory.
const SLURM_DIR: &str = ".slurm";
/// How often the driver asks Slurm about its jobs.
const POLL: Duration = Duration::from_secs(1);
/// How many polls in a row squeue may fail (a controller restarting, a busy login node) before
/// the driver gives up; its jobs go on, and running it again adopts them.
const SQUEUE_TRIES: u32 = 60;
/// Job states after which a job does nothing more.
const ENDED: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
];

/// What every job runs: `program args... --only STAGE`, in `workdir`.
pub struct JobCommand {
    pub program: PathBuf,
    /// `run FILE [--set ...]`.
    pub args: Vec<String>,
    pub workdir: PathBuf,
}

/// A plan to carry out on the cluster.
pub struct SlurmRun<'a> {
    pub graph: &'a Graph,
    pub plan: &'a [PlanEntry],
    pub run: &'a RunDir,
    pub pipeline: &'a str,
    pub command: &'a JobCommand,
    pub spec: &'a ExecutorSpec,
}

/// A job of this run.
struct Job {
    stage: String,
    key: String,
    id: String,
    log: PathBuf,
    /// Slurm's state as last seen (`GONE` once squeue no longer lists it).
    state: String,
    reason: String,
    /// Forced to run again: the stage's earlier outputs have the same key, so only outputs
    /// begun after this driver started count as its job's.
    after_unix: Option<f64>,
    /// The newest progress line of its log shown so far.
    progress: String,
}

impl Job {
    fn ended(&self) -> bool {
        self.state == "GONE" || ENDED.contains(&self.state.as_str())
    }
}

impl SlurmRun<'_> {
    /// Submits every stage the plan runs; with `detach`, returns then, else follows the jobs
    /// to their end and fails if any stage did not finish.
    pub fn run(&self, detach: bool, interrupt: &Interrupt) -> Result<(), ExecError> {
        let mut jobs = self.submit()?;
        if jobs.is_empty() {
            return Ok(());
        }
        if detach {
            eprintln!(
                "submitted; `tsq plan` shows the run's progress, `squeue --me` the jobs ({})",
                jobs.iter()
                    .map(|j| j.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Ok(());
        }
        self.follow(&mut jobs, interrupt)?;
        self.outcome(&jobs)
    }

    /// Submits (or finds already queued) a job for each stage the plan runs, after the jobs of
    /// the stages it needs.
    fn submit(&self) -> Result<Vec<Job>, ExecError> {
        let queued = squeue()?;
        let dir = self.run.root().join(SLURM_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| setup(&dir, e))?;
        let mut jobs: Vec<Job> = Vec::new();
        for entry in self.plan.iter().filter(|e| e.will_run()) {
            let stage = self.graph.get(&entry.stage).expect("plan from the graph");
            let name = job_name(self.pipeline, &entry.stage.0, &entry.key, self.run.root());
            // One log per job (`%j`): a stage's earlier attempts keep theirs.
            let log = |id: &str| dir.join(format!("{}-{id}.log", entry.stage.0));
            if let Some(job) = queued.values().find(|j| j.name == name && !j.ended()) {
                eprintln!(
                    "  queued  {} (job {}, submitted before)",
                    entry.stage, job.id
                );
                jobs.push(job.for_stage(entry, log(&job.id)));
                continue;
            }
            let after: Vec<&str> = jobs
                .iter()
                .filter(|j| stage.deps.iter().any(|d| d.0 == j.stage))
                .map(|j| j.id.as_str())
                .collect();
            let resources = self.spec.resources.of(stage.kind);
            let script = dir.join(format!("{}.sh", entry.stage.0));
            let forced = entry.status == Status::Stale(vec!["forced".into()]);
            let after_unix = forced.then(super::unix_seconds);
            let text = job_script(self.command, self.spec, &resources, &entry.stage.0, forced)?;
            crate::fsutil::write_atomic(&script, text.as_bytes()).map_err(|e| setup(&script, e))?;
            let id = sbatch(&name, &log("%j"), &self.command.workdir, &after, &script)?;
            let waits = if after.is_empty() {
                String::new()
            } else {
                format!(", after {}", after.join(", "))
            };
            eprintln!("  queued  {} (job {id}{waits})", entry.stage);
            jobs.push(Job {
                stage: entry.stage.0.clone(),
                key: entry.key.clone(),
                log: log(&id),
                id,
                state: "PENDING".into(),
                reason: String::new(),
                after_unix,
                progress: String::new(),
            });
        }
        Ok(jobs)
    }

    /// Watches the jobs until every one has ended, printing what changes; on an interrupt,
    /// cancels those not ended.
    fn follow(&self, jobs: &mut [Job], interrupt: &Interrupt) -> Result<(), ExecError> {
        let mut failures = 0;
        while jobs.iter().any(|j| !j.ended()) {
            if interrupt.requested() {
                let live: Vec<String> = jobs
                    .iter()
                    .filter(|j| !j.ended())
                    .map(|j| j.id.clone())
                    .collect();
                let _ = Command::new("scancel").args(&live).status();
                eprintln!("cancelled jobs {}", live.join(", "));
                let stage = jobs.iter().find(|j| !j.ended()).map(|j| j.stage.clone());
                return Err(ExecError::Interrupted(crate::dag::StageId(
                    stage.unwrap_or_default(),
                )));
            }
            std::thread::sleep(POLL);
            let seen = match squeue() {
                Ok(seen) => {
                    failures = 0;
                    seen
                }
                Err(e) if failures + 1 < SQUEUE_TRIES => {
                    if failures == 0 {
                        eprintln!("  warning: {e}; asking again");
                    }
                    failures += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            for job in jobs.iter_mut().filter(|j| j.state == "RUNNING") {
                // A job's tsq prints a progress line every few seconds into its log.
                if let Some(line) = progress(&job.log, &job.stage)
                    && line != job.progress
                {
                    eprintln!("{line}");
                    job.progress = line;
                }
            }
            for job in jobs.iter_mut().filter(|j| !j.ended()) {
                let (state, reason) = seen
                    .get(&job.id)
                    .map_or(("GONE".to_string(), String::new()), |s| {
                        (s.state.clone(), s.reason.clone())
                    });
                if state == job.state {
                    continue;
                }
                job.state = state;
                job.reason = reason;
                if job.state == "RUNNING" {
                    eprintln!("  running {} (job {})", job.stage, job.id);
                } else if job.ended() {
                    self.report_end(job);
                }
            }
        }
        Ok(())
    }

    /// Did the job's stage finish (its manifest, with the key planned, begun after the driver
    /// when forced)?
    fn finished(&self, job: &Job) -> bool {
        self.run.finished(&job.stage).is_some_and(|m| {
            m.key == job.key && job.after_unix.is_none_or(|after| m.started_unix >= after)
        })
    }

    fn report_end(&self, job: &Job) {
        if self.finished(job) {
            eprintln!("  done    {} (job {})", job.stage, job.id);
        } else if job.reason == "DependencyNeverSatisfied" {
            eprintln!("  skipped {}: a stage it needs failed", job.stage);
        } else {
            eprintln!(
                "  failed  {} (job {}, {}); the end of {}:\n{}",
                job.stage,
                job.id,
                job.state,
                job.log.display(),
                tail(&job.log, 15)
            );
        }
    }

    /// Ok when every job's stage finished; else which did not, and why.
    fn outcome(&self, jobs: &[Job]) -> Result<(), ExecError> {
        let failed: Vec<String> = jobs
            .iter()
            .filter(|j| !self.finished(j))
            .map(|j| {
                let why = if j.reason == "DependencyNeverSatisfied" {
                    "not run: a stage it needs failed".to_string()
                } else {
                    format!("job {} {}, log {}", j.id, j.state, j.log.display())
                };
                format!("`{}` ({why})", j.stage)
            })
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(ExecError::Cluster(format!(
                "{} stage(s) did not finish on the cluster: {}; finished stages are kept, run again to resume",
                failed.len(),
                failed.join(", ")
            )))
        }
    }
}

/// A job as squeue lists it.
struct Listed {
    id: String,
    name: String,
    state: String,
    reason: String,
}

impl Listed {
    fn ended(&self) -> bool {
        ENDED.contains(&self.state.as_str())
    }

    fn for_stage(&self, entry: &PlanEntry, log: PathBuf) -> Job {
        Job {
            stage: entry.stage.0.clone(),
            key: entry.key.clone(),
            id: self.id.clone(),
            log,
            state: self.state.clone(),
            reason: self.reason.clone(),
            after_unix: None,
            progress: String::new(),
        }
    }
}

/// Where each stage of `plan` that is to run stands in the queue (`job 12 PENDING`), for the
/// stages Slurm has a live job of: what `tsq plan` shows of a detached run.
pub fn queued_jobs(
    plan: &[PlanEntry],
    pipeline: &str,
    run_root: &Path,
) -> Result<BTreeMap<crate::dag::StageId, String>, ExecError> {
    let listed = squeue()?;
    let mut found = BTreeMap::new();
    for entry in plan.iter().filter(|e| e.will_run()) {
        let name = job_name(pipeline, &entry.stage.0, &entry.key, run_root);
        if let Some(job) = listed.values().find(|j| j.name == name && !j.ended()) {
            found.insert(entry.stage.clone(), format!("job {} {}", job.id, job.state));
        }
    }
    Ok(found)
}

/// The `sbatch` options of a job with `resources` under `spec` (partition, account), as
/// `--name=value`.
pub fn job_options(
    spec: &ExecutorSpec,
    resources: &JobResources,
) -> Result<Vec<String>, ExecError> {
    let mut options = Vec::new();
    let mut option = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            options.push(format!("--{name}={value}"));
        }
    };
    option("partition", spec.partition.clone());
    option("account", spec.account.clone());
    option("cpus-per-task", resources.cpus.map(|c| c.to_string()));
    option("mem", resources.mem.clone());
    option("gpus", resources.gpus.map(|g| g.to_string()));
    option("time", resources.time.clone());
    for extra in &resources.sbatch {
        // Validation holds them to this; a script line is no place to find out otherwise.
        if extra.0.contains(['\n', '\r']) || !extra.0.starts_with("--") {
            return Err(ExecError::Setup(format!(
                "the sbatch option `{}` is not one `--name[=value]`",
                extra.0.escape_debug()
            )));
        }
        options.push(extra.0.clone());
    }
    // Dependents of a job that failed are cancelled, not left pending for ever.
    options.push("--kill-on-invalid-dep=yes".into());
    Ok(options)
}

/// The batch script of stage `stage`'s job: its resources as `#SBATCH` lines, then `tsq run
/// --only` the stage (`--force`d too when `forced`).
pub fn job_script(
    command: &JobCommand,
    spec: &ExecutorSpec,
    resources: &JobResources,
    stage: &str,
    forced: bool,
) -> Result<String, ExecError> {
    let mut lines = vec!["#!/bin/sh".to_string()];
    for option in job_options(spec, resources)? {
        lines.push(format!("#SBATCH {option}"));
    }
    lines.push("# tsq's threads follow the CPUs Slurm gave the job.".into());
    lines.push(
        "[ -n \"$SLURM_CPUS_PER_TASK\" ] && export RAYON_NUM_THREADS=\"$SLURM_CPUS_PER_TASK\""
            .into(),
    );
    let mut words = vec![command.program.to_string_lossy().into_owned()];
    words.extend(command.args.iter().cloned());
    words.extend(["--only".into(), stage.to_string()]);
    if forced {
        words.extend(["--force".into(), stage.to_string()]);
    }
    let quoted: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
    lines.push(format!("exec {}", quoted.join(" ")));
    Ok(lines.join("\n") + "\n")
}

/// `submit.sh` for hand submission of `graph`'s stages, whose scripts are `<stage>.sh` beside
/// it: each `sbatch`ed after the jobs of the stages it needs, logs where the driver's go in
/// `run_root`.
pub fn submit_script(graph: &Graph, pipeline: &str, workdir: &Path, run_root: &Path) -> String {
    let log_dir = run_root.join(SLURM_DIR);
    let var = |stage: &str| {
        let safe: String = stage
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("job_{safe}")
    };
    let mut lines = vec![
        "#!/bin/sh".to_string(),
        format!(
            "# Submits pipeline `{pipeline}`'s stages as Slurm jobs, each after the jobs of the"
        ),
        "# stages it needs. A stage already finished ends its job at once (it is cached).".into(),
        "set -e".into(),
        "here=\"$(cd \"$(dirname \"$0\")\" && pwd)\"".into(),
        format!("mkdir -p {}", shell_quote(&log_dir.to_string_lossy())),
    ];
    for stage in &graph.stages {
        let id = &stage.id.0;
        let after: Vec<String> = stage
            .deps
            .iter()
            .map(|d| format!("${}", var(&d.0)))
            .collect();
        let dependency = if after.is_empty() {
            String::new()
        } else {
            format!(" --dependency=afterok:{}", after.join(":"))
        };
        let log = log_dir.join(format!("{id}-%j.log"));
        lines.push(format!(
            "{v}=$(sbatch --parsable --job-name={name} --output={log} --chdir={dir}{dependency} \"$here/{id}.sh\")",
            v = var(id),
            name = shell_quote(&format!("tsq.{pipeline}.{id}")),
            log = shell_quote(&log.to_string_lossy()),
            dir = shell_quote(&workdir.to_string_lossy()),
        ));
        // `--parsable` prints `id` or `id;cluster`.
        lines.push(format!("{v}=${{{v}%%;*}}", v = var(id)));
        lines.push(format!("echo \"{id}: job ${}\"", var(id)));
    }
    lines.join("\n") + "\n"
}

/// The job name of a stage at a cache key in a run directory.
fn job_name(pipeline: &str, stage: &str, key: &str, run_root: &Path) -> String {
    let root = std::path::absolute(run_root).unwrap_or_else(|_| run_root.to_path_buf());
    let identity = serde_json::json!([key, root.to_string_lossy()]);
    let hash = crate::hash::json_blake3(&identity);
    format!("tsq.{pipeline}.{stage}.{}", &hash[..12])
}

/// This user's jobs Slurm still knows (ended ones for a while too), by id.
fn squeue() -> Result<BTreeMap<String, Listed>, ExecError> {
    let out = slurm(Command::new("squeue").args(["--me", "-h", "-t", "all", "-o", "%i|%j|%T|%r"]))?;
    Ok(out
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(4, '|');
            let listed = Listed {
                id: parts.next()?.trim().to_string(),
                name: parts.next()?.to_string(),
                state: parts.next()?.to_string(),
                reason: parts.next().unwrap_or_default().to_string(),
            };
            Some((listed.id.clone(), listed))
        })
        .collect())
}

/// Submits `script` as job `name`; its id.
fn sbatch(
    name: &str,
    log: &Path,
    workdir: &Path,
    after: &[&str],
    script: &Path,
) -> Result<String, ExecError> {
    let mut command = Command::new("sbatch");
    command
        .arg("--parsable")
        .arg(format!("--job-name={name}"))
        .arg("--output")
        .arg(log)
        .arg("--chdir")
        .arg(workdir);
    if !after.is_empty() {
        command.arg(format!("--dependency=afterok:{}", after.join(":")));
    }
    let out = slurm(command.arg(script))?;
    // `--parsable` prints `id` or `id;cluster`.
    let id = out.trim().split(';').next().unwrap_or_default().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(ExecError::Setup(format!(
            "sbatch answered `{}`, not a job id",
            out.trim()
        )));
    }
    Ok(id)
}

/// Runs a Slurm command; its standard output, or an error saying what it printed.
fn slurm(command: &mut Command) -> Result<String, ExecError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let out = command.output().map_err(|e| {
        ExecError::Setup(format!(
            "cannot run `{program}` ({e}): is this a Slurm login node? (`--executor local` runs here)"
        ))
    })?;
    if !out.status.success() {
        return Err(ExecError::Setup(format!(
            "`{program}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup(path: &Path, e: std::io::Error) -> ExecError {
    ExecError::Setup(format!("cannot write `{}`: {e}", path.display()))
}

/// `word` in single quotes for sh.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The end of a log (at most its last 16 KiB).
fn log_end(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 << 10)));
        let _ = file.take(16 << 10).read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The newest progress line ([`super::Progress`] without a terminal: `  STAGE done/total unit
/// ... eta Ns)`) of a job's log.
fn progress(log: &Path, stage: &str) -> Option<String> {
    let prefix = format!("  {stage} ");
    log_end(log)
        .lines()
        .rev()
        .find(|l| l.starts_with(&prefix) && l.contains(", eta "))
        .map(str::to_string)
}

/// The last `lines` lines of a log (at most its last 16 KiB), indented.
fn tail(path: &Path, lines: usize) -> String {
    let text = log_end(path);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver relays the newest progress line of a running job's stage, nothing else.
    #[test]
    fn the_newest_progress_line_of_the_stage_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("train.math-12.log");
        assert_eq!(progress(&log, "train.math"), None);
        let lines = [
            "  running train.math",
            "  train.math 8/32 steps acc 0.4 (0.50 steps/s, eta 48s)",
            "  train.math 16/32 steps acc 0.5 (0.50 steps/s, eta 32s)",
            "  warning: train.math: a long prompt",
            "  train.mathematics 3/9 steps (1.00 steps/s, eta 6s)",
        ];
        std::fs::write(&log, lines.join("\n")).unwrap();
        assert_eq!(progress(&log, "train.math").as_deref(), Some(lines[2]));
    }

    #[test]
    fn words_are_quoted_for_sh() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let name = |key: &str, root: &str| job_name("p", "train.math", key, Path::new(root));
        assert!(name("k1", "/a/runs/p").starts_with("tsq.p.train.math."));
        assert_eq!(name("k1", "/a/runs/p"), name("k1", "/a/runs/p"));
        assert_ne!(name("k1", "/a/runs/p"), name("k2", "/a/runs/p"));
        assert_ne!(name("k1", "/a/runs/p"), name("k1", "/b/runs/p"));
    }
}
