//! An adaptation's section: a routing check's confusion table, or a mixture's search.

use super::*;

/// Labels a confusion table shows on each axis; the rest are summed into one "others" row and
/// column, so a router file with thousands of labels gives a readable, bounded table.
const MAX_CONFUSION_LABELS: usize = 20;

/// A confusion matrix (truth → chosen → count) as columns and rows of counts, the most frequent
/// labels first and the rest summed.
pub(super) fn confusion_table(
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
pub(super) fn adaptation(
    dir: &Path,
    name: &str,
    spec: &crate::adapt::spec::AdaptationSpec,
    report: &mut Report,
) -> Result<(), Unreadable> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
