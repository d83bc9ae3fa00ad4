//! Prompt-based classification. A template turns an input into a question about its category.
//! `score` mode: rather than generating an answer and parsing `\boxed{label}` (the paper's way,
//! one decode per token), each label's answer `\boxed{label}` is scored after the prompt, all
//! labels in one pass sharing the prompt, and the log-likelihoods renormalised over the labels
//! decide. `generate` mode is the paper's: greedy answer, last `\boxed{}` parsed.

use serde::Serialize;
use serde_json::json;

use super::{AdaptError, LabelError};
use crate::data::template::TemplateFile;
use crate::eval::prompts::render;
use crate::model::Model;
use crate::model::generate::{GenerateOptions, generate};
use crate::model::score::{continuation_ids, score_options};
use crate::rl::options::softmax;

/// A template and the labels it asks the model to choose from.
pub struct Classifier {
    template: TemplateFile,
    labels: Vec<String>,
}

/// One input's classification.
#[derive(Clone, Debug, Serialize)]
pub struct Classified {
    /// The chosen label; in `generate` mode, what the answer's last `\boxed{}` holds, which may
    /// be no label at all (empty when it has none).
    pub label: String,
    /// log p(answer | prompt) of each label's answer, in label order.
    pub logliks: Vec<f64>,
    /// Those renormalised over the labels.
    pub probs: Vec<f64>,
}

/// The answer that means `label`: what the paper's template asks the model to write.
pub fn answer(label: &str) -> String {
    format!("\\boxed{{{label}}}")
}

impl Classifier {
    /// Labels must be distinct, non-empty words (they go inside `\boxed{}`).
    pub fn new(template: TemplateFile, labels: Vec<String>) -> Result<Self, AdaptError> {
        check_labels(&labels)?;
        Ok(Self { template, labels })
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The user turn asking about `input` (template variables: `question`, `labels`).
    pub fn prompt(&self, input: &str) -> Result<String, AdaptError> {
        self.template
            .render(&json!({"question": input, "labels": self.labels}))
            .map_err(AdaptError::from)
    }

    /// The question in the model's chat template (when it has one), as token ids.
    fn encode(&self, model: &Model, prompt: &str) -> Result<Vec<u32>, AdaptError> {
        let text = render(model, prompt, &[], model.chat.is_some())?;
        Ok(model.tokenizer.encode(&text)?)
    }

    /// The paper's way: a greedy answer of at most `max_new_tokens`, whose last `\boxed{}`
    /// is the label. `probs` is one-hot on that label (all zero when it is none).
    pub fn classify_by_generation(
        &self,
        model: &Model,
        prompts: &[String],
        max_new_tokens: usize,
    ) -> Result<Vec<Classified>, AdaptError> {
        let ids = prompts
            .iter()
            .map(|p| self.encode(model, p))
            .collect::<Result<Vec<_>, _>>()?;
        let opts = GenerateOptions {
            max_new_tokens,
            stop: vec!["}".into()],
            ..GenerateOptions::default()
        };
        let generations = generate(model, &ids, &opts)?;
        Ok(generations
            .iter()
            .map(|g| {
                let label = last_boxed(&g.text).unwrap_or_default();
                let probs = self
                    .labels
                    .iter()
                    .map(|l| f64::from(u8::from(*l == label)))
                    .collect();
                Classified {
                    label,
                    logliks: vec![],
                    probs,
                }
            })
            .collect())
    }

    /// Classifies the questions [`Self::prompt`] made, with `model` (in its chat template when
    /// it has one).
    pub fn classify(
        &self,
        model: &Model,
        prompts: &[String],
    ) -> Result<Vec<Classified>, AdaptError> {
        let answers = self
            .labels
            .iter()
            .map(|l| continuation_ids(model, &answer(l)))
            .collect::<Result<Vec<_>, _>>()?;
        let items = prompts
            .iter()
            .map(|prompt| Ok((self.encode(model, prompt)?, answers.clone())))
            .collect::<Result<Vec<_>, AdaptError>>()?;
        let scored = score_options(model, &items)?;
        Ok(scored
            .iter()
            .map(|scores| {
                let logliks: Vec<f64> = scores.iter().map(|s| s.sum).collect();
                self.decided(logliks.clone(), softmax(&logliks))
            })
            .collect())
    }

    /// Batch calibration: each label's probability divided by its mean over `results` (the
    /// model's prior for the label under this template), renormalised, and the labels decided
    /// again. Small models favour some labels whatever the input (SmolLM2: whichever category
    /// the template lists first); dividing by the prior removes that. Calibrate on unlabelled
    /// inputs of the kind to be routed, never on items evaluated afterwards.
    pub fn calibrate(&self, results: &[Classified]) -> Vec<Classified> {
        let prior = self.prior(results);
        results.iter().map(|r| self.divided(r, &prior)).collect()
    }

    /// Each label's mean probability over `results`.
    pub fn prior(&self, results: &[Classified]) -> Vec<f64> {
        let n = results.len().max(1) as f64;
        (0..self.labels.len())
            .map(|k| results.iter().map(|r| r.probs[k]).sum::<f64>() / n)
            .collect()
    }

    /// `r` with each label's probability divided by its `prior`, renormalised, decided again.
    pub fn divided(&self, r: &Classified, prior: &[f64]) -> Classified {
        let scaled: Vec<f64> = r
            .probs
            .iter()
            .zip(prior)
            .map(|(p, q)| p / q.max(f64::MIN_POSITIVE))
            .collect();
        let total: f64 = scaled.iter().sum();
        let probs = scaled.iter().map(|p| p / total).collect();
        self.decided(r.logliks.clone(), probs)
    }

    /// The likeliest label (the first listed among equals).
    fn decided(&self, logliks: Vec<f64>, probs: Vec<f64>) -> Classified {
        let best = (0..probs.len())
            .max_by(|&a, &b| probs[a].total_cmp(&probs[b]).then(b.cmp(&a)))
            .unwrap_or(0);
        Classified {
            label: self.labels[best].clone(),
            logliks,
            probs,
        }
    }
}

/// The text inside the last `\boxed{...}` of `text` (up to its closing brace or the end: the
/// generation stops at the brace).
fn last_boxed(text: &str) -> Option<String> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let inner = &text[start..];
    let end = inner.find('}').unwrap_or(inner.len());
    Some(inner[..end].trim().to_string())
}

