//! What can go wrong in a first pass: bad labels or templates (the pipeline's to fix), a router
//! file that does not load, or the model failing under it.

use std::path::PathBuf;

use crate::model::error::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    /// Labels that cannot go inside `\boxed{}` or repeat.
    #[error("{0}")]
    Labels(String),
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
