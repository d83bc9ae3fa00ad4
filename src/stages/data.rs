//! The `data` kind: one `data.<dataset>` stage per dataset, which fetches the source, maps rows
//! to records, renders templates, splits, and writes `records.parquet` (see
//! [`crate::data::stored`]) plus `summary.json` (counts, bad records, a few rendered examples).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde_json::{Value, json};

use super::{Declared, Env, Kind, to_json};
use crate::assets::{AssetSource, TsqHome, verify_sha256};
use crate::dag::Stage;
use crate::data::card::Origin;
use crate::data::records::{BadRecord, Record, map_rows};
use crate::data::split::{PARTS, part_sizes, seeded_order};
use crate::data::stored::{StoredRecord, read_records};
use crate::data::template::TemplateFile;
use crate::data::{Limits, read_rows};
use crate::exec::{StageContext, StageError, StageRunner, failed_to, file_input};
use crate::pipeline::{Pipeline, ResolvedDataset};

pub const RECORDS_FILE: &str = "records.parquet";
pub const SUMMARY_FILE: &str = "summary.json";

pub struct DataStage {
    pub dataset: ResolvedDataset,
    pub home: TsqHome,
}

/// A record with its rendered prompt and target.
struct Rendered {
    record: Record,
    prompt: String,
    target: Option<String>,
}

impl DataStage {
    fn source(&self, source: &str) -> Result<AssetSource, StageError> {
        AssetSource::parse(source, self.dataset.card.dir())
            .map_err(|e| StageError::at("reading the source of", &self.dataset.card.file, e))
    }

    /// The card's rows: read from its (fetched, checksum-verified) file, or generated.
    fn rows(&self) -> Result<Vec<Value>, StageError> {
        let (source, format) = match &self.dataset.card.origin {
            Origin::Generated(generator) => return Ok(generator.rows()),
            Origin::File { source, format } => (source, *format),
        };
        let path = self
            .source(source)?
            .resolve(&self.home)
            .map_err(failed_to("fetching the data source"))?;
        verify_sha256(&path, self.dataset.card.card.sha256.as_deref())
            .map_err(|e| StageError::at("checking the sha256 pin of", &path, e))?;
        // The card counts records after deduplication, and sources repeat records heavily
        // (OLMo's request files hold one row per option: 8x): the card bounds the rows read
        // generously, so a source far larger than its card is refused before rows are built.
        let limits = Limits {
            rows: (self.dataset.card.card.records).map_or(Limits::default().rows, |n| {
                n.saturating_mul(64).max(100_000)
            }),
            ..Limits::default()
        };
        read_rows(&path, format, limits).map_err(|e| StageError::at("reading", &path, e))
    }

    fn render_all(
        &self,
        records: Vec<Record>,
        ctx: &StageContext,
    ) -> Result<(Vec<Rendered>, Vec<BadRecord>), StageError> {
        let load = |p: &PathBuf| TemplateFile::load(p).map_err(|d| StageError::at("loading", p, d));
        let prompt = load(&self.dataset.prompt)?;
        let target = self.dataset.target.as_ref().map(load).transpose()?;
        let mut bar = ctx.progress(records.len() as u64, "records");
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for (i, record) in records.into_iter().enumerate() {
            if i % 256 == 0 {
                ctx.check_interrupt()?;
            }
            bar.advance(1, String::new());
            let context = Value::Object(record.fields.clone());
            let rendered = prompt
                .render(&context)
                .and_then(|p| Ok((p, target.as_ref().map(|t| t.render(&context)).transpose()?)));
            match rendered {
                Ok((prompt, target)) => good.push(Rendered {
                    record,
                    prompt,
                    target,
                }),
                Err(e) => bad.push(BadRecord {
                    row: record.row,
                    reason: format!("template error: {e}"),
                }),
            }
        }
        Ok((good, bad))
    }

    fn check_bad(&self, bad: &[BadRecord], total: usize) -> Result<(), StageError> {
        let fraction = if total == 0 {
            0.0
        } else {
            bad.len() as f64 / total as f64
        };
        if bad.is_empty() || fraction <= self.dataset.spec.max_bad_fraction {
            return Ok(());
        }
        let listed: Vec<String> = bad
            .iter()
            .take(5)
            .map(|b| format!("row {}: {}", b.row, b.reason))
            .collect();
        Err(StageError::failed(
            format!("checking the records of `{}`", self.dataset.name),
            format!(
                "{} of {total} records are bad ({:.1}%, allowed {:.1}% by `max_bad_fraction`):\n    {}{}",
                bad.len(),
                fraction * 100.0,
                self.dataset.spec.max_bad_fraction * 100.0,
                listed.join("\n    "),
                if bad.len() > 5 { "\n    ..." } else { "" }
            ),
        ))
    }
}

impl StageRunner for DataStage {
    fn inputs(&self) -> Result<BTreeMap<String, String>, StageError> {
        let mut inputs = BTreeMap::from([
            ("card".to_string(), file_input(&self.dataset.card.file)?),
            (
                "prompt_template".to_string(),
                file_input(&self.dataset.prompt)?,
            ),
            ("source".to_string(), self.source_identity()?),
        ]);
        if let Some(target) = &self.dataset.target {
            inputs.insert("target_template".into(), file_input(target)?);
        }
        Ok(inputs)
    }

    fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let card = &self.dataset.card.card;
        let rows = self.rows()?;
        ctx.check_interrupt()?;
        let mapped = map_rows(card, &rows);
        let total = mapped.records.len() + mapped.bad.len();
        if let Some(expected) = card.records.filter(|&n| n as usize != total) {
            return Err(StageError::at(
                "reading the records of",
                &self.dataset.card.file,
                format!(
                    "the card expects {expected} records but its data has {total} after deduplication; is the source the one the card describes?"
                ),
            ));
        }
        let (rendered, render_bad) = self.render_all(mapped.records, ctx)?;
        let bad: Vec<BadRecord> = mapped.bad.into_iter().chain(render_bad).collect();
        self.check_bad(&bad, total)?;
        let parts = self.split(rendered)?;
        write_records(&ctx.output(RECORDS_FILE), &parts)?;
        let summary = json!({
            "dataset": self.dataset.name,
            "card": card.name,
            "license": card.license,
            "sha256": card.sha256,
            "rows": rows.len(),
            "deduplicated": mapped.deduplicated,
            "records": total,
            "bad": bad,
            "split": PARTS.iter().zip(&parts).map(|(name, p)| (name.to_string(), json!(p.len()))).collect::<serde_json::Map<_, _>>(),
            "examples": parts.iter().zip(PARTS).flat_map(|(p, name)| p.first().map(|r| json!({"split": name, "id": r.record.id, "prompt": r.prompt, "target": r.target}))).collect::<Vec<_>>(),
        });
        crate::fsutil::write_json(&ctx.output(SUMMARY_FILE), &summary)
            .map_err(|e| StageError::at("writing", &ctx.output(SUMMARY_FILE), e))?;
        Ok(summary)
    }
}

impl DataStage {
    fn source_identity(&self) -> Result<String, StageError> {
        match &self.dataset.card.origin {
            Origin::Generated(generator) => Ok(generator.identity()),
            Origin::File { source, .. } => self
                .source(source)?
                .identity()
                .map_err(failed_to("identifying the data source")),
        }
    }

    /// Orders by seed, applies `limit`, and cuts train / val / test.
    fn split(&self, rendered: Vec<Rendered>) -> Result<[Vec<Rendered>; 3], StageError> {
        let ids: Vec<&str> = rendered.iter().map(|r| r.record.id.as_str()).collect();
        let order = seeded_order(&ids, self.dataset.seed);
        let mut slots: Vec<Option<Rendered>> = rendered.into_iter().map(Some).collect();
        let limit = self
            .dataset
            .spec
            .limit
            .map_or(order.len(), |l| (l as usize).min(order.len()));
        let mut ordered = order
            .into_iter()
            .take(limit)
            .filter_map(|i| slots[i].take());
        let sizes = part_sizes(&self.dataset.spec.split, limit).map_err(failed_to("splitting"))?;
        Ok(sizes.map(|n| ordered.by_ref().take(n).collect()))
    }
}

fn write_records(path: &std::path::Path, parts: &[Vec<Rendered>; 3]) -> Result<(), StageError> {
    let rows: Vec<(&str, &Rendered)> = PARTS
        .iter()
        .zip(parts)
        .flat_map(|(name, p)| p.iter().map(move |r| (*name, r)))
        .collect();
    let column = |name: &str, values: Vec<Option<String>>| Column::new(name.into(), values);
    let mut df = DataFrame::new_infer_height(vec![
        column(
            "id",
            rows.iter()
                .map(|(_, r)| Some(r.record.id.clone()))
                .collect(),
        ),
        column(
            "split",
            rows.iter().map(|(s, _)| Some(s.to_string())).collect(),
        ),
        column(
            "prompt",
            rows.iter().map(|(_, r)| Some(r.prompt.clone())).collect(),
        ),
        column(
            "target",
            rows.iter().map(|(_, r)| r.target.clone()).collect(),
        ),
        column(
            "record",
            rows.iter()
                .map(|(_, r)| Some(Value::Object(r.record.fields.clone()).to_string()))
                .collect(),
        ),
    ])
    .map_err(failed_to("building the records table"))?;
    crate::data::write_parquet(path, &mut df).map_err(|e| StageError::at("writing", path, e))
}

/// The records a finished `data.<name>` stage wrote (its directory `stage_dir`).
pub fn read_stored(stage_dir: &Path) -> Result<Vec<StoredRecord>, StageError> {
    let path = stage_dir.join(RECORDS_FILE);
    read_records(&path).map_err(|e| StageError::at("reading", &path, e))
}

pub struct DataKind;

impl Kind for DataKind {
    fn name(&self) -> &'static str {
        "data"
    }

    fn version(&self) -> u32 {
        1
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        p.datasets
            .values()
            .map(|ds| Declared {
                id: super::ids::data(&ds.name),
                subject: Some(ds.name.clone()),
                deps: vec![],
                config: json!({"dataset": to_json(&ds.spec), "split_seed": ds.seed}),
                pointer: format!("/datasets/{}", ds.name),
            })
            .collect()
    }

    fn runner<'a>(&self, env: &'a Env<'a>, stage: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        let ds = env.pipeline.datasets.get(stage.subject.as_deref()?)?;
        Some(Box::new(DataStage {
            dataset: ds.clone(),
            home: env.shared.home.clone(),
        }))
    }
}
