//! Reports: what a run did, how well, at what cost and how it was made, as `report.md` (for
//! terminals and pull requests; charts as `charts/*.svg` beside it) and `report.html` (one
//! self-contained file: inline CSS and SVG, no scripts, no requests). [`collect`] reads a run
//! directory (whatever exists of it), [`charts`] draws, [`render`] fills the templates.

pub mod charts;
mod error;
pub mod render;
pub mod view;

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use error::ReportError;
use view::{Missing, Report};

pub const REPORT_MD: &str = "report.md";
pub const REPORT_HTML: &str = "report.html";
const CHARTS_DIR: &str = "charts";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReportFormat {
    Markdown,
    Html,
}

/// The templates to render with: the built-in ones unless replaced by files.
pub struct Templates {
    pub markdown: render::Template,
    pub html: render::Template,
}

impl Default for Templates {
    fn default() -> Self {
        let builtin = |text: &str, name| render::Template {
            text: text.to_string(),
            origin: "built-in".into(),
            name,
        };
        Self {
            markdown: builtin(render::MARKDOWN_TEMPLATE, REPORT_MD),
            html: builtin(render::HTML_TEMPLATE, REPORT_HTML),
        }
    }
}

impl Templates {
    /// The built-in templates, with either replaced by a file.
    pub fn with_files(markdown: Option<&Path>, html: Option<&Path>) -> Result<Self, ReportError> {
        let mut templates = Self::default();
        for (path, template) in [
            (markdown, &mut templates.markdown),
            (html, &mut templates.html),
        ] {
            if let Some(path) = path {
                template.text = crate::fsutil::read_bounded(path, crate::fsutil::MAX_TEXT_BYTES)
                    .map_err(|source| ReportError::Read {
                        path: path.to_path_buf(),
                        source,
                    })?;
                template.origin = path.display().to_string();
            }
        }
        Ok(templates)
    }
}

/// What writing a report did.
pub struct Written {
    pub files: Vec<PathBuf>,
    /// Stages whose outputs could not be shown, with why.
    pub missing: Vec<Missing>,
    /// Charts that could not be drawn, with why.
    pub chart_problems: Vec<String>,
}

/// Renders `report` in each of `formats` into `out` (created if needed). Fails only when a
/// template fails or a file cannot be written; missing stages are reported inside the report
/// and in [`Written::missing`].
pub fn write(
    report: Report,
    formats: &[ReportFormat],
    out: &Path,
    templates: &Templates,
) -> Result<Written, ReportError> {
    let (charts, chart_problems) = render::charts(&report);
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let mut files = Vec::new();
    for format in formats {
        let template = match format {
            ReportFormat::Markdown => &templates.markdown,
            ReportFormat::Html => &templates.html,
        };
        let text = render::render(&report, &charts, template)?;
        if *format == ReportFormat::Markdown {
            files.extend(write_charts(&out.join(CHARTS_DIR), &charts)?);
        }
        let path = out.join(template.name);
        crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|e| io(&path, e))?;
        files.push(path);
    }
    Ok(Written {
        files,
        missing: report.missing,
        chart_problems,
    })
}

/// A failed write of `path`, for `map_err`.
fn io(path: &Path, source: std::io::Error) -> ReportError {
    ReportError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes each chart as `<dir>/<id>.svg` and removes charts an earlier report left there that
/// this one no longer has (so the Markdown never shows a stale picture).
fn write_charts(dir: &Path, charts: &[render::Chart]) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut written = Vec::new();
    for chart in charts {
        let path = dir.join(format!("{}.svg", chart.id));
        crate::fsutil::write_atomic(&path, chart.svg.as_bytes()).map_err(|e| io(&path, e))?;
        written.push(path);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "svg") && !written.contains(&path) {
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
        }
    }
    Ok(written)
}
