//! Datasets: cards, reading source files (polars), mapping rows to records, templating, splitting,
//! and the `data.<name>` stage that writes the prepared records.

pub mod card;
mod read;
mod records;
mod split;
pub mod stage;
pub mod template;
