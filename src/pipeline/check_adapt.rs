//! Semantic checks of `adaptations`: names that `with` can tell apart from experts, templates
//! that render, labels that lead to experts, few-shot shots that never come from a test split.

use std::collections::BTreeSet;

use super::Pipeline;
use super::validate::{check_mode, reference};
use crate::adapt::spec::{AdaptationSpec, BASE, ClassifierAdaptation, FewShotAdaptation, Routing};
use crate::data::template::TemplateFile;
use crate::diagnostic::Diagnostic;
use crate::eval::spec::SplitName;
use crate::rl::spec::{Objective, Rollout};

pub fn check_adaptations(p: &Pipeline, errors: &mut Vec<Diagnostic>) {
    for (name, ad) in &p.spec.adaptations {
        let ptr = format!("/adaptations/{name}");
        if name == BASE || p.spec.experts.contains_key(name) {
            errors.push(
                p.doc
                    .diagnostic(
                        &ptr,
                        true,
                        format!(
                            "adaptation `{name}` has the name of {}",
                            if name == BASE {
                                "the base model"
                            } else {
                                "an expert"
                            }
                        ),
                    )
                    .with_help("evaluations name both in `with`: give the adaptation another name"),
            );
        }
        match ad {
            AdaptationSpec::Prompt(r) => check_routing(p, &ptr, r, errors),
            AdaptationSpec::Classifier(c) => {
                check_routing(p, &ptr, c, errors);
                check_classifier(p, &ptr, c, errors);
            }
            AdaptationSpec::FewShot(f) => check_few_shot(p, &ptr, f, errors),
        }
    }
}

fn check_routing(p: &Pipeline, ptr: &str, r: &dyn Routing, errors: &mut Vec<Diagnostic>) {
    if let Err(e) = crate::adapt::classify::check_labels(r.labels()) {
        errors.push(
            p.doc
                .diagnostic(&format!("{ptr}/labels"), false, e.to_string()),
        );
    }
    let labels: BTreeSet<&str> = r.labels().iter().map(String::as_str).collect();
    let mut targets: BTreeSet<&str> = p.spec.experts.keys().map(String::as_str).collect();
    targets.insert(BASE);
    for (label, to) in r.route() {
        let at = format!("{ptr}/route/{label}");
        reference(p, &at, label, &labels, "labels", errors);
        reference(p, &at, to, &targets, "experts (or `base`)", errors);
    }
    if r.experts(&p.spec.experts).is_empty() {
        errors.push(
            p.doc
                .diagnostic(
                    &format!("{ptr}/labels"),
                    false,
                    "no label leads to an expert",
                )
                .with_help("name experts as labels, or map labels to experts in `route`"),
        );
    }
    let path = p.path(r.template());
    let at = format!("{ptr}/template");
    if !path.exists() {
        let message = format!("file `{}` does not exist", path.display());
        errors.push(p.doc.diagnostic(&at, false, message));
        return;
    }
    match TemplateFile::load(&path) {
        Err(e) => errors.push(e),
        Ok(t) => {
            let vars = serde_json::json!({"question": "What is 2 + 2?", "labels": r.labels()});
            if let Err(e) = t.render(&vars) {
                let message = format!("the template does not render: {e}");
                errors.push(
                    p.doc
                        .diagnostic(&at, false, message)
                        .with_help("a classifier template sees `question` and `labels` only"),
                );
            }
        }
    }
}

/// The classification expert trains on the labels' answers after the chat-templated question.
fn check_classifier(
    p: &Pipeline,
    ptr: &str,
    c: &ClassifierAdaptation,
    errors: &mut Vec<Diagnostic>,
) {
    if p.spec.svd.is_none() {
        errors.push(p.doc.diagnostic(
            ptr,
            true,
            "the classifier strategy trains an expert: it needs the `svd` section",
        ));
    }
    let t = &c.train;
    let written = |field: &str| {
        p.doc
            .value
            .pointer(&format!("{ptr}/train/{field}"))
            .is_some()
    };
    let conflicts = [
        (
            "rollout",
            written("rollout") && t.rollout != Rollout::Options,
            "`rollout` must be `options`: the classifier is trained on the labels' answers",
        ),
        (
            "chat",
            t.chat == Some(false),
            "`chat` must be on: the classifier's question is a chat turn",
        ),
        (
            "objective",
            t.objective == Objective::Sft,
            "`objective` must be `rl`: the classifier learns from the label reward",
        ),
    ];
    for (field, bad, message) in conflicts {
        if bad {
            errors.push(
                p.doc
                    .diagnostic(&format!("{ptr}/train/{field}"), false, message),
            );
        }
    }
}

fn check_few_shot(p: &Pipeline, ptr: &str, f: &FewShotAdaptation, errors: &mut Vec<Diagnostic>) {
    let experts: BTreeSet<&str> = p.spec.experts.keys().map(String::as_str).collect();
    for (i, e) in f.experts.iter().enumerate() {
        reference(
            p,
            &format!("{ptr}/experts/{i}"),
            e,
            &experts,
            "experts",
            errors,
        );
    }
    let datasets: BTreeSet<&str> = p.spec.datasets.keys().map(String::as_str).collect();
    reference(
        p,
        &format!("{ptr}/dataset"),
        &f.dataset,
        &datasets,
        "datasets",
        errors,
    );
    let rewards: BTreeSet<&str> = p.spec.rewards.keys().map(String::as_str).collect();
    if let Some(r) = &f.reward {
        reference(p, &format!("{ptr}/reward"), r, &rewards, "rewards", errors);
    }
    if f.split == SplitName::Test {
        errors.push(
            p.doc
                .diagnostic(
                    &format!("{ptr}/split"),
                    false,
                    "shots must not come from the test split: the mixture would be chosen on items it is evaluated on",
                )
                .with_help("use `train` or `val`"),
        );
    }
    check_mode(p, ptr, f.mode, f.reward.as_deref(), errors);
    let cem = &f.cem;
    if cem.alpha_min >= cem.alpha_max {
        errors.push(p.doc.diagnostic(
            &format!("{ptr}/cem/alpha_max"),
            false,
            format!(
                "`alpha_max` ({}) must be above `alpha_min` ({})",
                cem.alpha_max, cem.alpha_min
            ),
        ));
    }
    if cem.elites() == 0 {
        errors.push(p.doc.diagnostic(
            &format!("{ptr}/cem/elite_ratio"),
            false,
            format!(
                "{} of a population of {} keeps no candidate: raise `elite_ratio` or `population`",
                cem.elite_ratio, cem.population
            ),
        ));
    }
}
