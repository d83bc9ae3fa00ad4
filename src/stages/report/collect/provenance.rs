//! How the run was made, and the evaluations folded into one overview.

use super::*;

/// How the run was made: the pipeline, model and data sources, tsq and the machine, stage times.
pub(super) fn provenance(
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
pub(super) fn overview(tables: &[EvalTable]) -> Overview {
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
