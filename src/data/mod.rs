//! Datasets: cards, reading source files (polars) or built-in generators, mapping rows to records, templating, splitting,
//! and the `data.<name>` stage that writes the prepared records.

pub mod card;
mod error;
pub mod generate;
mod read;
pub use error::{DataError, TemplateError};
pub use read::{Limits, read_rows};
pub mod records;
pub mod split;
pub mod stored;
pub mod template;

use std::path::Path;

use polars::prelude::{DataFrame, ParquetWriter, PolarsResult};

/// Writes a table as parquet (records, evaluation samples).
pub fn write_parquet(path: &Path, df: &mut DataFrame) -> PolarsResult<()> {
    ParquetWriter::new(std::fs::File::create(path)?).finish(df)?;
    Ok(())
}
