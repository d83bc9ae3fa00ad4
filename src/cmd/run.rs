//! `tsq run`: run every stage that is not cached, holding the run directory's lock.

use std::path::Path;

use super::{CmdError, StageSelection, graph_of, load_or_report};
use crate::assets::TsqHome;
use crate::exec::{ExecError, Executor, Interrupt, RunDir};
use crate::pipeline::Override;

pub fn run(
    file: &Path,
    overrides: &[Override],
    selection: &StageSelection,
    dry_run: bool,
) -> Result<(), CmdError> {
    let pipeline = load_or_report(file, overrides)?;
    let graph = graph_of(&pipeline)?;
    let opts = selection.resolve(&graph)?;
    let home = TsqHome::from_env();
    let env = crate::stages::Env::new(&pipeline, home);
    let factory = |stage: &crate::dag::Stage| env.runner_for(stage);
    let executor = Executor {
        graph: &graph,
        factory: &factory,
    };
    let run_root = pipeline.runs_root().join(&pipeline.spec.name);
    if dry_run {
        let plan = executor
            .plan(&RunDir::read_only(&run_root), &opts)
            .map_err(CmdError::failed)?;
        print!(
            "{}",
            super::plan::render_plan(&pipeline.spec.name, &run_root, &plan)
        );
        return Ok(());
    }
    // Refuse before creating anything; the run re-checks under the lock.
    executor
        .preflight(&RunDir::read_only(&run_root), &opts)
        .map_err(CmdError::failed)?;
    let run_dir = RunDir::lock(&run_root).map_err(CmdError::Failed)?;
    crate::fsutil::write_json(&run_root.join("pipeline.json"), &pipeline.spec)
        .map_err(|e| CmdError::Failed(format!("cannot write pipeline.json: {e}")))?;
    eprintln!("run `{}` in {}", pipeline.spec.name, run_root.display());
    let interrupt = Interrupt::install();
    match executor.run(&run_dir, &opts, &interrupt) {
        Ok(plan) => {
            print_results(&run_root, &graph, &plan);
            eprintln!("finished: outputs in {}", run_root.display());
            Ok(())
        }
        Err(e @ ExecError::Interrupted(_)) => Err(CmdError::Interrupted(e.to_string())),
        Err(e) => Err(CmdError::failed_with_causes(&e)),
    }
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
