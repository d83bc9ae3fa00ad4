//! From source rows to tsq records: pick the record object, drop repeated documents, map fields.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::card::DatasetCard;

/// A record ready for templating: the card's fields by tsq name, plus its source row number.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub row: usize,
    pub id: String,
    pub fields: Map<String, Value>,
}

/// A row that could not become a record, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BadRecord {
    pub row: usize,
    pub reason: String,
}

/// Rows mapped to records; `deduplicated` counts rows dropped as repeats of an earlier document.
pub struct Mapped {
    pub records: Vec<Record>,
    pub bad: Vec<BadRecord>,
    pub deduplicated: usize,
}

/// Looks up a dotted path (`doc.choices`) in a JSON value.
pub fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, seg| match v {
        Value::Object(map) => map.get(seg),
        Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

pub fn map_rows(card: &DatasetCard, rows: &[Value]) -> Mapped {
    let mut seen_docs = BTreeSet::new();
    let mut seen_ids = BTreeSet::new();
    let mut out = Mapped {
        records: Vec::new(),
        bad: Vec::new(),
        deduplicated: 0,
    };
    for (row_index, row) in rows.iter().enumerate() {
        if let Some(key_path) = &card.dedupe_by
            && let Some(key) = lookup(row, key_path)
            && !seen_docs.insert(key.to_string())
        {
            out.deduplicated += 1;
            continue;
        }
        match map_row(card, row) {
            Err(reason) => out.bad.push(BadRecord {
                row: row_index,
                reason: reason.to_string(),
            }),
            Ok((id, _)) if seen_ids.contains(&id) => out.bad.push(BadRecord {
                row: row_index,
                reason: format!("duplicate id `{id}`"),
            }),
            Ok((id, fields)) => {
                seen_ids.insert(id.clone());
                out.records.push(Record {
                    row: row_index,
                    id,
                    fields,
                });
            }
        }
    }
    out
}

/// Why a row is not a record.
#[derive(Debug, thiserror::Error)]
enum RowError {
    #[error("no record object at `{0}`")]
    NoRecord(String),
    #[error("missing field `{name}` (at `{path}`)")]
    MissingField { name: String, path: String },
}

fn map_row(card: &DatasetCard, row: &Value) -> Result<(String, Map<String, Value>), RowError> {
    let root = match &card.record {
        Some(path) => lookup(row, path).ok_or_else(|| RowError::NoRecord(path.clone()))?,
        None => row,
    };
    let mut fields = Map::new();
    for (name, path) in &card.fields {
        match lookup(root, path) {
            Some(Value::Null) | None => {
                return Err(RowError::MissingField {
                    name: name.clone(),
                    path: path.clone(),
                });
            }
            Some(v) => fields.insert(name.clone(), v.clone()),
        };
    }
    let id = match &fields["id"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Ok((id, fields))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn card() -> DatasetCard {
        serde_json::from_value(json!({
            "name": "t", "license": "MIT", "source": "x.jsonl", "record": "doc", "dedupe_by": "doc_id",
            "fields": {"id": "id", "question": "query", "choices": "choices", "gold": "gold"}
        }))
        .unwrap()
    }

    #[test]
    fn dedupes_maps_and_reports_bad_rows() {
        let rows = vec![
            json!({"doc_id": 0, "doc": {"id": "a", "query": "Q1", "choices": ["x", "y"], "gold": 1}}),
            json!({"doc_id": 0, "doc": {"id": "a", "query": "Q1", "choices": ["x", "y"], "gold": 1}}),
            json!({"doc_id": 1, "doc": {"id": 7, "query": "Q2", "choices": ["z"], "gold": 0}}),
            json!({"doc_id": 2, "doc": {"id": "c", "choices": ["z"], "gold": 0}}),
            json!({"doc_id": 3, "doc": {"id": "a", "query": "Q4", "choices": ["z"], "gold": 0}}),
        ];
        let m = map_rows(&card(), &rows);
        assert_eq!(m.deduplicated, 1);
        assert_eq!(
            m.records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "7"]
        );
        assert_eq!(m.records[0].fields["choices"], json!(["x", "y"]));
        assert_eq!(
            m.bad,
            vec![
                BadRecord {
                    row: 3,
                    reason: "missing field `question` (at `query`)".into()
                },
                BadRecord {
                    row: 4,
                    reason: "duplicate id `a`".into()
                },
            ]
        );
    }
}
