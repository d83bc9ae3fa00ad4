//! `tsq plan`: the stage graph and each stage's status, without running anything.

use std::path::Path;

use serde_json::json;

use super::{CmdError, Format, StageSelection, with_loaded};
use crate::exec::{PlanEntry, RunDir, Status};
use crate::pipeline::Override;

pub fn run(
    file: &Path,
    overrides: &[Override],
    selection: &StageSelection,
    format: Format,
) -> Result<(), CmdError> {
    with_loaded(file, overrides, selection, |loaded| {
        let run_root = &loaded.run_root;
        let plan = loaded
            .executor
            .plan(&RunDir::read_only(run_root), &loaded.opts)
            .map_err(CmdError::failed)?;
        match format {
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(&json!({"run_dir": run_root, "stages": plan}))
                    .expect("json")
            ),
            Format::Text => print!(
                "{}",
                render_plan(&loaded.pipeline.spec.name, run_root, &plan)
            ),
        }
        Ok(())
    })
}

/// The plan as aligned text lines: stage, status, dependencies.
pub fn render_plan(name: &str, run_root: &Path, plan: &[PlanEntry]) -> String {
    let width = plan.iter().map(|e| e.stage.0.len()).max().unwrap_or(0);
    let mut out = format!("pipeline `{name}` (run directory {})\n", run_root.display());
    for e in plan {
        let status = match &e.status {
            Status::Cached => "cached".to_string(),
            Status::Stale(reasons) => format!("stale: {}", reasons.join(", ")),
            Status::ToRun => "to run".to_string(),
            Status::Skipped => "not selected".to_string(),
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
    }
    out
}
