//! `tsq classify`: what a prompt-based classifier template makes of some inputs — each input's
//! label and every label's probability — so a template can be tuned before a long run.

use std::path::Path;

use serde_json::json;

use super::{CmdError, Format, ModelArgs};
use crate::adapt::classify::Classifier;
use crate::data::template::TemplateFile;

pub fn run(
    model_args: &ModelArgs,
    template: &Path,
    labels: &[String],
    inputs: &[String],
    calibrate: bool,
    format: Format,
) -> Result<(), CmdError> {
    let template = TemplateFile::load(template).map_err(|d| CmdError::Usage(d.to_string()))?;
    let classifier = Classifier::new(template, labels.to_vec()).map_err(CmdError::Usage)?;
    // A template that does not render is the user's to fix: say so before loading the model.
    let prompts = inputs
        .iter()
        .map(|input| {
            classifier.prompt(input).map_err(|e| {
                CmdError::Usage(format!("the template does not render for {input:?}: {e}"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let model = model_args.load()?;
    let mut results = classifier
        .classify(&model, &prompts)
        .map_err(CmdError::Failed)?;
    if calibrate {
        results = classifier.calibrate(&results);
    }
    match format {
        Format::Json => {
            let items: Vec<_> = inputs
                .iter()
                .zip(&results)
                .map(|(input, r)| json!({"input": input, "label": r.label, "labels": classifier.labels(), "probs": r.probs, "logliks": r.logliks}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&items).expect("json"));
        }
        Format::Text => {
            for (input, r) in inputs.iter().zip(&results) {
                let scores: Vec<String> = classifier
                    .labels()
                    .iter()
                    .zip(&r.probs)
                    .map(|(l, p)| format!("{l} {p:.2}"))
                    .collect();
                println!("{:<12} {}  {input:?}", r.label, scores.join("  "));
            }
        }
    }
    Ok(())
}
