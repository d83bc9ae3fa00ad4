//! Semantic checks that a schema cannot express: references between sections, cycles, regexes,
//! templates, files, split sizes. Each problem is located at the field that causes it.

use std::collections::BTreeSet;

use regex::Regex;

use super::spec::PipelineSpec;

use crate::adapt::spec::BASE;

use crate::rl::spec::ExpertSpec;

use crate::eval::spec::EvalMode;

use super::{Pipeline, ResolvedDataset};
use crate::assets::AssetSource;
use crate::dag::{StageId, dependency_order};
use crate::data::card::load_card;
use crate::data::template::TemplateFile;
use crate::diagnostic::{Diagnostic, did_you_mean};
use crate::eval::spec::ResolvedEval;
use crate::reward::spec::RewardSpec;
use crate::rl::spec::{Objective, Rollout};
use crate::svd::targets::Layers;

/// Collects every semantic problem; loads dataset cards into the pipeline as a side effect.
pub fn semantic_checks(p: &mut Pipeline) -> Result<(), Vec<Diagnostic>> {
    let mut errors = Vec::new();
    check_references(p, &mut errors);
    check_model(p, &mut errors);
    check_svd(&p.spec, p, &mut errors);
    check_datasets(p, &mut errors);
    check_report(p, &mut errors);
    check_rewards(p, &mut errors);
    super::check_adapt::check_adaptations(p, &mut errors);
    if errors.is_empty() {
        check_init_cycles(p, &mut errors);
    }
    p.evaluations = p
        .spec
        .evaluate
        .iter()
        .enumerate()
        .map(|(i, ev)| ResolvedEval::new(i, ev, p.spec.seed))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// `init_from` chains between experts must not loop (the only references that can).
fn check_init_cycles(p: &Pipeline, errors: &mut Vec<Diagnostic>) {
    // Named as their training stages are, so the cycle reads as the graph would report it.
    let id = |expert: &str| StageId::new("train", Some(expert));
    let chains: Vec<(StageId, Vec<StageId>)> = (p.spec.experts.iter())
        .map(|(name, ex)| (id(name), ex.init_from.iter().map(|f| id(f)).collect()))
        .collect();
    let nodes: Vec<(&StageId, &[StageId])> = chains
        .iter()
        .map(|(s, deps)| (s, deps.as_slice()))
        .collect();
    if let Err(cycle) = dependency_order(&nodes) {
        let first = cycle
            .cycle
            .first()
            .map(|s| s.0.trim_start_matches("train.").to_string())
            .unwrap_or_default();
        errors.push(p.doc.diagnostic(
            &format!("/experts/{first}/init_from"),
            false,
            cycle.to_string(),
        ));
    }
}

/// Each reward compiles (regexes, composite parts) and passes its own unit tests.
fn check_rewards(p: &Pipeline, errors: &mut Vec<Diagnostic>) {
    for (name, spec) in &p.spec.rewards {
        let base = format!("/rewards/{name}");
        let dangling = match spec {
            RewardSpec::Composite(c) => c
                .parts
                .iter()
                .any(|part| !p.spec.rewards.contains_key(&part.reward)),
            _ => false,
        };
        if dangling {
            continue; // reported by `check_references`
        }
        let reward = match crate::reward::Reward::compile(name, &p.spec.rewards) {
            Ok(reward) => reward,
            Err(e) => {
                errors.push(
                    p.doc
                        .diagnostic(&format!("{base}{}", e.pointer), false, e.message),
                );
                continue;
            }
        };
        for (i, test) in spec.tests().iter().enumerate() {
            let ptr = format!("{base}/tests/{i}");
            match reward.judge(&test.completion, &test.record) {
                Ok(j) if j.verdict == test.expect => {}
                Ok(j) => {
                    let d = p.doc.diagnostic(
                        &format!("{ptr}/expect"),
                        false,
                        format!(
                            "reward test failed: expected `{}`, got `{}` (extracted {}, gold `{}`)",
                            crate::hash::serde_name(&test.expect),
                            crate::hash::serde_name(&j.verdict),
                            j.extracted
                                .map(|e| format!("`{e}`"))
                                .unwrap_or("nothing".into()),
                            j.gold
                        ),
                    );
                    errors.push(match j.detail {
                        Some(detail) => d.with_help(detail),
                        None => d,
                    });
                }
                Err(e) => errors.push(p.doc.diagnostic(
                    &format!("{ptr}/record"),
                    false,
                    e.to_string(),
                )),
            }
        }
    }
}

/// What training an expert needs beyond its references: decomposed matrices, a reward that can
/// judge its rollouts, and options only where the reward has them.
fn check_training(p: &Pipeline, name: &str, ex: &ExpertSpec, errors: &mut Vec<Diagnostic>) {
    let ptr = format!("/experts/{name}");
    if p.spec.svd.is_none() {
        errors.push(
            p.doc
                .diagnostic(&ptr, true, "training an expert needs the `svd` section")
                .with_help(
                    "add `svd: {targets: ['mlp\\.(gate|up|down)_proj']}` (the paper's targets)",
                ),
        );
    }
    let t = &ex.train;
    let multiple_choice = matches!(
        p.spec.rewards.get(&ex.reward),
        Some(RewardSpec::MultipleChoice(_))
    );
    if t.objective == Objective::Rl && t.rollout == Rollout::Options && !multiple_choice {
        errors.push(p.doc.diagnostic(
            &format!("{ptr}/train/rollout"),
            false,
            format!(
                "`rollout: options` needs a `multiple_choice` reward, and `{}` is not one",
                ex.reward
            ),
        ));
    }
    let has_target = p
        .spec
        .datasets
        .get(&ex.dataset)
        .is_some_and(|d| d.target.is_some());
    if t.objective == Objective::Sft && !has_target {
        errors.push(
            p.doc
                .diagnostic(
                    &format!("{ptr}/train/objective"),
                    false,
                    format!(
                        "`objective: sft` trains on the rendered target, and dataset `{}` has no `target` template",
                        ex.dataset
                    ),
                )
                .with_help("give the dataset a `target:` template (e.g. templates/targets/choice_text.jinja)"),
        );
    }
}

/// Checks that `name` is one of `known`; `what` names the section for the message.
pub(super) fn reference(
    p: &Pipeline,
    ptr: &str,
    name: &str,
    known: &BTreeSet<&str>,
    what: &str,
    errors: &mut Vec<Diagnostic>,
) {
    if known.contains(name) {
        return;
    }
    let mut d = p
        .doc
        .diagnostic(ptr, false, format!("`{name}` is not defined in `{what}`"));
    d = match did_you_mean(name, known.iter().copied()) {
        Some(s) => d.with_help(format!("did you mean `{s}`?")),
        None if known.is_empty() => d.with_help(format!("`{what}` is empty")),
        None => d.with_help(format!(
            "defined: {}",
            known.iter().copied().collect::<Vec<_>>().join(", ")
        )),
    };
    errors.push(d);
}

fn check_references(p: &Pipeline, errors: &mut Vec<Diagnostic>) {
    let spec = &p.spec;
    let datasets: BTreeSet<&str> = spec.datasets.keys().map(String::as_str).collect();
    let rewards: BTreeSet<&str> = spec.rewards.keys().map(String::as_str).collect();
    let experts: BTreeSet<&str> = spec.experts.keys().map(String::as_str).collect();
    for (name, ex) in &spec.experts {
        check_training(p, name, ex, errors);
        reference(
            p,
            &format!("/experts/{name}/dataset"),
            &ex.dataset,
            &datasets,
            "datasets",
            errors,
        );
        reference(
            p,
            &format!("/experts/{name}/reward"),
            &ex.reward,
            &rewards,
            "rewards",
            errors,
        );
        if let Some(from) = &ex.init_from {
            reference(
                p,
                &format!("/experts/{name}/init_from"),
                from,
                &experts,
                "experts",
                errors,
            );
        }
    }
    for (name, r) in &spec.rewards {
        if let RewardSpec::Composite(c) = r {
            for (i, part) in c.parts.iter().enumerate() {
                reference(
                    p,
                    &format!("/rewards/{name}/parts/{i}/reward"),
                    &part.reward,
                    &rewards,
                    "rewards",
                    errors,
                );
            }
        }
    }
    let mut evaluated = BTreeSet::new();
    for (i, ev) in spec.evaluate.iter().enumerate() {
        check_eval_mode(p, i, ev, errors);
        reference(
            p,
            &format!("/evaluate/{i}/dataset"),
            &ev.dataset,
            &datasets,
            "datasets",
            errors,
        );
        let name = ev.name.as_deref().unwrap_or(&ev.dataset);
        if !evaluated.insert(name) {
            let field = if ev.name.is_some() { "name" } else { "dataset" };
            errors.push(
                p.doc
                    .diagnostic(
                        &format!("/evaluate/{i}/{field}"),
                        false,
                        format!("a second evaluation named `{name}` (stage `eval.{name}`)"),
                    )
                    .with_help("give one of them a `name`, or list everything to compare in one entry's `with`"),
            );
        }
        if let Some(r) = &ev.reward {
            reference(
                p,
                &format!("/evaluate/{i}/reward"),
                r,
                &rewards,
                "rewards",
                errors,
            );
        }
        let mut targets: BTreeSet<&str> = experts.clone();
        targets.extend(spec.adaptations.keys().map(String::as_str));
        targets.insert(BASE);
        for (j, w) in ev.with.iter().enumerate() {
            let ptr = format!("/evaluate/{i}/with/{j}");
            let what = "experts or `adaptations` (or `base`)";
            reference(p, &ptr, w, &targets, what, errors);
        }
    }
}

/// What an evaluation needs beyond its mode (see [`check_mode`]): solved examples for shots.
fn check_eval_mode(
    p: &Pipeline,
    i: usize,
    ev: &crate::eval::spec::EvaluateSpec,
    errors: &mut Vec<Diagnostic>,
) {
    check_mode(
        p,
        &format!("/evaluate/{i}"),
        ev.mode,
        ev.reward.as_deref(),
        errors,
    );
    let has_target = p
        .spec
        .datasets
        .get(&ev.dataset)
        .is_some_and(|d| d.target.is_some());
    if ev.shots > 0 && ev.mode == EvalMode::Generate && !has_target {
        errors.push(p.doc.diagnostic(
            &format!("/evaluate/{i}/shots"),
            false,
            format!(
                "shots need solved examples: dataset `{}` has no `target` template",
                ev.dataset
            ),
        ));
    }
}

/// What each mode needs: `generate` a reward to judge answers, `loglik` options to rank. `ptr`
/// is the section holding `mode` and `reward`.
pub(super) fn check_mode(
    p: &Pipeline,
    ptr: &str,
    mode: EvalMode,
    reward_name: Option<&str>,
    errors: &mut Vec<Diagnostic>,
) {
    let reward = reward_name.and_then(|r| p.spec.rewards.get(r));
    match mode {
        EvalMode::Generate if reward_name.is_none() => errors.push(
            p.doc
                .diagnostic(
                    ptr,
                    true,
                    "`generate` mode needs a `reward` to judge the answers",
                )
                .with_help("name one of `rewards`, or use `mode: loglik` for multiple choice"),
        ),
        EvalMode::Loglik if reward.is_some_and(|r| !matches!(r, RewardSpec::MultipleChoice(_))) => {
            errors.push(p.doc.diagnostic(
                &format!("{ptr}/reward"),
                false,
                format!(
                    "`loglik` mode ranks options: its reward must be `multiple_choice`, not `{}`",
                    reward.map(RewardSpec::kind).unwrap_or_default()
                ),
            ))
        }
        _ => {}
    }
}

fn check_model(p: &Pipeline, errors: &mut Vec<Diagnostic>) {
    if let Err(e) = AssetSource::check(&p.spec.model.source, p.dir()) {
        errors.push(p.doc.diagnostic("/model/source", false, e.to_string()));
    }
    for name in p.spec.model.chat_template_kwargs.keys() {
        if crate::model::chat::is_reserved(name) {
            errors.push(p.doc.diagnostic(
                &format!("/model/chat_template_kwargs/{name}"),
                true,
                format!("`{name}` is set by tsq itself when it renders a chat template"),
            ));
        }
    }
    // Metal is a build option for `tsq generate`, `score` and `chat`; the stages' training and
    // evaluation have never run there, so a pipeline asking for it is refused, not tried.
    if p.spec.model.device == crate::model::placement::Device::Metal {
        errors.push(p.doc.diagnostic(
            "/model/device",
            false,
            "pipeline stages run on `cpu` or `cuda`, not on `metal`",
        ));
    }
}

fn check_svd(spec: &PipelineSpec, p: &Pipeline, errors: &mut Vec<Diagnostic>) {
    let Some(svd) = &spec.svd else { return };
    for (i, target) in svd.targets.iter().enumerate() {
        if let Err(e) = Regex::new(target) {
            errors.push(p.doc.diagnostic(
                &format!("/svd/targets/{i}"),
                false,
                format!("not a valid regex: {e}"),
            ));
        }
    }
    if let Layers::Named(text) = &svd.layers
        && let Some((a, b)) = text.split_once('-')
        && a.parse::<u32>().ok() > b.parse::<u32>().ok()
    {
        errors.push(p.doc.diagnostic(
            "/svd/layers",
            false,
            format!("range `{text}` is empty: the first layer is after the last"),
        ));
    }
}

fn check_datasets(p: &mut Pipeline, errors: &mut Vec<Diagnostic>) {
    let datasets = p.spec.datasets.clone();
    for (name, ds) in &datasets {
        let base = format!("/datasets/{name}");
        let card_path = p.path(&ds.card);
        if !card_path.exists() {
            errors.push(p.doc.diagnostic(
                &format!("{base}/card"),
                false,
                format!("file `{}` does not exist", card_path.display()),
            ));
        } else {
            match load_card(&card_path) {
                Ok(card) => {
                    let resolved = ResolvedDataset {
                        name: name.clone(),
                        spec: ds.clone(),
                        card,
                        prompt: p.path(&ds.prompt),
                        target: ds.target.as_ref().map(|t| p.path(t)),
                        seed: ds.split.seed.unwrap_or(p.spec.seed),
                    };
                    p.datasets.insert(name.clone(), resolved);
                }
                Err(card_errors) => errors.extend(card_errors),
            }
        }
        for (key, template) in [("prompt", Some(&ds.prompt)), ("target", ds.target.as_ref())] {
            if let Some(template) = template {
                check_template_file(p, &format!("{base}/{key}"), template, errors);
            }
        }
        check_split(p, &base, ds, errors);
    }
}

/// Report templates that replace the built-in ones must exist and parse.
fn check_report(p: &Pipeline, errors: &mut Vec<Diagnostic>) {
    let Some(report) = &p.spec.report else {
        return;
    };
    let templates = [
        ("markdown_template", &report.markdown_template),
        ("html_template", &report.html_template),
    ];
    for (key, template) in templates {
        if let Some(template) = template {
            check_template_file(p, &format!("/report/{key}"), template, errors);
        }
    }
}

/// A template file the pipeline names at `pointer` must exist and parse.
fn check_template_file(p: &Pipeline, pointer: &str, written: &str, errors: &mut Vec<Diagnostic>) {
    let path = p.path(written);
    if !path.exists() {
        errors.push(p.doc.diagnostic(
            pointer,
            false,
            format!("file `{}` does not exist", path.display()),
        ));
    } else if let Err(e) = TemplateFile::load(&path) {
        errors.push(e);
    }
}

fn check_split(
    p: &Pipeline,
    base: &str,
    ds: &super::spec::DatasetSpec,
    errors: &mut Vec<Diagnostic>,
) {
    let parts = [
        ("train", &ds.split.train),
        ("val", &ds.split.val),
        ("test", &ds.split.test),
    ];
    let mut fraction_sum = 0.0;
    let mut any = false;
    for (key, size) in parts {
        let Some(n) = size else { continue };
        let ptr = format!("{base}/split/{key}");
        if n.is_f64() {
            let f = n.as_f64().unwrap_or(0.0);
            if f > 1.0 {
                errors.push(
                    p.doc
                        .diagnostic(
                            &ptr,
                            false,
                            format!("a fraction must be at most 1.0, found {f}"),
                        )
                        .with_help("write a count as a whole number without a decimal point"),
                );
            }
            fraction_sum += f;
        }
        any |= n.as_f64().unwrap_or(0.0) > 0.0;
    }
    if fraction_sum > 1.0 + 1e-9 {
        errors.push(p.doc.diagnostic(
            &format!("{base}/split"),
            false,
            format!("split fractions add up to {fraction_sum}, more than 1.0"),
        ));
    }
    if !any {
        errors.push(p.doc.diagnostic(
            &format!("{base}/split"),
            true,
            "the split assigns no records: give `train`, `val` or `test` a size",
        ));
    }
}
