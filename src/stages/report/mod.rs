//! The `report` kind: renders the run's report ([`crate::report`]) once everything it shows has
//! finished. It depends on every other stage, so it reads a complete run directory.

pub mod collect;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::{Declared, Env, Kind, to_json};
use crate::dag::{Stage, StageId};
use crate::exec::{StageContext, StageError, StageRunner, file_input};
use crate::pipeline::Pipeline;
use crate::report::ReportFormat;

pub struct ReportKind;

impl Kind for ReportKind {
    fn name(&self) -> &'static str {
        "report"
    }

    /// 2: the first version that renders.
    fn version(&self) -> u32 {
        2
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        let spec = &p.spec;
        // Every stage the other kinds declare: the report shows them all.
        let deps: Vec<StageId> = (super::KINDS.iter())
            .filter(|k| k.name() != self.name())
            .flat_map(|k| k.declare(p))
            .map(|d| d.id)
            .collect();
        spec.report
            .iter()
            .map(|report| Declared {
                id: super::ids::report(),
                subject: None,
                deps: deps.clone(),
                config: to_json(report),
                pointer: "/report".into(),
            })
            .collect()
    }

    fn runner<'a>(&self, env: &'a Env<'a>, _: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        let p = env.pipeline;
        let spec = p.spec.report.as_ref()?;
        Some(Box::new(ReportStage {
            formats: spec.formats.clone(),
            markdown: spec.markdown_template.as_ref().map(|t| p.path(t)),
            html: spec.html_template.as_ref().map(|t| p.path(t)),
        }))
    }
}

struct ReportStage {
    formats: Vec<ReportFormat>,
    markdown: Option<PathBuf>,
    html: Option<PathBuf>,
}

impl StageRunner for ReportStage {
    /// The templates' text (a file named in the pipeline, or the built-in one): a changed
    /// template renders the report again.
    fn inputs(&self) -> Result<BTreeMap<String, String>, StageError> {
        let builtin = |text: &str| blake3::hash(text.as_bytes()).to_hex().to_string();
        let markdown = match &self.markdown {
            Some(path) => file_input(path)?,
            None => builtin(crate::report::render::MARKDOWN_TEMPLATE),
        };
        let html = match &self.html {
            Some(path) => file_input(path)?,
            None => builtin(crate::report::render::HTML_TEMPLATE),
        };
        Ok(BTreeMap::from([
            ("markdown_template".to_string(), markdown),
            ("html_template".to_string(), html),
        ]))
    }

    fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        // Every other stage is upstream: any of their directories sits in the run directory.
        let run_dir = ctx
            .upstream
            .values()
            .next()
            .and_then(|d| d.parent())
            .ok_or_else(|| StageError::failed("finding the run directory", "no upstream stage"))?;
        let templates =
            crate::report::Templates::with_files(self.markdown.as_deref(), self.html.as_deref())
                .map_err(|e| StageError::failed("reading the report templates", e))?;
        let report = collect::collect(run_dir);
        let written = crate::report::write(report, &self.formats, &ctx.out_dir, &templates)
            .map_err(|e| StageError::failed("writing the report", e))?;
        let names: Vec<String> = written
            .files
            .iter()
            .filter_map(|f| f.strip_prefix(&ctx.out_dir).ok())
            .map(|f| f.display().to_string())
            .collect();
        Ok(json!({
            "files": names,
            "missing": written.missing.len(),
            "chart_problems": written.chart_problems,
        }))
    }
}
