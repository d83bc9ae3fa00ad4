//! What can go wrong in a first pass: bad labels or templates (the pipeline's to fix), a router
//! file that does not load, or the model failing under it.

use std::path::PathBuf;

use crate::model::error::ModelError;

/// Labels that cannot go inside `\boxed{}` or repeat.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("at least two labels are needed, got {0:?}")]
    TooFew(Vec<String>),
    #[error("label {0:?} must be non-empty, without surrounding spaces or braces")]
    Unfit(String),
    #[error("label `{0}` is given twice")]
    Repeated(String),
}

#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    #[error(transparent)]
    Labels(#[from] LabelError),
    /// The classifier template does not parse or render.
    #[error("the classifier template: {0}")]
    Template(#[from] crate::data::TemplateError),
    #[error("a router needs one target per label")]
    Targets,
    #[error("router file `{path}`: {source}")]
    RouterFile {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<candle_core::Error> for AdaptError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(e.into())
    }
}
