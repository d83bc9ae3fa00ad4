//! A finished stage's manifest: what it was computed from (the cache key and its parts), what it
//! wrote, and a summary. The key is the blake3 of the canonical JSON of `inputs`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fsutil::MAX_TEXT_BYTES;

pub const MANIFEST_FILE: &str = "manifest.json";
/// 2: outputs carry their blake3 (1 had sizes only; such stages re-run).
const FORMAT_VERSION: u32 = 2;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub stage: String,
    /// blake3 over `inputs`: equal keys mean the stage would compute the same thing.
    pub key: String,
    /// Everything the key covers, by name: `config`, `tsq`, `upstream:<stage>`, and the stage's own
    /// inputs (file hashes, asset identities). Kept in full so `plan` can say what changed.
    pub inputs: BTreeMap<String, String>,
    /// Output files (relative to the stage directory) as committed.
    pub outputs: BTreeMap<String, OutputFile>,
    pub started_unix: f64,
    pub duration_s: f64,
    pub summary: Value,
}

/// An output file as committed: a manifest vouches for exactly these bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OutputFile {
    pub bytes: u64,
    pub blake3: String,
}

impl Manifest {
    pub fn new(stage: &str, inputs: BTreeMap<String, String>) -> Self {
        let key = key_of(&inputs);
        Self {
            format: FORMAT_VERSION,
            stage: stage.into(),
            key,
            inputs,
            outputs: BTreeMap::new(),
            started_unix: 0.0,
            duration_s: 0.0,
            summary: Value::Null,
        }
    }

    /// Reads a stage directory's manifest; `None` if absent or unreadable (then the stage re-runs).
    pub fn read(stage_dir: &Path) -> Option<Self> {
        crate::fsutil::read_json::<Self>(&stage_dir.join(MANIFEST_FILE), MAX_TEXT_BYTES)
            .ok()
            .filter(|m| m.format == FORMAT_VERSION)
    }

    /// Records every file under `dir` (except the manifest) as an output, with its hash, and
    /// makes each file and directory durable (fsync) first: after a power loss, nothing a
    /// committed manifest vouches for can be missing or silently different.
    pub fn record_outputs(&mut self, dir: &Path) -> std::io::Result<()> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(dir) {
                    let rel = rel.to_string_lossy().to_string();
                    if rel != MANIFEST_FILE {
                        // One open: made durable, then hashed.
                        let file = crate::fsutil::open_regular(&path)?;
                        file.sync_all()?;
                        let output = OutputFile {
                            bytes: file.metadata()?.len(),
                            blake3: crate::hash::reader_blake3(&file)?,
                        };
                        self.outputs.insert(rel, output);
                    }
                }
            }
            crate::fsutil::sync_dir(&d)?;
        }
        Ok(())
    }

    /// Whether every recorded output is still there with its recorded size and hash.
    pub fn outputs_intact(&self, stage_dir: &Path) -> bool {
        self.outputs.iter().all(|(rel, output)| {
            let path = stage_dir.join(rel);
            std::fs::metadata(&path).is_ok_and(|m| m.len() == output.bytes)
                && crate::hash::file_blake3(&path).is_ok_and(|h| h == output.blake3)
        })
    }

    pub fn write(&self, stage_dir: &Path) -> std::io::Result<()> {
        crate::fsutil::write_json(&stage_dir.join(MANIFEST_FILE), self)
    }
}

pub fn key_of(inputs: &BTreeMap<String, String>) -> String {
    crate::hash::json_blake3(&serde_json::to_value(inputs).expect("string map serialises"))
}

/// Human reasons why `old` inputs differ from `new` ones, e.g. "`file:templates/a.jinja` changed".
pub fn differences(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, hash) in new {
        match old.get(name) {
            None => out.push(format!("`{name}` is new")),
            Some(h) if h != hash => out.push(format!("`{name}` changed")),
            _ => {}
        }
    }
    out.extend(
        old.keys()
            .filter(|k| !new.contains_key(*k))
            .map(|k| format!("`{k}` removed")),
    );
    out
}
