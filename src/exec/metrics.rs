//! A stage's `metrics.jsonl`: one JSON object per line, each stamped with the time and flushed
//! as written, so it can be followed (`tail -f`) while the stage runs.

use std::io::Write;
use std::path::Path;

use serde_json::Value;

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct Metrics {
    file: Option<std::fs::File>,
}

impl Metrics {
    /// Opens (appending) `metrics.jsonl` in `dir`; metrics are best-effort and never fail a stage.
    pub fn open(dir: &Path) -> Self {
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join(METRICS_FILE))
            .ok();
        Self { file }
    }

    /// Appends one record (an object; `ts` is added).
    pub fn log(&self, mut record: Value) {
        let ts = super::unix_seconds();
        if let Some(obj) = record.as_object_mut() {
            obj.insert("ts".into(), ts.into());
        }
        if let Some(mut file) = self.file.as_ref() {
            let _ = writeln!(file, "{record}");
        }
    }
}
