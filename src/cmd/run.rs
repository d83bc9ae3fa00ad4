//! `tsq run`: run every stage that is not cached, here (each stage under its lock) or as Slurm
//! jobs.

use std::path::Path;

use super::{CmdError, Loaded, StageSelection, with_loaded};
use crate::exec::{ExecError, Interrupt, JobCommand, RunDir, SlurmRun};
use crate::pipeline::Override;
use crate::pipeline::spec::{ExecutorKind, ExecutorSpec};

/// `--executor`, `--partition`, `--account`, `--detach` as given (over the pipeline's
/// `executor:` section).
#[derive(Debug, Default)]
pub struct ExecutorChoice {
    pub kind: Option<ExecutorKind>,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub detach: bool,
}

impl ExecutorChoice {
    /// The pipeline's executor section with what the command line says over it.
    pub fn over(&self, spec: Option<&ExecutorSpec>) -> ExecutorSpec {
        let mut spec = spec.cloned().unwrap_or_default();
        if let Some(kind) = self.kind {
            spec.kind = kind;
        }
        spec.partition = self.partition.clone().or(spec.partition);
        spec.account = self.account.clone().or(spec.account);
        spec
    }
}

pub fn run(
    file: &Path,
    overrides: &[Override],
    selection: &StageSelection,
    dry_run: bool,
    choice: &ExecutorChoice,
) -> Result<(), CmdError> {
    if dry_run {
        return super::plan::run(file, overrides, selection, super::Format::Text, choice);
    }
    with_loaded(file, overrides, selection, |loaded| {
        let Loaded {
            pipeline,
            graph,
            opts,
            executor,
            run_root,
        } = loaded;
        let spec = choice.over(pipeline.spec.executor.as_ref());
        if choice.detach && spec.kind != ExecutorKind::Slurm {
            return Err(CmdError::Usage(
                "--detach submits jobs: it needs `--executor slurm`".into(),
            ));
        }
        // Refuse before creating anything; each stage is checked again under its lock.
        let plan = executor
            .preflight(&RunDir::read_only(&run_root), &opts)
            .map_err(CmdError::failed)?;
        let run_dir = RunDir::open(&run_root).map_err(CmdError::failed)?;
        run_dir.record_run(&pipeline.spec, graph).map_err(|e| {
            CmdError::Failed(format!(
                "cannot record the run in `{}`: {e}",
                run_root.display()
            ))
        })?;
        let interrupt = Interrupt::install();
        let outcome = match spec.kind {
            ExecutorKind::Local => {
                eprintln!("run `{}` in {}", pipeline.spec.name, run_root.display());
                executor.run(&run_dir, &opts, &interrupt).map(|_| ())
            }
            ExecutorKind::Slurm => {
                eprintln!(
                    "run `{}` in {} as Slurm jobs",
                    pipeline.spec.name,
                    run_root.display()
                );
                let command = job_command(file, overrides)?;
                let slurm = SlurmRun {
                    graph,
                    plan: &plan,
                    run: &run_dir,
                    pipeline: &pipeline.spec.name,
                    command: &command,
                    spec: &spec,
                };
                let outcome = slurm.run(choice.detach, &interrupt);
                if choice.detach {
                    return outcome.map_err(CmdError::failed);
                }
                outcome
            }
        };
        match outcome {
            Ok(()) => {
                print_results(&run_root, graph, &plan);
                eprintln!("finished: outputs in {}", run_root.display());
                Ok(())
            }
            Err(e @ ExecError::Interrupted(_)) => Err(CmdError::Interrupted(e.to_string())),
            Err(e) => Err(CmdError::failed_with_causes(&e)),
        }
    })
}

/// What each job runs: this tsq, `run` on the same pipeline file with the same `--set`s, here,
/// stages one at a time (`--executor local`, whatever the pipeline's section says).
pub(super) fn job_command(file: &Path, overrides: &[Override]) -> Result<JobCommand, CmdError> {
    let failed = |what: &str, e: std::io::Error| CmdError::Failed(format!("{what}: {e}"));
    let program = std::env::current_exe().map_err(|e| failed("finding tsq's own path", e))?;
    let file = std::path::absolute(file).map_err(|e| failed("resolving the pipeline's path", e))?;
    let file = file.to_str().ok_or_else(|| {
        CmdError::Failed(format!(
            "the pipeline's path `{}` is not UTF-8, which job scripts need",
            file.display()
        ))
    })?;
    let mut args = vec!["run".to_string(), file.to_string()];
    for o in overrides {
        args.extend(["--set".to_string(), o.argument.clone()]);
    }
    args.extend(["--executor".to_string(), "local".to_string()]);
    Ok(JobCommand {
        program,
        args,
        workdir: std::env::current_dir().map_err(|e| failed("reading the working directory", e))?,
    })
}
/// The results table of every evaluation the run finished or found cached.
fn print_results(run_root: &Path, graph: &crate::dag::Graph, plan: &[crate::exec::PlanEntry]) {
    for entry in plan {
        let is_eval = graph.get(&entry.stage).is_some_and(|s| s.kind == "eval");
        let table = run_root
            .join(&entry.stage.0)
            .join(crate::eval::results::RESULTS_MD);
        if is_eval
            && let Ok(text) = crate::fsutil::read_bounded(&table, crate::fsutil::MAX_TEXT_BYTES)
        {
            println!("\n{text}");
        }
    }
}
