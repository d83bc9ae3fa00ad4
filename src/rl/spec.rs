//! How an expert is trained, as a pipeline's `experts.<name>.train` writes it (serde +
//! schemars: part of the pipeline file's schema), owned here so RL needs nothing from the
//! pipeline.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::eval::spec::{EvalMode, OptionForm};
use crate::svf::Parametrization;

/// How an expert is trained: REINFORCE on task rewards (the paper) or supervised next-token
/// loss on the dataset's targets (its ablation). Defaults follow the paper where it is right.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    /// A named set of defaults that the fields written beside it override: `tsq` (what works
    /// best here, measured) or `paper` (the paper's loop: one greedy completion per prompt, no
    /// baseline; pair it with reward `values: {correct: 1, wrong: -1, unparsable: -1}` for its
    /// ±1 rewards).
    pub preset: Preset,
    /// Optimisation steps.
    #[schemars(range(min = 1))]
    pub steps: u32,
    /// Train-split prompts per step, drawn in a seeded order without replacement.
    #[schemars(range(min = 1, max = 1024))]
    pub prompts_per_step: u32,
    /// `rl`: REINFORCE from the reward; `sft`: next-token loss on the rendered target.
    pub objective: Objective,
    /// Where rollouts come from: free generation, or the options of a multiple-choice record.
    pub rollout: Rollout,
    /// `generate` (and sampled `options`): samples per prompt, the group advantages compare.
    #[schemars(range(min = 1, max = 64))]
    pub samples_per_prompt: u32,
    /// `generate`: sampling temperature.
    #[schemars(range(min = 0.0, max = 5.0))]
    pub temperature: f64,
    /// `generate`: nucleus sampling (1 keeps every token).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub top_p: f64,
    /// `generate`: the most tokens of one completion.
    #[schemars(range(min = 1, max = 4096))]
    pub max_new_tokens: u32,
    /// `generate`: a completion stops at any of these strings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// `options`: score each option's text or its letter.
    pub options: OptionForm,
    /// `options`: take the exact expected reward over the options (no sampling variance) or
    /// sample `samples_per_prompt` options from the model's distribution over them.
    pub option_policy: OptionPolicy,
    /// Render prompts with the model's chat template (default: on for `generate`, off for
    /// `options`, as evaluation does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<bool>,
    /// What a sample's reward is compared with.
    pub baseline: Baseline,
    /// What advantages are divided by.
    pub scale: AdvantageScale,
    /// How the summed token losses are normalised.
    pub loss_norm: LossNorm,
    /// Leave out groups whose samples all got the same reward (they carry no signal once a
    /// baseline is subtracted).
    pub skip_uniform_groups: bool,
    /// Adam's learning rate on z.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub lr: f64,
    pub schedule: Schedule,
    /// Steps of linear warm-up before the schedule.
    pub warmup_steps: u32,
    /// Gradient-norm limit (0: no clipping).
    #[schemars(range(min = 0.0))]
    pub clip: f64,
    /// Coefficient of the KL divergence from the base model, KL(policy ‖ base): exact over the
    /// options with `rollout: options`, else per sampled token (the k3 estimator, as TRL).
    #[schemars(range(min = 0.0))]
    pub kl: f64,
    pub parametrization: Parametrization,
    /// Validate on the val split every this many steps (0: only after the last step).
    pub validate_every: u32,
    /// Validate on at most this many val items.
    #[schemars(range(min = 1))]
    pub validate_limit: u32,
    /// Save a resumable checkpoint every this many steps.
    #[schemars(range(min = 1))]
    pub checkpoint_every: u32,
    /// Which vector the stage's expert is: the best on validation or the last.
    pub keep: Keep,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            preset: Preset::Tsq,
            steps: 100,
            prompts_per_step: 16,
            objective: Objective::Rl,
            rollout: Rollout::Generate,
            samples_per_prompt: 4,
            temperature: 0.7,
            top_p: 1.0,
            max_new_tokens: 256,
            stop: Vec::new(),
            options: OptionForm::Text,
            option_policy: OptionPolicy::Expectation,
            chat: None,
            baseline: Baseline::Rloo,
            scale: AdvantageScale::None,
            loss_norm: LossNorm::Sequence,
            skip_uniform_groups: true,
            lr: 2e-3,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            clip: 1e-3,
            kl: 0.0,
            parametrization: Parametrization::Sigmoid,
            validate_every: 10,
            validate_limit: 200,
            checkpoint_every: 5,
            keep: Keep::Best,
        }
    }
}

