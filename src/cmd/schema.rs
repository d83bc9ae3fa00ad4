//! `tsq schema`: the JSON Schema of pipeline files.

use super::CmdError;

pub fn run() -> Result<(), CmdError> {
    println!(
        "{}",
        serde_json::to_string_pretty(&crate::pipeline::json_schema()).expect("schema serialises")
    );
    Ok(())
}
