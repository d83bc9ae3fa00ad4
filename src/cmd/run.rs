//! `tsq run`: run every stage that is not cached, holding the run directory's lock.

use std::path::Path;

use super::{CmdError, Loaded, StageSelection, with_loaded};
use crate::exec::{ExecError, Interrupt, RunDir};
use crate::pipeline::Override;

pub fn run(
    file: &Path,
    overrides: &[Override],
    selection: &StageSelection,
    dry_run: bool,
) -> Result<(), CmdError> {
    if dry_run {
        return super::plan::run(file, overrides, selection, super::Format::Text);
    }
    with_loaded(file, overrides, selection, |loaded| {
        let Loaded {
            pipeline,
            graph,
            opts,
            executor,
            run_root,
        } = loaded;
        // Refuse before creating anything; the run re-checks under the lock.
        executor
            .preflight(&RunDir::read_only(&run_root), &opts)
            .map_err(CmdError::failed)?;
        let run_dir = RunDir::open(&run_root).map_err(CmdError::failed)?;
        run_dir.record_run(&pipeline.spec, graph).map_err(|e| {
            CmdError::Failed(format!(
                "cannot record the run in `{}`: {e}",
                run_root.display()
            ))
        })?;
        eprintln!("run `{}` in {}", pipeline.spec.name, run_root.display());
        let interrupt = Interrupt::install();
        match executor.run(&run_dir, &opts, &interrupt) {
            Ok(plan) => {
                print_results(&run_root, graph, &plan);
                eprintln!("finished: outputs in {}", run_root.display());
                Ok(())
            }
            Err(e @ ExecError::Interrupted(_)) => Err(CmdError::Interrupted(e.to_string())),
            Err(e) => Err(CmdError::failed_with_causes(&e)),
        }
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
