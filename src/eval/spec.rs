//! Evaluation options as a pipeline writes them (serde + schemars: part of the pipeline file's
//! schema), owned here so evaluation and training need nothing from the pipeline.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EvalMode {
    /// Generate an answer and judge it with the reward.
    #[default]
    Generate,
    /// Rank the options of a multiple-choice item by log-likelihood (`acc` and `acc_norm`).
    Loglik,
}

impl EvalMode {
    /// Whether prompts use the chat template unless told: instruct models answer in their
    /// template, while options are ranked as continuations of plain text (as lm-eval does).
    pub fn chats_by_default(self) -> bool {
        self == Self::Generate
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OptionForm {
    /// " {option text}" after the prompt.
    #[default]
    Text,
    /// " A", " B", ... after the prompt.
    Letter,
}
