//! What can go wrong writing a report: a template, a chart, a file.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("report template `{origin}`: {source:#}")]
    Template {
        /// The template's file, or `built-in`.
        origin: String,
        #[source]
        source: minijinja::Error,
    },
    /// plotters' errors are generic over its backend; what they say is kept.
    #[error("drawing a chart: {0}")]
    Chart(String),
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
