//! YAML input files as JSON values plus a map from every field path to its position in the file.
//!
//! All user-written YAML (pipelines, dataset cards) goes through [`LocatedDoc`]: parse once with
//! saphyr (which keeps line/column marks), convert to `serde_json::Value` so the JSON Schema check
//! and serde deserialisation see one representation, and keep the positions so that any later error,
//! schema or semantic, can name the line and column of the field it is about.

mod doc;
mod schema_check;

pub use doc::{LocatedDoc, Pointer, dotted};
pub use schema_check::{SchemaChecker, check_and_deserialize, describe};
