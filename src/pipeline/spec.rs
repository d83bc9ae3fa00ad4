//! The pipeline file as written: serde + schemars types. This is the contract users write against;
//! `schemas/pipeline.schema.json` is generated from it (`tsq schema`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::adapt::spec::AdaptationSpec;
use crate::data::split::SplitSpec;
use crate::eval::spec::EvaluateSpec;
use crate::model::placement::{Device, Dtype};
use crate::report::ReportFormat;
use crate::reward::spec::RewardSpec;
use crate::rl::spec::ExpertSpec;
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
    /// The precision the weights are held and the stages compute in: `f32` (the CPU's fast
    /// training engine), `bf16` or `f16`. SVD always decomposes the weights as loaded.
    #[serde(default)]
    pub dtype: Dtype,
    /// Where the stages compute: `cpu` or `cuda` (the first GPU; tsq built with
    /// `scripts/build-cuda.sh build`).
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
