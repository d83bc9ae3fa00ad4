//! Prepared records as the data stage stores them (`records.parquet`: columns `id`, `split`,
//! `prompt`, `target`, `record` as JSON) and every later stage reads them back.

use std::path::Path;

use serde_json::Value;

use super::DataError;
use super::card::DataFormat;
use super::read::{Limits, read_rows};

/// A prepared record as later stages read it back from `records.parquet`.
#[derive(Clone, Debug)]
pub struct StoredRecord {
    pub id: String,
    pub split: String,
    pub prompt: String,
    pub target: Option<String>,
    pub fields: serde_json::Map<String, Value>,
}

/// The records of a records file, in file order (split order, then the split's seeded order).
pub fn read_records(path: &Path) -> Result<Vec<StoredRecord>, DataError> {
    let rows = read_rows(path, DataFormat::Parquet, Limits::default())?;
    rows.into_iter()
        .map(|row| {
            let text = |k: &str| row.get(k).and_then(Value::as_str).map(String::from);
            let fields = text("record")
                .and_then(|r| serde_json::from_str::<Value>(&r).ok())
                .and_then(|v| v.as_object().cloned())
                .ok_or(DataError::Incomplete("its `record` object"))?;
            Ok(StoredRecord {
                id: text("id").ok_or(DataError::Incomplete("`id`"))?,
                split: text("split").unwrap_or_default(),
                prompt: text("prompt").unwrap_or_default(),
                target: text("target"),
                fields,
            })
        })
        .collect()
}
