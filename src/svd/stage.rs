//! The `decompose` stage: SVD of every selected matrix of the pipeline's model, cached across
//! pipelines and runs under `$TSQ_HOME/svd/v{ALGORITHM_VERSION}/<model blake3>/<name>.safetensors`
//! (tensors `u`, `s`, `vt`). The stage writes `targets.json`: each target's shape, rank,
//! reconstruction error and cache file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::targets::{select, shape};
use super::{Factors, decompose_all};
use crate::assets::TsqHome;
use crate::exec::{StageContext, StageError, StageRunner};
use crate::pipeline::spec::SvdSpec;

/// Bump when the decomposition changes, so old cache entries are not reused.
pub const ALGORITHM_VERSION: u32 = 1;
pub const TARGETS_FILE: &str = "targets.json";

pub struct DecomposeStage {
    pub spec: SvdSpec,
    /// The pipeline's model source and the directory it is relative to (for `describe`).
    pub model_source: String,
    pub base_dir: PathBuf,
    pub home: TsqHome,
}

/// One decomposed matrix, as listed in `targets.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
    pub relative_error: f64,
    pub cache_file: PathBuf,
}

fn failed(e: impl std::fmt::Display) -> StageError {
    StageError::failed(e.to_string())
}

/// The model file and its content hash, from the upstream `model` stage's record.
fn upstream_model(ctx: &StageContext) -> Result<(PathBuf, String), StageError> {
    let dir = ctx
        .upstream
        .get("model")
        .ok_or_else(|| failed("the decompose stage needs the model stage"))?;
    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(crate::model::stage::MODEL_FILE)).map_err(failed)?,
    )
    .map_err(failed)?;
    let path = record["path"]
        .as_str()
        .ok_or_else(|| failed("model record lacks `path`"))?;
    let hash = record["blake3"].as_str().ok_or_else(|| {
        failed("decomposing a model directory is not supported yet: use a single weights file")
    })?;
    Ok((PathBuf::from(path), hash.to_string()))
}

fn save(factors: &Factors, file: &Path) -> Result<(), StageError> {
    let tensors: std::collections::HashMap<String, Tensor> =
        [("u", &factors.u), ("s", &factors.s), ("vt", &factors.vt)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(failed)?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(failed)?;
    candle_core::safetensors::save(&tensors, tmp.path()).map_err(failed)?;
    tmp.persist(file).map_err(|e| failed(e.error))?;
    Ok(())
}

/// A cached decomposition, if present and readable: (rank, relative error recomputed on load).
fn cached(file: &Path, weight: &Tensor) -> Option<(usize, f64)> {
    let t = candle_core::safetensors::load(file, &Device::Cpu).ok()?;
    let (u, s, vt) = (t.get("u")?, t.get("s")?, t.get("vt")?);
    let composed = super::compose(u, s, vt).ok()?;
    let diff = (composed - weight)
        .ok()?
        .sqr()
        .ok()?
        .sum_all()
        .ok()?
        .to_scalar::<f32>()
        .ok()? as f64;
    let base = weight.sqr().ok()?.sum_all().ok()?.to_scalar::<f32>().ok()? as f64;
    let err = (diff / base.max(f64::MIN_POSITIVE)).sqrt();
    (err <= super::MAX_RELATIVE_ERROR).then(|| (s.dim(0).unwrap_or(0), err))
}

impl StageRunner for DecomposeStage {
    fn inputs(&self) -> Result<BTreeMap<String, String>, StageError> {
        Ok(BTreeMap::from([(
            "svd_algorithm".to_string(),
            ALGORITHM_VERSION.to_string(),
        )]))
    }

    /// Targets, trainable parameters and cache size, from the model's config alone.
    fn describe(&self) -> Option<String> {
        let source = crate::assets::AssetSource::parse(&self.model_source, &self.base_dir).ok()?;
        let Some(path) = source.cached(&self.home) else {
            return Some("targets are known once the model is fetched (`tsq fetch`)".into());
        };
        let config = match crate::model::read_config(&path) {
            Ok(config) => config,
            Err(e) => return Some(format!("cannot read the model config: {e}")),
        };
        let names = match select(&self.spec, config.num_layers) {
            Ok(names) => names,
            Err(e) => return Some(format!("error: {e}")),
        };
        let shapes: Vec<(usize, usize)> = names.iter().map(|n| shape(&config, n)).collect();
        let params: usize = shapes.iter().map(|&(r, c)| r.min(c)).sum();
        let bytes: usize = shapes
            .iter()
            .map(|&(r, c)| 4 * (r.min(c) * (r + c + 1)))
            .sum();
        let first = names.first().map(String::as_str).unwrap_or("");
        Some(format!(
            "{} matrices (first `{first}`), {params} trainable parameters per expert, cache {:.1} MB",
            names.len(),
            bytes as f64 / 1e6
        ))
    }

    fn run(&self, ctx: &StageContext) -> Result<Value, StageError> {
        let (model_path, model_hash) = upstream_model(ctx)?;
        let model =
            crate::model::Model::load(&model_path, DType::F32, &Device::Cpu).map_err(failed)?;
        let names = select(&self.spec, model.transformer.config.num_layers).map_err(failed)?;
        let weights = model.transformer.tensors();
        let cache_dir = self
            .home
            .path()
            .join("svd")
            .join(format!("v{ALGORITHM_VERSION}"))
            .join(&model_hash);
        let mut targets = Vec::with_capacity(names.len());
        let mut todo = Vec::new();
        for name in &names {
            let weight = weights
                .get(&format!("{name}.weight"))
                .ok_or_else(|| failed(format!("the model has no `{name}`")))?;
            let file = cache_dir.join(format!("{name}.safetensors"));
            let (rows, cols) = weight.dims2().map_err(failed)?;
            match cached(&file, weight) {
                Some((rank, relative_error)) => targets.push(Target {
                    name: name.clone(),
                    rows,
                    cols,
                    rank,
                    relative_error,
                    cache_file: file,
                }),
                None => todo.push((name.clone(), weight.clone())),
            }
        }
        let reused = targets.len();
        for chunk in todo.chunks(rayon::current_num_threads().max(1) * 2) {
            ctx.check_interrupt()?;
            for ((name, weight), factors) in chunk.iter().zip(decompose_all(chunk)) {
                let factors = factors.map_err(failed)?;
                let file = cache_dir.join(format!("{name}.safetensors"));
                save(&factors, &file)?;
                let (rows, cols) = weight.dims2().map_err(failed)?;
                targets.push(Target {
                    name: name.clone(),
                    rows,
                    cols,
                    rank: factors.s.dim(0).map_err(failed)?,
                    relative_error: factors.relative_error,
                    cache_file: file,
                });
            }
        }
        targets.sort_by_key(|t| names.iter().position(|n| *n == t.name));
        let params: usize = targets.iter().map(|t| t.rank).sum();
        let cache_bytes: u64 = targets
            .iter()
            .filter_map(|t| std::fs::metadata(&t.cache_file).ok())
            .map(|m| m.len())
            .sum();
        crate::fsutil::write_json(&ctx.output(TARGETS_FILE), &targets).map_err(failed)?;
        let worst = targets.iter().map(|t| t.relative_error).fold(0.0, f64::max);
        Ok(
            json!({"targets": targets.len(), "trainable_parameters": params, "cache_bytes": cache_bytes, "reused_from_cache": reused, "max_relative_error": worst}),
        )
    }
}
