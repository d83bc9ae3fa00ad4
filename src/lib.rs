//! tsq: Transformer²-style self-adaptive LLMs from YAML pipelines.
//!
//! Module map (see README "Architecture"): `pipeline` (the file users write), `dag` (stages from a
//! pipeline), `exec` (running stages with caching and resume), `assets` (model and data sources),
//! `data` (dataset cards and the data stage), `model` (the engine), `svd`, `svf` (experts),
//! `reward` (judging answers, the code sandbox), `rl` (training experts), `eval` (evaluation), `stages` (stage kinds),
//! `cmd`/`cli` (commands).

pub mod adapt;
pub mod assets;
pub mod cli;
pub mod cmd;
pub mod dag;
pub mod data;
pub mod diagnostic;
pub mod eval;
pub mod exec;
pub mod fsutil;
#[cfg(test)]
mod fuzz;
pub mod hash;
pub mod jinja;
pub mod model;
pub mod pipeline;
pub mod report;
pub mod reward;
pub mod rl;
pub mod serve;
pub mod stages;
pub mod svd;
pub mod svf;
pub mod yaml;

/// This build's version, with the git commit it was built from when known (`0.1.0 (abc123)`).
pub const VERSION: &str = env!("TSQ_VERSION");
