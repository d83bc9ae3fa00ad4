//! Reading a run directory into what its report shows. Never fails as a whole: a stage that is
//! missing or damaged is listed in [`Report::missing`] with the reason, and the rest is shown.
//! Every number comes from the stages' own files (results.json, samples, metrics, router,
//! alpha, expert files, manifests); nothing is recomputed that a stage already measured.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use crate::data::card::DataFormat;
use crate::data::{Limits, read_rows};
use crate::eval::paired_p_value;
use crate::eval::results::{RESULTS_JSON, Results, SAMPLES_FILE};
use crate::exec::{Manifest, RunDir};
use crate::fsutil::{MAX_LOG_BYTES, MAX_TEXT_BYTES, read_bounded};
use crate::pipeline::spec::PipelineSpec;
use crate::report::view::*;

/// Below this paired p-value a difference is reported as real; above it, as within noise.
pub const NOISE_P: f64 = 0.05;

/// Everything the report shows about the run in `run_dir`.
pub fn collect(run_dir: &Path) -> Report {
    let run = RunDir::read_only(run_dir);
    let mut report = Report {
        run_dir: run_dir.display().to_string(),
        ..Report::default()
    };
    let (spec, pipeline) = match crate::stages::run_pipeline(run_dir) {
        Ok(read) => read,
        Err(why) => {
            report_missing(&mut report.missing, "pipeline.json", why);
            return report;
        }
    };
    report.name = spec.name.clone();
    // In the pipeline's order, so evaluations appear as the pipeline lists them.
    let stages = crate::stages::ids_before_report(&spec);
    let mut manifests = BTreeMap::new();
    for stage in &stages {
        match run.finished_or_why(stage.as_str()) {
            Ok(m) => {
                manifests.insert(stage.to_string(), m);
            }
            Err(why) => report_missing(&mut report.missing, stage.as_str(), why),
        }
    }
    for stage in stages.iter().filter(|s| manifests.contains_key(s.as_str())) {
        let dir = run.stage_dir(stage.as_str());
        let result = match (stage.kind(), stage.subject()) {
            ("eval", _) => evaluation(&dir, stage.as_str(), &mut report),
            ("train", Some(expert)) => training(&dir, expert, &mut report),
            ("adapt", Some(name)) => match spec.adaptations.get(name) {
                Some(ad) => adaptation(&dir, name, ad, &mut report),
                None => Err("the pipeline as run has no such adaptation".into()),
            },
            _ => Ok(()),
        };
        if let Err(why) = result {
            report_missing(&mut report.missing, stage.as_str(), why);
        }
    }
    report.overview = overview(&report.summary);
    report.provenance = provenance(run_dir, &spec, pipeline, &manifests);
    report
}

fn report_missing(missing: &mut Vec<Missing>, stage: &str, why: String) {
    missing.push(Missing {
        stage: stage.to_string(),
        why,
    });
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    crate::fsutil::read_json(path, MAX_TEXT_BYTES)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))
}

/// The JSON objects of a JSON-lines file.
fn read_lines(path: &Path) -> Result<Vec<Value>, String> {
    let text = read_bounded(path, MAX_LOG_BYTES)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("`{}`: {e}", path.display())))
        .collect()
}

fn number(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}

/// How many characters of a sample's prompt and answer the report shows.
const SAMPLE_CHARS: usize = 600;

