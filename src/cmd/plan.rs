//! `tsq plan`: the stage graph and each stage's status, without running anything; with the
//! Slurm executor, the `sbatch` options of each job it would submit.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use super::run::ExecutorChoice;
use super::{CmdError, Format, StageSelection, with_loaded};
use crate::dag::StageId;
use crate::exec::{PlanEntry, RunDir, Status};
use crate::pipeline::Override;
use crate::pipeline::spec::ExecutorKind;

pub fn run(
    file: &Path,
    overrides: &[Override],
    selection: &StageSelection,
    format: Format,
    choice: &ExecutorChoice,
) -> Result<(), CmdError> {
    with_loaded(file, overrides, selection, |loaded| {
        let run_root = &loaded.run_root;
        let plan = loaded
            .executor
            .plan(&RunDir::read_only(run_root), &loaded.opts)
            .map_err(CmdError::failed)?;
        let spec = choice.over(loaded.pipeline.spec.executor.as_ref());
        let mut jobs = BTreeMap::new();
        let mut queued = BTreeMap::new();
        if spec.kind == ExecutorKind::Slurm {
            for entry in plan.iter().filter(|e| e.will_run()) {
                let kind = loaded.graph.get(&entry.stage).map_or("", |s| s.kind);
                let options = crate::exec::job_options(&spec, &spec.resources.of(kind))
                    .map_err(CmdError::failed)?;
                jobs.insert(entry.stage.clone(), options);
            }
            let name = &loaded.pipeline.spec.name;
            // Where Slurm cannot be asked (not a login node), the plan stands without it.
            queued = crate::exec::queued_jobs(&plan, name, run_root).unwrap_or_else(|e| {
                eprintln!("warning: live jobs not shown: {e}");
                BTreeMap::new()
            });
        }
        match format {
            Format::Json => {
                let mut stages = serde_json::to_value(&plan).expect("json");
                let rows = stages.as_array_mut().into_iter().flatten().zip(&plan);
                for (stage, entry) in rows {
                    if let Some(options) = jobs.get(&entry.stage) {
                        stage["sbatch"] = json!(options);
                    }
                    if let Some(job) = queued.get(&entry.stage) {
                        stage["job"] = json!(job);
                    }
                }
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"run_dir": run_root, "stages": stages}))
                        .expect("json")
                );
            }
            Format::Text => print!(
                "{}",
                render_plan(&loaded.pipeline.spec.name, run_root, &plan, &jobs, &queued)
            ),
        }
        Ok(())
    })
}

/// The plan as aligned text lines: stage, status (with its live Slurm job, from `queued`),
/// dependencies, and the `sbatch` options of the stages in `jobs`.
pub fn render_plan(
    name: &str,
    run_root: &Path,
    plan: &[PlanEntry],
    jobs: &BTreeMap<StageId, Vec<String>>,
    queued: &BTreeMap<StageId, String>,
) -> String {
    let width = plan.iter().map(|e| e.stage.0.len()).max().unwrap_or(0);
    let mut out = format!("pipeline `{name}` (run directory {})\n", run_root.display());
    for e in plan {
        let status = match &e.status {
            Status::Cached => "cached".to_string(),
            Status::Stale(reasons) => format!("stale: {}", reasons.join(", ")),
            Status::ToRun => "to run".to_string(),
            Status::Skipped => "not selected".to_string(),
        };
        let status = match queued.get(&e.stage) {
            Some(job) => format!("{status} ({job})"),
            None => status,
        };
        let deps = if e.deps.is_empty() {
            String::new()
        } else {
            format!(
                "  (after {})",
                e.deps
                    .iter()
                    .map(|d| d.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        out.push_str(&format!("  {:width$}  {status}{deps}\n", e.stage.0));
        if let Some(detail) = &e.detail {
            out.push_str(&format!("  {:width$}    {detail}\n", ""));
        }
        if let Some(options) = jobs.get(&e.stage) {
            out.push_str(&format!(
                "  {:width$}    sbatch {}\n",
                "",
                options.join(" ")
            ));
        }
    }
    out
}
