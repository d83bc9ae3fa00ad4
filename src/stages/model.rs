//! The `model` kind: one stage that fetches the model asset (any source), checks the sha256
//! pin, and records its format, size and content hash in `model.json`. Its cache key is the
//! asset's identity, so a changed local file or a different package version re-runs everything
//! that depends on the model.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use super::{Declared, Env, Kind, to_json};
use crate::dag::Stage;

use crate::assets::{AssetSource, TsqHome, verify_sha256};
use crate::exec::{StageContext, StageError, StageRunner, failed_to};
use crate::model::placement::{Device, Dtype};
use crate::pipeline::Pipeline;
use crate::pipeline::spec::ModelSpec;

pub const MODEL_FILE: &str = "model.json";

/// What the `model` stage records in `model.json`, as later stages read it.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ModelRecord {
    pub source: String,
    pub path: std::path::PathBuf,
    pub format: String,
    /// Content hash of the weights file or model directory (`None` in records written before
    /// directories were hashed).
    pub blake3: Option<String>,
    /// Where the stages compute and in which precision, as the pipeline's `model:` said (records
    /// written before stages honoured it: the CPU in f32, which validation then required).
    #[serde(default)]
    pub device: Device,
    #[serde(default)]
    pub dtype: Dtype,
    /// The pipeline's variables for the chat template.
    #[serde(default)]
    pub chat_template_kwargs: crate::model::chat::ChatVariables,
}

impl ModelRecord {
    /// The record of the finished `model` stage this stage depends on.
    pub fn from_upstream(ctx: &StageContext) -> Result<Self, StageError> {
        let dir = ctx.upstream_dir(&crate::stages::ids::model())?;
        Self::read(dir).map_err(|e| StageError::failed("reading the model record", e))
    }

    /// The identity experts and the SVD cache are keyed by, from the hash this stage recorded
    /// (hashing a model again downstream would read every weight file once more).
    pub fn base_model(&self) -> Result<crate::svf::expert::BaseModel, StageError> {
        let blake3 = self.blake3.clone().ok_or_else(|| {
            StageError::failed(
                "identifying the model",
                "the model stage's record has no content hash (it predates hashing model \
                 directories): run `tsq run --force model` once",
            )
        })?;
        let name = self.path.file_name().unwrap_or_default();
        Ok(crate::svf::expert::BaseModel {
            name: name.to_string_lossy().into_owned(),
            blake3,
        })
    }

    /// The model it records, on its device and in its dtype (every stage, `tsq chat`,
    /// `classify` and `serve` load it so).
    pub fn load(&self) -> Result<crate::model::Model, crate::model::error::ModelError> {
        let device = crate::model::device(self.device)?;
        let mut model =
            crate::model::Model::load(&self.path, crate::model::dtype(self.dtype), &device)?;
        model.set_chat_variables(&self.chat_template_kwargs);
        Ok(model)
    }

    /// The record in a finished model stage's directory.
    pub fn read(stage_dir: &Path) -> Result<Self, crate::fsutil::ReadError> {
        let file = stage_dir.join(MODEL_FILE);
        crate::fsutil::read_json(&file, crate::fsutil::MAX_TEXT_BYTES)
            .map_err(crate::fsutil::ReadError::at(&file))
    }
}

pub struct ModelStage {
    pub spec: ModelSpec,
    pub base_dir: std::path::PathBuf,
    pub home: TsqHome,
}

impl ModelStage {
    fn source(&self) -> Result<AssetSource, StageError> {
        AssetSource::parse(&self.spec.source, &self.base_dir)
            .map_err(failed_to("reading the model source"))
    }
}

/// The size of a weights file, or of the files directly in a model directory.
fn weight_bytes(path: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    match std::fs::read_dir(path) {
        Ok(entries) => entries.flatten().map(|e| size(&e.path())).sum(),
        Err(_) => size(path),
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
            .map_err(failed_to("identifying the model"))?;
        Ok(BTreeMap::from([("model".to_string(), identity)]))
    }

    fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let path = self
            .source()?
            .resolve(&self.home)
            .map_err(failed_to("fetching the model"))?;
        verify_sha256(&path, self.spec.sha256.as_deref())
            .map_err(|e| StageError::at("checking the sha256 pin of", &path, e))?;
        let format = format_of(&path);
        if format == "unknown" {
            return Err(StageError::at(
                "loading the model",
                &path,
                "not a GGUF or safetensors file or a model directory",
            ));
        }
        // A device this build or machine lacks fails here, before anything downstream runs.
        crate::model::device(self.spec.device).map_err(failed_to("opening the model's device"))?;
        let size = weight_bytes(&path);
        let hash = crate::exec::file_input(&path)?;
        let info = json!({
            "source": self.spec.source, "path": path, "format": format, "bytes": size,
            "blake3": hash, "device": self.spec.device, "dtype": self.spec.dtype,
            "chat_template_kwargs": self.spec.chat_template_kwargs,
        });
        crate::fsutil::write_json(&ctx.output(MODEL_FILE), &info)
            .map_err(|e| StageError::at("writing", &ctx.output(MODEL_FILE), e))?;
        Ok(info)
    }
}

pub struct ModelKind;

impl Kind for ModelKind {
    fn name(&self) -> &'static str {
        "model"
    }

    fn version(&self) -> u32 {
        1
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        vec![Declared {
            id: super::ids::model(),
            subject: None,
            deps: vec![],
            config: to_json(&p.spec.model),
            pointer: "/model".into(),
        }]
    }

    fn runner<'a>(&self, env: &'a Env<'a>, _: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        let p = env.pipeline;
        Some(Box::new(ModelStage {
            spec: p.spec.model.clone(),
            base_dir: p.dir().to_path_buf(),
            home: env.shared.home.clone(),
        }))
    }
}