/// An evaluation's table, its two-pass costs and a right and a wrong sample per setting.
fn evaluation(dir: &Path, stage: &str, report: &mut Report) -> Result<(), String> {
    let results: Results = read_json(&dir.join(RESULTS_JSON))?;
    let samples = read_rows(
        &dir.join(SAMPLES_FILE),
        DataFormat::Parquet,
        Limits::default(),
    )?;
    let text = |row: &Value, key: &str| {
        row.get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    // Per setting, which items it got right.
    let mut right: BTreeMap<String, BTreeMap<String, bool>> = BTreeMap::new();
    for row in &samples {
        right
            .entry(text(row, "with"))
            .or_default()
            .insert(text(row, "id"), text(row, "verdict") == "correct");
    }
    // Settings tied at the top are all best; the first of them is what others are compared to.
    let top = results
        .results
        .values()
        .map(|r| r.acc.value)
        .fold(f64::NEG_INFINITY, f64::max);
    let best = results
        .results
        .iter()
        .find(|(_, r)| r.acc.value == top)
        .map(|(w, _)| w.clone())
        .unwrap_or_default();
    let paired = |this: &str, other: &str| -> Option<Paired> {
        if this == other {
            return None;
        }
        let (a, b) = (right.get(this)?, right.get(other)?);
        let (mut only_this, mut only_other) = (0, 0);
        for (id, &r) in a {
            match (r, b.get(id)?) {
                (true, false) => only_this += 1,
                (false, true) => only_other += 1,
                _ => {}
            }
        }
        let p_value = paired_p_value(only_this, only_other);
        Some(Paired {
            only_this,
            only_other,
            p_value,
            within_noise: p_value >= NOISE_P,
        })
    };
    let base = crate::adapt::spec::BASE;
    let rows = results
        .results
        .iter()
        .map(|(with, r)| EvalRow {
            with: with.clone(),
            kind: match (&r.adaptation, with.as_str()) {
                (Some(a), _) => a.strategy.clone(),
                (None, w) if w == base => base.to_string(),
                _ => "expert".into(),
            },
            acc: r.acc,
            best: r.acc.value == top,
            vs_best: (r.acc.value < top).then(|| paired(with, &best)).flatten(),
            vs_base: paired(with, base),
        })
        .collect();
    report.summary.push(EvalTable {
        stage: stage.to_string(),
        dataset: results.dataset.clone(),
        split: results.split.clone(),
        mode: results.mode.clone(),
        items: results.results.values().map(|r| r.acc.n).max().unwrap_or(0),
        rows,
    });
    for (with, r) in &results.results {
        if let Some(a) = &r.adaptation {
            report.costs.push(Cost {
                stage: stage.to_string(),
                with: with.clone(),
                strategy: a.strategy.clone(),
                first_pass_s: a.first_pass_seconds_per_item,
                second_pass_s: a.second_pass_seconds_per_item,
                fraction: a.first_pass_fraction,
                search_s: a.search_seconds,
            });
        }
    }
    // The first right and the first wrong answer of each setting, in item order.
    let mut seen = BTreeSet::new();
    for row in &samples {
        let (with, correct) = (text(row, "with"), text(row, "verdict") == "correct");
        if !seen.insert((with.clone(), correct)) {
            continue;
        }
        let answer = match text(row, "completion") {
            c if c.is_empty() => text(row, "extracted"),
            c => c,
        };
        report.samples.push(SampleView {
            stage: stage.to_string(),
            with,
            id: text(row, "id"),
            correct,
            prompt: shortened(&text(row, "prompt")),
            answer: shortened(&answer),
            gold: text(row, "gold"),
            options: options(row),
        });
    }
    Ok(())
}

/// A sample's options (a JSON list in the `options` column; absent in runs before it existed),
/// each with its log-likelihood and whether it was the answer or the gold one.
fn options(row: &Value) -> Vec<OptionView> {
    let list = |key: &str| -> Vec<Value> {
        row.get(key)
            .and_then(Value::as_str)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default()
    };
    let (extracted, gold) = (row.get("extracted"), row.get("gold"));
    let logliks = list("option_logliks");
    list("options")
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let letter = crate::reward::extract::letter(i)?.to_string();
            let is = |v: Option<&Value>| v.and_then(Value::as_str) == Some(letter.as_str());
            Some(OptionView {
                chosen: is(extracted),
                gold: is(gold),
                text: shortened(text.as_str().unwrap_or_default()),
                loglik: logliks.get(i).and_then(Value::as_f64),
                letter,
            })
        })
        .collect()
}

