//! Integration tests, one binary (see `Cargo.toml` `autotests = false`).

mod common;
mod validate;
mod run;
mod real_data;
