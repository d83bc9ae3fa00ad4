//! What can go wrong reading data files and rendering records.

use std::path::PathBuf;

use super::card::DataFormat;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read `{path}` as {format:?}: {source}")]
    Read {
        path: PathBuf,
        format: DataFormat,
        #[source]
        source: polars::prelude::PolarsError,
    },
    #[error("cannot convert rows: {0}")]
    Convert(#[source] polars::prelude::PolarsError),
    #[error("cannot convert a row: {0}")]
    Row(#[source] serde_json::Error),
    /// A records file whose row lacks what every record has.
    #[error("a row lacks {0}")]
    Incomplete(&'static str),
}

/// A template that does not parse, or does not render for one record.
#[derive(Debug, thiserror::Error)]
#[error("{detail}{}", line.map(|l| format!(" (template line {l})")).unwrap_or_default())]
pub struct TemplateError {
    pub detail: String,
    pub line: Option<usize>,
}

impl From<minijinja::Error> for TemplateError {
    fn from(e: minijinja::Error) -> Self {
        Self {
            detail: e
                .detail()
                .map(str::to_string)
                .unwrap_or_else(|| e.kind().to_string()),
            line: e.line(),
        }
    }
}
