//! Dataset cards (`datasets/*.yaml`): where a dataset's records come from, how to read them, and
//! how to map them to tsq's record fields. Loaded through the same located-YAML path as pipelines,
//! so a bad card gets errors with its own file, line and field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::generate::Generator;
use crate::assets::AssetSource;
use crate::diagnostic::Diagnostic;
use crate::yaml::{LocatedDoc, SchemaChecker, check_and_deserialize};

/// A dataset card as written.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetCard {
    /// Human name of the dataset.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Licence of the data (SPDX identifier where there is one).
    pub license: String,
    /// Asset source of the data file: local path (relative to the card), `pip://` or `hf://`.
    /// Exactly one of `source` and `generator`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A built-in generator of the records, instead of a source file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator: Option<Generator>,
    /// sha256 of the data file in hex; verified before reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
    /// File format; by default taken from the file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DataFormat>,
    /// Dotted path of the object holding the record inside each row (e.g. `doc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// Dotted path (from the row) of a key that identifies a document; rows repeating a key already
    /// seen are dropped (sources that repeat a document once per answer choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe_by: Option<String>,
    /// tsq field name → dotted path inside the record. `id` and `question` are required.
    pub fields: BTreeMap<String, String>,
    /// Expected number of records after deduplication; a different count fails the stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    Jsonl,
    #[serde(rename = "jsonl.gz")]
    JsonlGz,
    Json,
    Csv,
    Parquet,
}

impl DataFormat {
    /// The format a file name implies, if any.
    pub fn from_file_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        [
            (".jsonl.gz", Self::JsonlGz),
            (".jsonl", Self::Jsonl),
            (".json", Self::Json),
            (".csv", Self::Csv),
            (".parquet", Self::Parquet),
        ]
        .into_iter()
        .find(|(ext, _)| lower.ends_with(ext))
        .map(|(_, f)| f)
    }
}

/// A card that parsed and passed its checks, with the directory its relative paths start from.
#[derive(Clone, Debug)]
pub struct LoadedCard {
    pub file: PathBuf,
    pub card: DatasetCard,
    pub origin: Origin,
}

/// Where a checked card's rows come from.
#[derive(Clone, Debug)]
pub enum Origin {
    File { source: String, format: DataFormat },
    Generated(Generator),
}

pub const REQUIRED_FIELDS: [&str; 2] = ["id", "question"];

fn checker() -> &'static SchemaChecker {
    static CHECKER: OnceLock<SchemaChecker> = OnceLock::new();
    CHECKER.get_or_init(|| {
        SchemaChecker::new(
            serde_json::to_value(schemars::schema_for!(DatasetCard)).expect("schema serialises"),
        )
    })
}

/// Loads and checks a card: schema, required fields, a known format.
pub fn load_card(file: &Path) -> Result<LoadedCard, Vec<Diagnostic>> {
    let doc = LocatedDoc::load(file)?;
    let card: DatasetCard = check_and_deserialize(checker(), &doc)?;
    let mut errors = Vec::new();
    for field in REQUIRED_FIELDS {
        if !card.fields.contains_key(field) {
            errors.push(doc.diagnostic(
                "/fields",
                true,
                format!("missing required field mapping `{field}`"),
            ));
        }
    }
    let origin = match (&card.source, &card.generator) {
        (Some(source), None) => file_origin(&doc, file, source, card.format, &mut errors),
        (None, Some(generator)) => {
            if let Err((field, message)) = generator.check() {
                errors.push(doc.diagnostic(&format!("/generator/{field}"), false, message));
            }
            Some(Origin::Generated(generator.clone()))
        }
        (Some(_), Some(_)) => {
            errors.push(doc.diagnostic(
                "/generator",
                true,
                "a card has either `source` or `generator`, not both".to_string(),
            ));
            None
        }
        (None, None) => {
            errors.push(
                doc.diagnostic("", true, "the card names no data".to_string())
                    .with_help("add `source:` (a file) or `generator:` (built-in records)"),
            );
            None
        }
    };
    match (errors.is_empty(), origin) {
        (true, Some(origin)) => Ok(LoadedCard {
            file: file.to_path_buf(),
            card,
            origin,
        }),
        _ => Err(errors),
    }
}

/// Checks a source file's address and tells its format.
fn file_origin(
    doc: &LocatedDoc,
    file: &Path,
    source: &str,
    format: Option<DataFormat>,
    errors: &mut Vec<Diagnostic>,
) -> Option<Origin> {
    let dir = file.parent().unwrap_or(Path::new("."));
    if let Err(e) = AssetSource::check(source, dir) {
        errors.push(doc.diagnostic("/source", false, e.to_string()));
    }
    let source_name = source.rsplit(['/', '#']).next().unwrap_or(source);
    let format = format.or_else(|| DataFormat::from_file_name(source_name));
    if format.is_none() {
        errors.push(
            doc.diagnostic(
                "/source",
                false,
                format!("cannot tell the format of `{source_name}` from its name"),
            )
            .with_help("add `format:` (jsonl, jsonl.gz, json, csv or parquet)"),
        );
    }
    format.map(|format| Origin::File {
        source: source.to_string(),
        format,
    })
}

impl LoadedCard {
    /// Directory relative paths in the card start from.
    pub fn dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new("."))
    }
}