impl TrainSpec {
    /// The paper's loop (reference.md): greedy rollouts, one per prompt, the raw reward as the
    /// advantage, per-sequence sums, Adam lr 2e-3, clip 1e-3, no KL, sigmoid z from 0.1.
    pub fn paper() -> Self {
        Self {
            preset: Preset::Paper,
            rollout: Rollout::Generate,
            samples_per_prompt: 1,
            temperature: 0.0,
            baseline: Baseline::None,
            scale: AdvantageScale::None,
            loss_norm: LossNorm::Sequence,
            skip_uniform_groups: false,
            ..Self::default()
        }
    }

    /// Whether prompts are rendered with the chat template.
    pub fn chat(&self) -> bool {
        self.chat
            .unwrap_or(self.rollout.eval_mode().chats_by_default())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    #[default]
    Tsq,
    Paper,
}

impl Preset {
    /// The fields this preset sets, as written in a pipeline file.
    pub fn fields(self) -> serde_json::Map<String, serde_json::Value> {
        let spec = match self {
            Self::Tsq => TrainSpec::default(),
            Self::Paper => TrainSpec::paper(),
        };
        match serde_json::to_value(spec) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => unreachable!("a TrainSpec serialises to an object"),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// REINFORCE: maximise the expected reward.
    #[default]
    Rl,
    /// Minimise the next-token loss of the dataset's rendered target.
    Sft,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rollout {
    /// Free generation, judged by the reward (math, code, open answers).
    #[default]
    Generate,
    /// The record's options: the policy is the model's probability of each option after the
    /// prompt, renormalised over the options (multiple choice only).
    Options,
}

impl Rollout {
    /// The evaluation mode that judges rollouts of this kind (validation uses it).
    pub fn eval_mode(self) -> EvalMode {
        match self {
            Self::Generate => EvalMode::Generate,
            Self::Options => EvalMode::Loglik,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OptionPolicy {
    /// E[r] = Σ_k p_k r_k, differentiated exactly.
    #[default]
    Expectation,
    /// `samples_per_prompt` options drawn from p.
    Sample,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// The raw reward (the paper's).
    None,
    /// The mean reward of the prompt's samples (GRPO).
    Mean,
    /// The mean reward of the prompt's other samples (RLOO).
    #[default]
    Rloo,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageScale {
    #[default]
    None,
    /// The standard deviation of the prompt's rewards (GRPO).
    GroupStd,
    /// The standard deviation of the step's rewards.
    BatchStd,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossNorm {
    /// Each sequence's token losses summed, averaged over sequences (the paper's).
    #[default]
    Sequence,
    /// Divided by the step's number of completion tokens (DAPO).
    Token,
    /// Divided by sequences × `max_new_tokens` (Dr. GRPO).
    Constant,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    Constant,
    /// Cosine decay to 0 over the steps after warm-up.
    Cosine,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// The vector with the best validation accuracy.
    #[default]
    Best,
    /// The vector after the last step.
    Last,
}

/// An SVF expert trained with REINFORCE on one dataset.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpertSpec {
    /// Name of a dataset in `datasets`.
    pub dataset: String,
    /// Name of a reward in `rewards`.
    pub reward: String,
    /// Start from another expert's vectors instead of the initial value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
    #[serde(default)]
    pub train: TrainSpec,
}
