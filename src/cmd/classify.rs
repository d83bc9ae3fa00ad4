//! `tsq classify`: what a prompt-based classifier template makes of some inputs — each input's
//! label and every label's probability — so a template can be tuned before a long run. The
//! template and labels are given, or taken from a pipeline's routing adaptation (whose labels'
//! experts are then shown too).

use std::path::{Path, PathBuf};

use serde_json::json;

use super::{CmdError, Format, ModelArgs};
use crate::adapt::classify::Classifier;
use crate::data::template::TemplateFile;

/// Where the template and labels come from.
pub enum Source {
    Template {
        template: PathBuf,
        labels: Vec<String>,
    },
    /// `PIPELINE:NAME`: a routing adaptation of a pipeline.
    Adaptation(String),
}

/// The template file, the labels, and where each label leads (when known).
fn resolve(source: Source) -> Result<(PathBuf, Vec<String>, Vec<String>), CmdError> {
    match source {
        Source::Template { template, labels } => Ok((template, labels, vec![])),
        Source::Adaptation(from) => {
            let (file, name) = from.rsplit_once(':').ok_or_else(|| {
                CmdError::Usage(format!("`--adaptation {from}` is not `PIPELINE:NAME`"))
            })?;
            let pipeline = super::load_or_report(Path::new(file), &[])?;
            let routing = pipeline
                .spec
                .adaptations
                .get(name)
                .and_then(|a| a.routing())
                .ok_or_else(|| {
                    CmdError::Usage(format!("`{file}` has no routing adaptation `{name}`"))
                })?;
            let experts = &pipeline.spec.experts;
            let targets = routing
                .labels()
                .iter()
                .map(|l| routing.target(l, experts).to_string())
                .collect();
            Ok((
                pipeline.path(routing.template()),
                routing.labels().to_vec(),
                targets,
            ))
        }
    }
}

pub fn run(
    model_args: &ModelArgs,
    source: Source,
    inputs: &[String],
    calibrate: bool,
    format: Format,
) -> Result<(), CmdError> {
    let (template, labels, targets) = resolve(source)?;
    let template = TemplateFile::load(&template).map_err(|d| CmdError::Usage(d.to_string()))?;
    let classifier =
        Classifier::new(template, labels).map_err(|e| CmdError::Usage(e.to_string()))?;
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
        .map_err(CmdError::failed)?;
    if calibrate {
        results = classifier.calibrate(&results);
    }
    let expert_of = |label: &str| -> Option<&str> {
        let k = classifier.labels().iter().position(|l| l == label)?;
        targets.get(k).map(String::as_str)
    };
    match format {
        Format::Json => {
            let items: Vec<_> = inputs
                .iter()
                .zip(&results)
                .map(|(input, r)| json!({"input": input, "label": r.label, "expert": expert_of(&r.label), "labels": classifier.labels(), "probs": r.probs, "logliks": r.logliks}))
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
                let chosen = match expert_of(&r.label) {
                    Some(expert) => format!("{} → {expert}", r.label),
                    None => r.label.clone(),
                };
                println!("{chosen:<12} {}  {input:?}", scores.join("  "));
            }
        }
    }
    Ok(())
}
