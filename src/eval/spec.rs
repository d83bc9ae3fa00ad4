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

/// One evaluation: a dataset's split scored with the base model and/or experts. Each entry is an
/// `eval.<name>` stage (`name` defaults to the dataset's), so one dataset can be evaluated
/// several times with different modes, splits or settings.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateSpec {
    /// Stage name: `eval.<name>`; default the dataset's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"))]
    pub name: Option<String>,
    /// Name of a dataset in `datasets`.
    pub dataset: String,
    #[serde(default)]
    pub split: SplitName,
    /// What to evaluate: `base`, expert names and adaptation names.
    #[serde(rename = "with")]
    #[schemars(length(min = 1))]
    pub with: Vec<String>,
    /// Name of a reward in `rewards`. Required in `generate` mode; in `loglik` mode a
    /// `multiple_choice` reward names the record's `choices` and `gold` fields (default those).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<String>,
    #[serde(default)]
    pub mode: EvalMode,
    /// Render prompts with the model's chat template (default: on for `generate`, off for
    /// `loglik`, as lm-evaluation-harness).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<bool>,
    /// Solved examples put before each prompt, drawn (seeded) from the dataset's train split;
    /// they need the dataset's `target` template (or, in `loglik` mode, the gold option).
    #[serde(default)]
    #[schemars(range(max = 32))]
    pub shots: u32,
    /// Evaluate at most this many items of the split (the first ones in the split's seeded order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub limit: Option<u32>,
    /// `generate` mode: the most tokens generated per answer.
    #[serde(default = "default_eval_tokens")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_new_tokens: u32,
    /// `generate` mode: 0 is greedy.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 5.0))]
    pub temperature: f64,
    /// `generate` mode: generation stops at any of these strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// `loglik` mode: score each option's text (as lm-evaluation-harness) or its letter.
    #[serde(default)]
    pub options: OptionForm,
    /// Items per batch.
    #[serde(default = "default_eval_batch")]
    #[schemars(range(min = 1, max = 256))]
    pub batch_size: u32,
}

impl EvaluateSpec {
    /// Its stage is `eval.<this>`: `name`, else the dataset's name.
    pub fn stage_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.dataset)
    }
}

pub(crate) fn default_eval_tokens() -> u32 {
    256
}
fn default_eval_batch() -> u32 {
    8
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SplitName {
    Train,
    Val,
    #[default]
    Test,
}

impl SplitName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Val => "val",
            Self::Test => "test",
        }
    }
}

/// One `evaluate` entry with its name, chat setting and seed resolved.
#[derive(Clone, Debug)]
pub struct ResolvedEval {
    /// `eval.<name>` is its stage.
    pub name: String,
    /// Its index in `evaluate` (for locating errors).
    pub index: usize,
    pub spec: EvaluateSpec,
    pub chat: bool,
    /// Seed of shot selection and sampling.
    pub seed: u64,
}

impl ResolvedEval {
    pub fn new(index: usize, spec: &EvaluateSpec, seed: u64) -> Self {
        Self {
            name: spec.stage_name().to_string(),
            index,
            chat: spec.chat.unwrap_or(spec.mode.chats_by_default()),
            spec: spec.clone(),
            seed,
        }
    }
}
