//! What a report shows, as data: the views [`crate::stages::report`] fills from a run directory
//! and the templates render (`report`, `charts`, `tsq`).

use serde::Serialize;

use crate::eval::Proportion;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub name: String,
    pub run_dir: String,
    /// Every setting's accuracy on every evaluation, one row per setting (the paper's layout).
    pub overview: Overview,
    pub summary: Vec<EvalTable>,
    pub training: Vec<Training>,
    /// The base model's singular values of a few targets (the same in every expert file).
    pub spectra: Vec<Spectrum>,
    pub experts: Vec<ExpertScales>,
    pub routers: Vec<RouterCheck>,
    pub mixtures: Vec<Mixture>,
    pub costs: Vec<Cost>,
    pub samples: Vec<SampleView>,
    pub provenance: Provenance,
    pub missing: Vec<Missing>,
}

/// A stage the pipeline has whose outputs could not be shown, and why.
#[derive(Debug, Serialize)]
pub struct Missing {
    pub stage: String,
    pub why: String,
}

/// Settings by evaluations: each cell an accuracy, marked when best or within noise of it.
#[derive(Debug, Default, Serialize)]
pub struct Overview {
    /// Evaluation stages, the columns.
    pub columns: Vec<String>,
    pub rows: Vec<OverviewRow>,
}

#[derive(Debug, Serialize)]
pub struct OverviewRow {
    pub with: String,
    pub kind: String,
    /// Per column: absent where the evaluation did not run this setting.
    pub cells: Vec<Option<OverviewCell>>,
}

#[derive(Debug, Serialize)]
pub struct OverviewCell {
    pub acc: f64,
    pub best: bool,
    /// Not the best, but not distinguishable from it item by item.
    pub within_noise: bool,
}

/// One evaluation: every setting's accuracy, the best marked, each compared with the best and
/// with the base model item by item.
#[derive(Debug, Serialize)]
pub struct EvalTable {
    pub stage: String,
    pub dataset: String,
    pub split: String,
    pub mode: String,
    pub items: usize,
    pub rows: Vec<EvalRow>,
}

#[derive(Debug, Serialize)]
pub struct EvalRow {
    pub with: String,
    /// `base`, `expert`, or the adaptation's strategy.
    pub kind: String,
    pub acc: Proportion,
    pub best: bool,
    /// Paired comparison with the best setting (absent for the best itself).
    pub vs_best: Option<Paired>,
    /// Paired comparison with the base model (absent for the base itself).
    pub vs_base: Option<Paired>,
}

/// Two settings on the same items: how many items only this one got right, only the other,
/// and the exact McNemar p-value of that split.
#[derive(Debug, Serialize)]
pub struct Paired {
    pub only_this: usize,
    pub only_other: usize,
    pub p_value: f64,
    pub within_noise: bool,
}

/// An expert's training, step by step (`train.<expert>/metrics.jsonl`).
#[derive(Debug, Serialize)]
pub struct Training {
    pub expert: String,
    pub steps: Vec<TrainStep>,
    pub kept_step: Option<u64>,
    pub best_val_accuracy: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct TrainStep {
    pub step: u64,
    pub reward: f64,
    pub reward_std: f64,
    pub kl: f64,
    pub zero_std_fraction: f64,
    pub tokens_per_s: f64,
    pub val_accuracy: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Spectrum {
    pub target: String,
    pub values: Vec<f64>,
}

/// How strongly an expert rescales each matrix's singular values, per layer and module: the
/// root-mean-square of (effective scale − 1). Not the mean scale: the sigmoid
/// parametrisation's Σs rescale keeps that at 1 by construction.
#[derive(Debug, Serialize)]
pub struct ExpertScales {
    pub expert: String,
    pub layers: Vec<usize>,
    pub modules: Vec<String>,
    /// `change[layer index][module index]`, absent where the expert leaves the target alone.
    pub change: Vec<Vec<Option<f64>>>,
}

/// A routing adaptation's check on held-out prompts (`router.json`).
#[derive(Debug, Serialize)]
pub struct RouterCheck {
    pub adaptation: String,
    pub strategy: String,
    pub mode: String,
    pub split: String,
    pub accuracy: Proportion,
    /// Routed-to targets, the confusion matrix's columns.
    pub columns: Vec<String>,
    /// Per true expert: items routed to each column.
    pub rows: Vec<(String, Vec<usize>)>,
    pub seconds_per_item: f64,
}

/// A few-shot mixture's search (`alpha.json`, one metrics line per CEM generation).
#[derive(Debug, Serialize)]
pub struct Mixture {
    pub adaptation: String,
    pub dataset: String,
    pub experts: Vec<String>,
    /// The kept α, per expert (one value each, or one per layer).
    pub alpha: Vec<Vec<f64>>,
    pub accuracy: f64,
    pub search_seconds: f64,
    pub generations: Vec<Generation>,
}

#[derive(Debug, Serialize)]
pub struct Generation {
    pub generation: u64,
    /// Best shot accuracy so far and the population's mean accuracy this generation.
    pub best_accuracy: f64,
    pub mean_accuracy: f64,
    /// The sampling distribution's mean α per expert.
    pub mean_alpha: Vec<f64>,
}

/// What adapting each input cost in an evaluation (from its results' `adaptation` block).
#[derive(Debug, Serialize)]
pub struct Cost {
    pub stage: String,
    pub with: String,
    pub strategy: String,
    pub first_pass_s: Option<f64>,
    pub second_pass_s: Option<f64>,
    pub fraction: Option<f64>,
    pub search_s: Option<f64>,
}

/// One sample completion of an evaluation.
#[derive(Debug, Serialize)]
pub struct SampleView {
    pub stage: String,
    pub with: String,
    pub id: String,
    pub correct: bool,
    pub prompt: String,
    pub answer: String,
    pub gold: String,
    /// A multiple-choice item's options, so a reader can tell what the answer's letter was.
    pub options: Vec<OptionView>,
}

/// One option of a multiple-choice sample.
#[derive(Debug, Serialize)]
pub struct OptionView {
    pub letter: String,
    pub text: String,
    /// `loglik` mode: the option's log-likelihood.
    pub loglik: Option<f64>,
    /// The model's answer.
    pub chosen: bool,
    pub gold: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct Provenance {
    /// The pipeline as run (`pipeline.json`), pretty-printed.
    pub pipeline: String,
    pub seed: Option<u64>,
    pub model_source: String,
    pub model_blake3: String,
    pub datasets: Vec<DataSource>,
    /// From the latest `run_started` event: tsq version and machine.
    pub tsq_version: String,
    pub machine: String,
    pub stages: Vec<StageTime>,
    pub total_seconds: f64,
    /// The containment generated code had, per stage that ran code (from its manifest).
    pub sandboxes: Vec<StageSandbox>,
}

#[derive(Debug, Serialize)]
pub struct StageSandbox {
    pub stage: String,
    pub containment: String,
}

#[derive(Debug, Serialize)]
pub struct DataSource {
    pub name: String,
    pub source: String,
    /// The source file's pinned (and checked) sha256, when its card pins one.
    pub sha256: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StageTime {
    pub stage: String,
    pub started_unix: f64,
    pub seconds: f64,
    pub key: String,
}
