//! `results.json` and `results.md` of an evaluation: metrics per model with standard errors and
//! 95% intervals, laid out close to lm-evaluation-harness's results file (`results`, `n-shot`,
//! `n-samples`, `config`, `versions`, `total_evaluation_time_seconds`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Proportion;
use super::runner::Sample;
use crate::reward::Verdict;

pub const RESULTS_JSON: &str = "results.json";
pub const RESULTS_MD: &str = "results.md";
pub const SAMPLES_FILE: &str = "samples.parquet";

/// One model's metrics on the evaluated items.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelResult {
    /// Fraction of items judged correct.
    pub acc: Proportion,
    /// `loglik` mode: fraction correct when options are ranked per character.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<Proportion>,
    /// Items whose answer could not be read (counted wrong).
    pub unparsable: usize,
    pub reward_mean: f64,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Wall time of the items evaluated by this process (a resumed run counts only its part).
    pub seconds: f64,
    pub items_timed: usize,
    pub items_per_s: f64,
    pub tokens_per_s: f64,
    /// What the first pass did, when this is an adaptation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptation: Option<AdaptationResult>,
}

/// An adaptation's first pass on the evaluated items.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AdaptationResult {
    pub strategy: String,
    /// Routing: items per chosen expert (or `base`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routed: BTreeMap<String, usize>,
    /// Routing: the expert trained on this dataset, when the labels lead to one; routing is
    /// right when it is chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_accuracy: Option<Proportion>,
    /// Routing: mean wall time per item of the first pass (choosing) and of the second
    /// (answering), and their ratio: what adapting each input adds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_pass_seconds_per_item: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_pass_seconds_per_item: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_pass_fraction: Option<f64>,
    /// Few-shot: the search's wall time (spent once per task) and the α it found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<Vec<Vec<f64>>>,
}

impl AdaptationResult {
    /// One line for `results.md`.
    fn summary(&self, with: &str) -> String {
        let mut parts = vec![format!("{with} ({})", self.strategy)];
        if !self.routed.is_empty() {
            let routed: Vec<String> = self
                .routed
                .iter()
                .map(|(t, n)| format!("{t} {n}"))
                .collect();
            parts.push(format!("routed: {}", routed.join(", ")));
        }
        if let (Some(acc), Some(expected)) = (&self.routing_accuracy, &self.expected) {
            parts.push(format!(
                "to `{expected}`: {}% [{}, {}]",
                pct(acc.value),
                pct(acc.ci95.0),
                pct(acc.ci95.1)
            ));
        }
        if let Some(f) = self.first_pass_fraction {
            parts.push(format!("first pass {}% of the second's time", pct(f)));
        }
        if let (Some(alpha), Some(s)) = (&self.alpha, self.search_seconds) {
            parts.push(format!("α {alpha:.3?} found in {s:.0} s"));
        }
        parts.join("; ")
    }
}

impl ModelResult {
    /// Metrics of `samples`; `seconds` covers `items_timed` of them.
    pub fn of(samples: &[&Sample], seconds: f64, items_timed: usize, timed_tokens: usize) -> Self {
        let n = samples.len();
        let count = |f: &dyn Fn(&Sample) -> bool| samples.iter().filter(|s| f(s)).count();
        let acc = Proportion::of(count(&|s| s.verdict == Verdict::Correct), n);
        let acc_norm = samples
            .iter()
            .all(|s| s.correct_norm.is_some())
            .then(|| Proportion::of(count(&|s| s.correct_norm == Some(true)), n))
            .filter(|_| n > 0);
        let rate = |x: f64| if seconds > 0.0 { x / seconds } else { 0.0 };
        Self {
            acc,
            acc_norm,
            unparsable: count(&|s| s.verdict == Verdict::Unparsable),
            reward_mean: samples.iter().map(|s| s.reward).sum::<f64>() / n.max(1) as f64,
            prompt_tokens: samples.iter().map(|s| s.prompt_tokens).sum(),
            new_tokens: samples.iter().map(|s| s.new_tokens).sum(),
            seconds,
            items_timed,
            items_per_s: rate(items_timed as f64),
            tokens_per_s: rate(timed_tokens as f64),
            adaptation: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NSamples {
    /// Items in the split.
    pub original: usize,
    /// Items evaluated (after `limit`).
    pub effective: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    /// The stage id, e.g. `eval.arc_easy`.
    pub task: String,
    pub dataset: String,
    pub split: String,
    pub mode: String,
    /// Metrics by model (`base`, expert names).
    pub results: BTreeMap<String, ModelResult>,
    #[serde(rename = "n-shot")]
    pub n_shot: u32,
    #[serde(rename = "n-samples")]
    pub n_samples: NSamples,
    /// The evaluation entry and its reward as run.
    pub config: Value,
    pub versions: BTreeMap<String, String>,
    /// Content hashes of what was evaluated (model file, records).
    pub inputs: BTreeMap<String, String>,
    pub total_evaluation_time_seconds: f64,
}

fn pct(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

impl Results {
    /// An lm-eval-style table: one row per model and metric.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "{} ({} split, {} mode, {}-shot, {} of {} items)\n\n",
            self.task,
            self.split,
            self.mode,
            self.n_shot,
            self.n_samples.effective,
            self.n_samples.original
        );
        out.push_str("| Model | Metric | Value (%) | ± Stderr | 95% CI | Unparsable | Items/s |\n");
        out.push_str("|---|---|---:|---:|---|---:|---:|\n");
        for (with, r) in &self.results {
            let metrics = std::iter::once(("acc", &r.acc))
                .chain(r.acc_norm.as_ref().map(|p| ("acc_norm", p)));
            for (name, p) in metrics {
                out.push_str(&format!(
                    "| {with} | {name} | {} | {} | [{}, {}] | {} | {:.2} |\n",
                    pct(p.value),
                    pct(p.stderr),
                    pct(p.ci95.0),
                    pct(p.ci95.1),
                    r.unparsable,
                    r.items_per_s
                ));
            }
        }
        for (with, r) in &self.results {
            if let Some(a) = &r.adaptation {
                out.push_str(&format!("\n{}\n", a.summary(with)));
            }
        }
        out
    }
}
