//! Errors from loading and running models: each names the file (or operation) and what is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("`{}`: {message}", file.display())]
    Load { file: PathBuf, message: String },
    #[error("`{}`: {source}", file.display())]
    Config {
        file: PathBuf,
        #[source]
        source: super::config::ConfigError,
    },
    #[error("{0}")]
    Input(String),
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl ModelError {
    pub fn load(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Load {
            file: file.into(),
            message: message.into(),
        }
    }

    /// The hyper-parameters in `file` were refused.
    pub fn config(file: impl Into<PathBuf>, source: super::config::ConfigError) -> Self {
        Self::Config {
            file: file.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
