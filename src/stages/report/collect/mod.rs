//! Reading a run directory into what its report shows. Never fails as a whole: a stage that is
//! missing or damaged is listed in [`Report::missing`] with the reason, and the rest is shown.
//! Every number comes from the stages' own files (results.json, samples, metrics, router,
//! alpha, expert files, manifests); nothing is recomputed that a stage already measured.

mod adaptation;
mod evaluation;
mod provenance;
mod training;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use crate::dag::StageId;
use crate::data::card::DataFormat;
use crate::data::{Limits, read_rows};
use crate::eval::paired_p_value;
use crate::eval::results::{RESULTS_JSON, Results, SAMPLES_FILE};
use crate::exec::{Manifest, RunDir};
use crate::fsutil::{MAX_LOG_BYTES, MAX_TEXT_BYTES, ReadError, read_bounded};
use crate::pipeline::spec::PipelineSpec;
use crate::report::view::*;
use adaptation::adaptation;
use evaluation::evaluation;
use provenance::{overview, provenance};
use training::training;

/// Why a stage's section could not be read (the report lists the stage as missing instead).
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    #[error(transparent)]
    File(#[from] crate::fsutil::ReadError),
    #[error("`{}` line {line}: {source}", path.display())]
    Line {
        path: std::path::PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Expert(#[from] crate::svf::expert::ExpertError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("the pipeline as run has no such adaptation")]
    NoSuchAdaptation,
}

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
            report_missing(&mut report.missing, crate::exec::PIPELINE_FILE, why);
            return report;
        }
    };
    report.name = spec.name.clone();
    // In the graph's order, which keeps the pipeline's order within a kind: evaluations appear
    // as the pipeline lists them.
    let stages: Vec<StageId> = match run.recorded_stages() {
        Ok(recorded) => recorded
            .into_iter()
            .map(|s| s.id)
            .filter(|id| *id != crate::stages::ids::report())
            .collect(),
        Err(why) => {
            report_missing(&mut report.missing, "stages.json", why);
            return report;
        }
    };
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
                None => Err(Unreadable::NoSuchAdaptation),
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

fn report_missing(missing: &mut Vec<Missing>, stage: &str, why: impl std::fmt::Display) {
    missing.push(Missing {
        stage: stage.to_string(),
        why: why.to_string(),
    });
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Unreadable> {
    Ok(crate::fsutil::read_json(path, MAX_TEXT_BYTES).map_err(ReadError::at(path))?)
}

/// The JSON objects of a JSON-lines file.
fn read_lines(path: &Path) -> Result<Vec<Value>, Unreadable> {
    let text = read_bounded(path, MAX_LOG_BYTES).map_err(ReadError::at(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| Unreadable::Line {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

fn number(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}
