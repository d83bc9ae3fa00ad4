//! Datasets: cards, reading source files (polars) or built-in generators, mapping rows to records, templating, splitting,
//! and the `data.<name>` stage that writes the prepared records.

pub mod card;
pub mod generate;
mod read;
pub use read::{Limits, read_rows};
mod records;
pub mod split;
pub mod stage;
pub mod template;

use std::path::Path;

use polars::prelude::{DataFrame, ParquetWriter};

use crate::exec::StageError;

/// Writes a table as parquet (records, evaluation samples).
pub fn write_parquet(path: &Path, df: &mut DataFrame) -> Result<(), StageError> {
    let file = std::fs::File::create(path).map_err(|e| StageError::at("creating", path, e))?;
    ParquetWriter::new(file)
        .finish(df)
        .map_err(|e| StageError::at("writing", path, e))?;
    Ok(())
}