/// Labels a classifier can be asked for: distinct words that fit inside `\boxed{}`.
pub fn check_labels(labels: &[String]) -> Result<(), LabelError> {
    if labels.len() < 2 {
        return Err(LabelError::TooFew(labels.to_vec()));
    }
    for (i, label) in labels.iter().enumerate() {
        if label.trim().is_empty() || label.contains(['{', '}']) || label.trim() != label {
            return Err(LabelError::Unfit(label.clone()));
        }
        if labels[..i].contains(label) {
            return Err(LabelError::Repeated(label.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> TemplateFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jinja");
        std::fs::write(&path, text).unwrap();
        TemplateFile::load(&path).unwrap()
    }

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn labels_are_checked() {
        let t = || template("{{ question }}");
        assert!(Classifier::new(t(), labels(&["math", "code"])).is_ok());
        for bad in [
            &["math"][..],
            &["math", "math"],
            &["math", ""],
            &["a}", "b"],
            &[" a", "b"],
        ] {
            assert!(Classifier::new(t(), labels(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_template_sees_the_question_and_the_labels() {
        let c = Classifier::new(
            template("Is {{ question }} {{ labels | join(' or ') }}?"),
            labels(&["math", "code"]),
        )
        .unwrap();
        assert_eq!(c.prompt("2+2").unwrap(), "Is 2+2 math or code?");
        let strict = Classifier::new(template("{{ topic }}"), labels(&["a", "b"])).unwrap();
        assert!(strict.prompt("x").is_err(), "unknown variables are errors");
    }

    /// A label the model favours for every input stops winning once divided by its prior.
    #[test]
    fn calibration_divides_out_a_label_the_model_always_favours() {
        let c = Classifier::new(template("{{ question }}"), labels(&["code", "math"])).unwrap();
        let raw = [vec![0.9, 0.1], vec![0.6, 0.4], vec![0.8, 0.2]]
            .into_iter()
            .map(|p: Vec<f64>| c.decided(p.iter().map(|x| x.ln()).collect(), p))
            .collect::<Vec<_>>();
        assert!(raw.iter().all(|r| r.label == "code"));
        let calibrated = c.calibrate(&raw);
        let chosen: Vec<&str> = calibrated.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(chosen, ["code", "math", "code"]);
        for r in &calibrated {
            assert!((r.probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn the_last_boxed_answer_is_the_label() {
        assert_eq!(
            last_boxed("\\boxed{math} or \\boxed{ code }"),
            Some("code".into())
        );
        assert_eq!(
            last_boxed("It is \\boxed{reasoning"),
            Some("reasoning".into())
        );
        assert_eq!(last_boxed("code"), None);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[-1.0, -3.0, -1.5]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p[0] > p[2] && p[2] > p[1]);
    }
}
