//! Adaptations as a pipeline's `adaptations:` section writes them (serde + schemars: part of the
//! pipeline file's schema), owned here so adaptation needs nothing from the pipeline.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::eval::spec::{EvalMode, OptionForm, SplitName, default_eval_tokens};
use crate::rl::spec::{ExpertSpec, Rollout, TrainSpec};

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
