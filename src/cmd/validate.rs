//! `tsq validate`: check pipeline files and report every problem at once.

use std::path::PathBuf;

use serde_json::json;

use super::{CmdError, Format, render};
use crate::pipeline::Override;

pub fn run(files: &[PathBuf], overrides: &[Override], format: Format) -> Result<(), CmdError> {
    let results: Vec<_> = files
        .iter()
        .map(|f| {
            (
                f,
                crate::pipeline::load(f, overrides)
                    .err()
                    .unwrap_or_default(),
            )
        })
        .collect();
    let total: usize = results.iter().map(|(_, d)| d.len()).sum();
    match format {
        Format::Json => {
            let files: Vec<_> = results
                .iter()
                .map(|(f, d)| json!({"file": f, "valid": d.is_empty(), "errors": d}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"valid": total == 0, "files": files}))
                    .expect("json")
            );
        }
        Format::Text => {
            for (file, diagnostics) in &results {
                if diagnostics.is_empty() {
                    println!("ok: {}", file.display());
                } else {
                    eprint!("{}", render(diagnostics));
                    println!(
                        "invalid: {} ({} problem(s))",
                        file.display(),
                        diagnostics.len()
                    );
                }
            }
        }
    }
    if total == 0 {
        Ok(())
    } else {
        Err(CmdError::Reported(total))
    }
}
