//! A routing first pass as the `adapt.<name>` stage saves it (`router.json`) and evaluation,
//! `tsq generate --adapt` and `tsq chat` load it: the classifier template's text, the labels and
//! where each leads, the decision mode, and the label prior measured for calibration. Loading
//! the file, not the pipeline's template, keeps what an evaluation routes with equal to what the
//! stage measured.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::AdaptError;
use super::classify::{Classified, Classifier};
use crate::adapt::spec::{BASE, ClassifyMode};
use crate::data::template::TemplateFile;
use crate::eval::Proportion;
use crate::model::Model;

pub const ROUTER_FILE: &str = "router.json";

/// Tokens a `generate`-mode answer may take: enough for `\boxed{reasoning}` and a short preamble.
const GENERATE_TOKENS: usize = 32;

/// `router.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouterFile {
    pub strategy: String,
    pub mode: ClassifyMode,
    /// The classifier template's source.
    pub template: String,
    pub labels: Vec<String>,
    /// Where each label leads (an expert or `base`), in label order.
    pub targets: Vec<String>,
    /// The classification expert the first pass runs with (`classifier`: a file of the stage),
    /// or none (the base model).
    pub first_pass_expert: Option<String>,
    /// Each label's mean probability on the calibration prompts (`score` mode), or none.
    pub prior: Option<Vec<f64>>,
    /// Calibration prompts used, by dataset (train splits only).
    pub calibration_items: BTreeMap<String, usize>,
    /// Each routed expert's training dataset: inputs of that dataset belong to that expert.
    pub expert_datasets: BTreeMap<String, String>,
    /// Routing measured on the routed experts' val splits.
    pub check: Option<RoutingCheck>,
}

/// How well the router sends held-out inputs of each expert's task to that expert.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoutingCheck {
    /// The split the inputs came from.
    pub split: String,
    /// Fraction routed to the expert trained on the input's task.
    pub accuracy: Proportion,
    /// True expert → chosen target → count.
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
    /// Mean wall time of the first pass per input.
    pub seconds_per_item: f64,
}

/// One input's route.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Route {
    /// The label the first pass chose (in `generate` mode, whatever the answer boxed).
    pub label: String,
    /// The expert it leads to, or `base`.
    pub target: String,
    /// Each label's probability after calibration, in label order.
    pub probs: Vec<f64>,
}

/// A loaded router.
pub struct Router {
    pub file: RouterFile,
    classifier: Classifier,
}

impl Router {
    pub fn new(file: RouterFile) -> Result<Self, AdaptError> {
        if file.targets.len() != file.labels.len() {
            return Err(AdaptError::Targets);
        }
        let template = TemplateFile::from_source(&file.template)?;
        let classifier = Classifier::new(template, file.labels.clone())?;
        Ok(Self { file, classifier })
    }

    pub fn load(path: &Path) -> Result<Self, AdaptError> {
        let bad = |source: Box<dyn std::error::Error + Send + Sync>| AdaptError::RouterFile {
            path: path.to_path_buf(),
            source,
        };
        let file: RouterFile = crate::fsutil::read_json(path, crate::fsutil::MAX_TEXT_BYTES)
            .map_err(|e| bad(e.into()))?;
        Self::new(file).map_err(|e| bad(e.into()))
    }

    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// The first pass's raw decisions on `inputs` (no calibration).
    pub fn classify(
        &self,
        model: &Model,
        inputs: &[String],
    ) -> Result<Vec<Classified>, AdaptError> {
        let prompts = inputs
            .iter()
            .map(|i| self.classifier.prompt(i))
            .collect::<Result<Vec<_>, _>>()?;
        match self.file.mode {
            ClassifyMode::Score => self.classifier.classify(model, &prompts),
            ClassifyMode::Generate => {
                self.classifier
                    .classify_by_generation(model, &prompts, GENERATE_TOKENS)
            }
        }
    }

    /// Routes each input: classify, calibrate with the saved prior, follow the label.
    pub fn route(&self, model: &Model, inputs: &[String]) -> Result<Vec<Route>, AdaptError> {
        let raw = self.classify(model, inputs)?;
        Ok(raw.iter().map(|r| self.follow(r)).collect())
    }

    /// Where a raw classification leads once calibrated; a label that is none of ours means the
    /// base model (never whatever was loaded last).
    pub fn follow(&self, raw: &Classified) -> Route {
        let decided = match &self.file.prior {
            Some(prior) => self.classifier.divided(raw, prior),
            None => raw.clone(),
        };
        let target = self
            .file
            .labels
            .iter()
            .position(|l| *l == decided.label)
            .map_or(BASE, |k| self.file.targets[k].as_str());
        Route {
            label: decided.label,
            target: target.to_string(),
            probs: decided.probs,
        }
    }
}

/// The confusion matrix and accuracy of `routes` against the true experts of their inputs.
pub fn check(split: &str, truth: &[&str], routes: &[Route], seconds: f64) -> RoutingCheck {
    let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut right = 0;
    for (t, r) in truth.iter().zip(routes) {
        *confusion
            .entry(t.to_string())
            .or_default()
            .entry(r.target.clone())
            .or_default() += 1;
        right += usize::from(*t == r.target);
    }
    RoutingCheck {
        split: split.into(),
        accuracy: Proportion::of(right, routes.len()),
        confusion,
        seconds_per_item: seconds / routes.len().max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(prior: Option<Vec<f64>>) -> Router {
        Router::new(RouterFile {
            strategy: "prompt".into(),
            mode: ClassifyMode::Score,
            template: "{{ question }}".into(),
            labels: vec!["code".into(), "math".into(), "other".into()],
            targets: vec!["coder".into(), "math".into(), BASE.into()],
            first_pass_expert: None,
            prior,
            calibration_items: BTreeMap::new(),
            expert_datasets: BTreeMap::new(),
            check: None,
        })
        .unwrap()
    }

    fn raw(label: &str, probs: Vec<f64>) -> Classified {
        Classified {
            label: label.into(),
            logliks: vec![],
            probs,
        }
    }

    #[test]
    fn labels_lead_to_their_targets_and_anything_else_to_the_base_model() {
        let r = router(None);
        assert_eq!(r.follow(&raw("code", vec![0.7, 0.2, 0.1])).target, "coder");
        assert_eq!(r.follow(&raw("other", vec![0.1, 0.2, 0.7])).target, BASE);
        // A generated answer that boxes no label of ours.
        assert_eq!(r.follow(&raw("poetry", vec![0.0, 0.0, 0.0])).target, BASE);
    }

    #[test]
    fn the_saved_prior_calibrates_each_route() {
        let r = router(Some(vec![0.8, 0.1, 0.1]));
        let route = r.follow(&raw("code", vec![0.6, 0.3, 0.1]));
        assert_eq!(
            (route.label.as_str(), route.target.as_str()),
            ("math", "math")
        );
    }

    #[test]
    fn the_check_counts_each_true_expert_row() {
        let routes: Vec<Route> = ["coder", "math", "base"]
            .iter()
            .map(|t| Route {
                label: String::new(),
                target: t.to_string(),
                probs: vec![],
            })
            .collect();
        let c = check("val", &["coder", "coder", "math"], &routes, 3.0);
        assert_eq!(c.accuracy.value, 1.0 / 3.0);
        assert_eq!(c.confusion["coder"]["math"], 1);
        assert_eq!(c.confusion["math"]["base"], 1);
        assert_eq!(c.seconds_per_item, 1.0);
    }
}
