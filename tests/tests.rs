//! Integration tests, one binary (see `Cargo.toml` `autotests = false`).

mod adapt;
mod arch;
mod architecture;
mod common;
mod crafted;
mod eval;
mod model;
mod real_data;
mod report;
mod run;
mod sandbox;
mod serve;
mod slurm;
mod snapshots;
mod svf;
mod train;
mod validate;
