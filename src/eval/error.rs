//! The error of running a task's items (rendering, scoring, generating, judging), shared by
//! evaluation and RL rollouts: what was being done, to which item, and the cause kept as the
//! error's source.

/// A failure while working on a task's items.
#[derive(Debug, thiserror::Error)]
#[error("{doing}")]
pub struct TaskError {
    /// What was being done, as a phrase ("scoring options", "rendering item `q3`").
    pub doing: String,
    #[source]
    pub cause: Box<dyn std::error::Error + Send + Sync>,
}

impl TaskError {
    pub fn new(doing: impl Into<String>, cause: impl std::fmt::Display) -> Self {
        Self {
            doing: doing.into(),
            cause: cause.to_string().into(),
        }
    }

    /// `doing` failed on `item` (an item id).
    pub fn on_item(doing: &str, item: &str, cause: impl std::fmt::Display) -> Self {
        Self::new(format!("{doing} item `{item}`"), cause)
    }
}
