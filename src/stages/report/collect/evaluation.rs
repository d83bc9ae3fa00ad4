//! An evaluation's section: its table with paired comparisons, two-pass costs, and a right and
//! a wrong sample per setting (with a multiple-choice sample's options).

use super::*;

/// How many characters of a sample's prompt and answer the report shows.
const SAMPLE_CHARS: usize = 600;

/// An evaluation's table, its two-pass costs and a right and a wrong sample per setting.
pub(super) fn evaluation(dir: &Path, stage: &str, report: &mut Report) -> Result<(), Unreadable> {
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
pub(super) fn options(row: &Value) -> Vec<OptionView> {
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
pub(super) fn shortened(text: &str) -> String {
    match text.char_indices().nth(SAMPLE_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
