//! `tsq report RUN_DIR`: renders a run's report from whatever the run directory holds, so a run
//! that stopped early (or one whose pipeline has no `report` section) still gets one.

use std::path::{Path, PathBuf};

use super::CmdError;
use crate::report::{ReportFormat, Templates, write};

/// Template files replacing the built-in ones.
pub struct TemplateFiles {
    pub markdown: Option<PathBuf>,
    pub html: Option<PathBuf>,
}

pub fn run(
    run_dir: &Path,
    formats: &[ReportFormat],
    out: Option<&Path>,
    templates: &TemplateFiles,
) -> Result<(), CmdError> {
    if !run_dir.join("pipeline.json").is_file() {
        return Err(CmdError::Failed(format!(
            "`{}` is not a run directory (it has no pipeline.json): give `runs/<name>` of a pipeline that has run",
            run_dir.display()
        )));
    }
    let templates = Templates::with_files(templates.markdown.as_deref(), templates.html.as_deref())
        .map_err(CmdError::failed)?;
    // Not `<run>/report/`: that is the `report` stage's directory, which only the stage writes.
    let out = out.unwrap_or(run_dir);
    let report = crate::stages::report::collect::collect(run_dir);
    let written = write(report, formats, out, &templates).map_err(CmdError::failed)?;
    for m in &written.missing {
        eprintln!("warning: `{}` is not in the report: {}", m.stage, m.why);
    }
    for p in &written.chart_problems {
        eprintln!("warning: chart not drawn: {p}");
    }
    for f in written
        .files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e != "svg"))
    {
        println!("{}", f.display());
    }
    Ok(())
}
