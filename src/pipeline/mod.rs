//! Pipeline files: the typed spec, loading with positions, `--set` overrides, and validation
//! (schema first, then semantic checks), reporting every problem at once.

mod check_adapt;
mod resolved;
pub mod spec;
mod validate;

pub use resolved::ResolvedDataset;

use crate::eval::spec::ResolvedEval;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use crate::diagnostic::{Diagnostic, Origin};
use crate::yaml::{LocatedDoc, SchemaChecker, check_and_deserialize};
use spec::PipelineSpec;

/// The JSON Schema of pipeline files (what `tsq schema` prints and `schemas/` holds).
pub fn json_schema() -> Value {
    let mut schema =
        serde_json::to_value(schemars::schema_for!(PipelineSpec)).expect("schema serialises");
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("title".into(), Value::String("tsq pipeline".into()));
    }
    schema
}

fn checker() -> &'static SchemaChecker {
    static CHECKER: OnceLock<SchemaChecker> = OnceLock::new();
    CHECKER.get_or_init(|| SchemaChecker::new(json_schema()))
}

/// A `--set path.to.key=value` override; the value is read as YAML (`20`, `true`, `[a, b]`, `text`).
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    pub path: String,
    pub value: Value,
    pub argument: String,
}

/// A `--set` argument that is not `path=value` with a YAML value.
#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    #[error("`{0}` is not `path.to.key=value`")]
    NoEquals(String),
    #[error("the value in `{0}` is not valid YAML")]
    NotYaml(String),
}

impl std::str::FromStr for Override {
    type Err = OverrideError;

    fn from_str(argument: &str) -> Result<Self, OverrideError> {
        let (path, text) = argument
            .split_once('=')
            .ok_or_else(|| OverrideError::NoEquals(argument.to_string()))?;
        let doc = LocatedDoc::parse(Path::new("--set"), text)
            .map_err(|_| OverrideError::NotYaml(argument.to_string()))?;
        Ok(Self {
            path: path.trim().to_string(),
            value: doc.value,
            argument: argument.to_string(),
        })
    }
}

/// A pipeline that passed validation: its spec, where it lives, and what validation resolved
/// (datasets with their cards, evaluations with their names).
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub file: PathBuf,
    pub spec: PipelineSpec,
    pub doc: LocatedDoc,
    pub datasets: BTreeMap<String, ResolvedDataset>,
    pub evaluations: Vec<ResolvedEval>,
}

impl Pipeline {
    /// Directory that relative paths in the pipeline start from.
    pub fn dir(&self) -> &Path {
        self.file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    /// Where this pipeline's runs live: `run_dir` from the file (relative to it), else `./runs`.
    pub fn runs_root(&self) -> PathBuf {
        match &self.spec.run_dir {
            Some(dir) => self.dir().join(dir),
            None => PathBuf::from("runs"),
        }
    }

    /// Resolves a path written in the pipeline file.
    pub fn path(&self, written: &str) -> PathBuf {
        self.dir().join(written)
    }
}

/// Fills each expert's `train` with the fields of its `preset` that it does not write itself
/// (fields written beside a preset win). An unknown preset is left for the schema to report.
fn expand_presets(value: &mut Value) {
    let Some(experts) = value.get_mut("experts").and_then(Value::as_object_mut) else {
        return;
    };
    for train in experts
        .values_mut()
        .filter_map(|e| e.get_mut("train").and_then(Value::as_object_mut))
    {
        let preset = train
            .get("preset")
            .and_then(|p| serde_json::from_value::<crate::rl::spec::Preset>(p.clone()).ok());
        if let Some(preset) = preset {
            for (key, field) in preset.fields() {
                train.entry(key).or_insert(field);
            }
        }
    }
}

/// Loads a pipeline file, applies overrides, and runs every check; all problems come back at once.
pub fn load(file: &Path, overrides: &[Override]) -> Result<Pipeline, Vec<Diagnostic>> {
    let mut doc = LocatedDoc::load(file)?;
    let mut errors = Vec::new();
    for o in overrides {
        if let Err(e) = doc.set(&o.path, o.value.clone(), &o.argument) {
            errors.push(Diagnostic {
                origin: Origin::Override {
                    argument: o.argument.clone(),
                },
                path: o.path.clone(),
                message: e.to_string(),
                help: None,
            });
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    expand_presets(&mut doc.value);
    let spec: PipelineSpec = check_and_deserialize(checker(), &doc)?;
    let mut pipeline = Pipeline {
        file: file.to_path_buf(),
        spec,
        doc,
        datasets: BTreeMap::new(),
        evaluations: Vec::new(),
    };
    validate::semantic_checks(&mut pipeline)?;
    Ok(pipeline)
}