/// `text` cut to [`SAMPLE_CHARS`] characters (marked when cut).
fn shortened(text: &str) -> String {
    match text.char_indices().nth(SAMPLE_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// An expert's training curves, and its scales and the base spectrum from its file.
fn training(dir: &Path, expert: &str, report: &mut Report) -> Result<(), String> {
    let lines = read_lines(&dir.join("metrics.jsonl"))?;
    let steps = lines
        .iter()
        .filter_map(|l| {
            Some(TrainStep {
                step: l.get("step")?.as_u64()?,
                reward: number(l, "/rollout/reward")?,
                reward_std: number(l, "/rollout/reward_std").unwrap_or(0.0),
                kl: number(l, "/rollout/kl").unwrap_or(0.0),
                zero_std_fraction: number(l, "/rollout/frac_reward_zero_std").unwrap_or(0.0),
                tokens_per_s: number(l, "/tokens_per_s").unwrap_or(0.0),
                val_accuracy: number(l, "/val_accuracy"),
            })
        })
        .collect();
    let summary: Value = read_json(&dir.join("training.json")).unwrap_or_default();
    report.training.push(Training {
        expert: expert.to_string(),
        steps,
        kept_step: summary.get("kept_step").and_then(Value::as_u64),
        best_val_accuracy: number(&summary, "/best_val_accuracy"),
        seconds: Manifest::read(dir).map_or(0.0, |m| m.duration_s),
    });
    let file = dir.join(crate::stages::train::EXPERT_FILE);
    let loaded = crate::svf::expert::Expert::load(&file).map_err(|e| e.to_string())?;
    report.experts.push(scales(expert, &loaded)?);
    if report.spectra.is_empty() {
        report.spectra = spectra(&loaded)?;
    }
    Ok(())
}

/// `layers.<i>.<module>` as (i, module).
fn layer_and_module(target: &str) -> Option<(usize, &str)> {
    let rest = target.strip_prefix("layers.")?;
    let (layer, module) = rest.split_once('.')?;
    Some((layer.parse().ok()?, module))
}

fn scales(name: &str, expert: &crate::svf::expert::Expert) -> Result<ExpertScales, String> {
    let effective = expert.effective_scales().map_err(|e| e.to_string())?;
    let mut layers = BTreeSet::new();
    let mut modules = BTreeSet::new();
    let mut changes = BTreeMap::new();
    for (target, scale) in &effective {
        let Some((layer, module)) = layer_and_module(target) else {
            continue;
        };
        let rms = scale
            .affine(1.0, -1.0)
            .and_then(|d| d.sqr())
            .and_then(|d| d.mean_all())
            .and_then(|m| m.to_scalar::<f32>())
            .map_err(|e| e.to_string())?;
        layers.insert(layer);
        modules.insert(module.to_string());
        changes.insert((layer, module.to_string()), f64::from(rms).sqrt());
    }
    let (layers, modules): (Vec<usize>, Vec<String>) =
        (layers.into_iter().collect(), modules.into_iter().collect());
    let change = layers
        .iter()
        .map(|&l| {
            modules
                .iter()
                .map(|m| changes.get(&(l, m.clone())).copied())
                .collect()
        })
        .collect();
    Ok(ExpertScales {
        expert: name.to_string(),
        layers,
        modules,
        change,
    })
}

/// The base singular values of a few targets: the first, middle and last layer of the first
/// module, and the middle layer of each other module.
fn spectra(expert: &crate::svf::expert::Expert) -> Result<Vec<Spectrum>, String> {
    let mut by_module: BTreeMap<&str, Vec<(usize, &String)>> = BTreeMap::new();
    for target in expert.vectors.keys() {
        if let Some((layer, module)) = layer_and_module(target) {
            by_module.entry(module).or_default().push((layer, target));
        }
    }
    let mut chosen = Vec::new();
    for (k, targets) in by_module.values_mut().enumerate() {
        targets.sort();
        let middle = targets[targets.len() / 2].1;
        if k == 0 {
            chosen.push(targets[0].1);
            chosen.push(middle);
            chosen.push(targets[targets.len() - 1].1);
        } else {
            chosen.push(middle);
        }
    }
    chosen.dedup();
    chosen
        .into_iter()
        .map(|target| {
            let values: Vec<f32> = expert.vectors[target]
                .1
                .to_vec1()
                .map_err(|e| e.to_string())?;
            Ok(Spectrum {
                target: target.clone(),
                values: values.into_iter().map(f64::from).collect(),
            })
        })
        .collect()
}

/// Labels a confusion table shows on each axis; the rest are summed into one "others" row and
/// column, so a router file with thousands of labels gives a readable, bounded table.
const MAX_CONFUSION_LABELS: usize = 20;

/// A confusion matrix (truth → chosen → count) as columns and rows of counts, the most frequent
/// labels first and the rest summed.
fn confusion_table(
    confusion: &BTreeMap<String, BTreeMap<String, usize>>,
) -> (Vec<String>, Vec<(String, Vec<usize>)>) {
    let mut column_totals: BTreeMap<&str, usize> = BTreeMap::new();
    for row in confusion.values() {
        for (column, n) in row {
            *column_totals.entry(column).or_default() += n;
        }
    }
    let kept = |totals: Vec<(&str, usize)>| -> Vec<String> {
        let mut totals = totals;
        totals.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut names: Vec<String> = totals
            .iter()
            .take(MAX_CONFUSION_LABELS)
            .map(|(name, _)| name.to_string())
            .collect();
        names.sort();
        names
    };
    let mut columns = kept(column_totals.into_iter().collect());
    let other_columns = confusion
        .values()
        .flat_map(BTreeMap::keys)
        .collect::<BTreeSet<_>>()
        .len()
        - columns.len();
    let truths = kept(
        confusion
            .iter()
            .map(|(t, row)| (t.as_str(), row.values().sum()))
            .collect(),
    );
    let counts = |row: &BTreeMap<String, usize>| -> Vec<usize> {
        let mut counts: Vec<usize> = columns
            .iter()
            .map(|c| row.get(c).copied().unwrap_or(0))
            .collect();
        if other_columns > 0 {
            counts.push(row.values().sum::<usize>() - counts.iter().sum::<usize>());
        }
        counts
    };
    let mut rows: Vec<(String, Vec<usize>)> = truths
        .iter()
        .map(|t| (t.clone(), counts(&confusion[t])))
        .collect();
    let other_truths = confusion.len() - truths.len();
    if other_truths > 0 {
        let mut sum = vec![0; columns.len() + usize::from(other_columns > 0)];
        for (_, row) in confusion.iter().filter(|(t, _)| !truths.contains(t)) {
            for (total, n) in sum.iter_mut().zip(counts(row)) {
                *total += n;
            }
        }
        rows.push((format!("({other_truths} others)"), sum));
    }
    if other_columns > 0 {
        columns.push(format!("({other_columns} others)"));
    }
    (columns, rows)
}

/// A routing adaptation's check, or a mixture's search.
fn adaptation(
    dir: &Path,
    name: &str,
    spec: &crate::adapt::spec::AdaptationSpec,
    report: &mut Report,
) -> Result<(), String> {
    use crate::adapt::router::{ROUTER_FILE, RouterFile};
    use crate::stages::adapt::few_shot::{ALPHA_FILE, AlphaFile};
    if spec.routing().is_some() {
        let router: RouterFile = read_json(&dir.join(ROUTER_FILE))?;
        let Some(check) = router.check else {
            return Ok(());
        };
        let (columns, rows) = confusion_table(&check.confusion);
        report.routers.push(RouterCheck {
            adaptation: name.to_string(),
            strategy: router.strategy.clone(),
            mode: crate::hash::serde_name(&router.mode),
            split: check.split.clone(),
            accuracy: check.accuracy,
            columns,
            rows,
            seconds_per_item: check.seconds_per_item,
        });
        return Ok(());
    }
    let alpha: AlphaFile = read_json(&dir.join(ALPHA_FILE))?;
    let lines = read_lines(&dir.join("metrics.jsonl"))?;
    let mut best = f64::NEG_INFINITY;
    let generations = lines
        .iter()
        .filter_map(|l| {
            let accuracy = number(l, "/fitness/accuracy")?;
            best = best.max(accuracy);
            Some(Generation {
                generation: l.get("generation")?.as_u64()?,
                best_accuracy: best,
                mean_accuracy: number(l, "/mean_accuracy").unwrap_or(0.0),
                mean_alpha: l
                    .get("mean")
                    .and_then(|m| serde_json::from_value(m.clone()).ok())
                    .unwrap_or_default(),
            })
        })
        .collect();
    report.mixtures.push(Mixture {
        adaptation: name.to_string(),
        dataset: alpha.dataset.clone(),
        experts: alpha.experts.clone(),
        alpha: alpha.alpha.clone(),
        accuracy: alpha.fitness.accuracy,
        search_seconds: alpha.search_seconds,
        generations,
    });
    Ok(())
}

/// How the run was made: the pipeline, model and data sources, tsq and the machine, stage times.
fn provenance(
    run_dir: &Path,
    spec: &PipelineSpec,
    pipeline: String,
    manifests: &BTreeMap<String, Manifest>,
) -> Provenance {
    let model = manifests.get(crate::stages::ids::model().as_str());
    let summary = |key: &str| {
        model
            .and_then(|m| m.summary.get(key))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let datasets = manifests
        .iter()
        .filter(|(id, _)| id.starts_with("data."))
        .map(|(id, m)| DataSource {
            name: id.trim_start_matches("data.").to_string(),
            source: m.inputs.get("source").cloned().unwrap_or_default(),
            sha256: m
                .summary
                .get("sha256")
                .and_then(Value::as_str)
                .map(String::from),
        })
        .collect();
    let started = read_lines(&run_dir.join("events.jsonl"))
        .unwrap_or_default()
        .into_iter()
        .rfind(|e| e.get("event").and_then(Value::as_str) == Some("run_started"));
    let field = |key: &str| {
        started
            .as_ref()
            .and_then(|e| e.get(key))
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_else(|| "not recorded".into())
    };
    let mut stages: Vec<StageTime> = manifests
        .iter()
        .map(|(id, m)| StageTime {
            stage: id.clone(),
            started_unix: m.started_unix,
            seconds: m.duration_s,
            key: m.key.chars().take(12).collect(),
        })
        .collect();
    stages.sort_by(|a, b| a.started_unix.total_cmp(&b.started_unix));
    let sandboxes = manifests
        .iter()
        .filter_map(|(id, m)| {
            Some(StageSandbox {
                stage: id.clone(),
                containment: m.summary.get("sandbox")?.as_str()?.to_string(),
            })
        })
        .collect();
    Provenance {
        pipeline,
        seed: Some(spec.seed),
        model_source: summary("source"),
        model_blake3: summary("blake3"),
        datasets,
        tsq_version: field("tsq"),
        machine: field("machine"),
        total_seconds: stages.iter().map(|s| s.seconds).sum(),
        stages,
        sandboxes,
    }
}

/// The evaluations' tables folded into one: settings in the order they first appear.
fn overview(tables: &[EvalTable]) -> Overview {
    let mut rows: Vec<OverviewRow> = Vec::new();
    for (column, table) in tables.iter().enumerate() {
        for r in &table.rows {
            let at = match rows.iter().position(|row| row.with == r.with) {
                Some(at) => at,
                None => {
                    rows.push(OverviewRow {
                        with: r.with.clone(),
                        kind: r.kind.clone(),
                        cells: (0..tables.len()).map(|_| None).collect(),
                    });
                    rows.len() - 1
                }
            };
            rows[at].cells[column] = Some(OverviewCell {
                acc: r.acc.value,
                best: r.best,
                within_noise: r.vs_best.as_ref().is_some_and(|p| p.within_noise),
            });
        }
    }
    // The base model, then experts, then adaptations.
    let rank = |kind: &str| match kind {
        crate::adapt::spec::BASE => 0,
        "expert" => 1,
        _ => 2,
    };
    rows.sort_by_key(|r| rank(&r.kind));
    Overview {
        columns: tables.iter().map(|t| t.stage.clone()).collect(),
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 40,001 labels (a crafted router file) give a 21 × 21 table whose counts still add up.
    #[test]
    fn a_confusion_table_keeps_the_most_frequent_labels_and_sums_the_rest() {
        let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = (0..40_000)
            .map(|i| (format!("t{i}"), BTreeMap::from([(format!("t{i}"), 1)])))
            .collect();
        confusion.insert(
            "big".into(),
            BTreeMap::from([("big".into(), 50), ("t7".into(), 5)]),
        );
        let (columns, rows) = confusion_table(&confusion);
        assert_eq!(columns.len(), MAX_CONFUSION_LABELS + 1);
        assert_eq!(rows.len(), MAX_CONFUSION_LABELS + 1);
        assert_eq!(columns.last().unwrap(), "(39981 others)");
        assert_eq!(rows.last().unwrap().0, "(39981 others)");
        let big = rows.iter().find(|r| r.0 == "big").unwrap();
        assert_eq!(big.1[columns.iter().position(|c| c == "big").unwrap()], 50);
        assert_eq!(big.1[columns.iter().position(|c| c == "t7").unwrap()], 5);
        let total: usize = rows.iter().flat_map(|r| &r.1).sum();
        assert_eq!(total, 40_000 + 55);
        // A small matrix is shown whole.
        let small = BTreeMap::from([("a".to_string(), BTreeMap::from([("b".to_string(), 2)]))]);
        assert_eq!(
            confusion_table(&small),
            (vec!["b".into()], vec![("a".into(), vec![2])])
        );
    }

    /// A loglik sample's options carry their letters, log-likelihoods and which one the model
    /// chose and which was gold; runs from before the `options` column show none.
    #[test]
    fn sample_options_name_the_answer_and_the_gold() {
        let row = serde_json::json!({
            "options": "[\"a cat\",\"a dog\",\"a cow\"]",
            "option_logliks": "[-3.5,-1.25,-7.0]",
            "extracted": "B",
            "gold": "C",
        });
        let views = options(&row);
        let seen: Vec<(&str, &str, Option<f64>, bool, bool)> = views
            .iter()
            .map(|o| {
                (
                    o.letter.as_str(),
                    o.text.as_str(),
                    o.loglik,
                    o.chosen,
                    o.gold,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("A", "a cat", Some(-3.5), false, false),
                ("B", "a dog", Some(-1.25), true, false),
                ("C", "a cow", Some(-7.0), false, true),
            ]
        );
        assert!(options(&serde_json::json!({"extracted": "A", "gold": "A"})).is_empty());
    }
}
