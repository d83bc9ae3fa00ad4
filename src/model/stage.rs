//! The `model` stage: fetch the model asset (any source), check the sha256 pin, and record its
//! format, size and content hash. Its cache key is the asset's identity, so a changed local file
//! or a different package version re-runs everything that depends on the model.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::assets::{AssetSource, TsqHome, verify_sha256};
use crate::exec::{StageContext, StageError, StageRunner};
use crate::pipeline::spec::ModelSpec;

pub const MODEL_FILE: &str = "model.json";

pub struct ModelStage {
    pub spec: ModelSpec,
    pub base_dir: std::path::PathBuf,
    pub home: TsqHome,
}

impl ModelStage {
    fn source(&self) -> Result<AssetSource, StageError> {
        AssetSource::parse(&self.spec.source, &self.base_dir)
            .map_err(|e| StageError::failed(e.to_string()))
    }
}

/// The weight format a path implies: GGUF and safetensors files, or an HF-layout directory.
fn format_of(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        _ if path.is_dir() => "directory",
        Some("gguf") => "gguf",
        Some("safetensors") => "safetensors",
        _ => "unknown",
    }
}

impl StageRunner for ModelStage {
    fn inputs(&self) -> Result<BTreeMap<String, String>, StageError> {
        let identity = self
            .source()?
            .identity()
            .map_err(|e| StageError::failed(e.to_string()))?;
        Ok(BTreeMap::from([("model".to_string(), identity)]))
    }

    fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let path = self
            .source()?
            .resolve(&self.home)
            .map_err(|e| StageError::failed(e.to_string()))?;
        verify_sha256(&path, self.spec.sha256.as_deref())
            .map_err(|e| StageError::failed(e.to_string()))?;
        let format = format_of(&path);
        if format == "unknown" {
            return Err(StageError::failed(format!(
                "`{}` is not a GGUF or safetensors file or a model directory",
                path.display()
            )));
        }
        let (size, hash) = if path.is_file() {
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            (size, Some(crate::exec::file_input(&path)?))
        } else {
            (0, None)
        };
        let info = json!({"source": self.spec.source, "path": path, "format": format, "bytes": size, "blake3": hash});
        crate::fsutil::write_json(&ctx.output(MODEL_FILE), &info)
            .map_err(|e| StageError::failed(format!("cannot write {MODEL_FILE}: {e}")))?;
        Ok(info)
    }
}
