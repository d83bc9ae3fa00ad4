//! The `decompose` kind, when the pipeline has `svd`: the SVD of every selected matrix of the
//! model, through the factor cache shared across pipelines and runs ([`crate::svd::cache`]). The
//! stage writes `targets.json`: each target's shape, rank, reconstruction error and cache file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::model::ModelRecord;
use super::{Declared, Env, Kind, Shared, to_json};
use crate::dag::Stage;
use crate::exec::{StageContext, StageError, StageRunner};
use crate::pipeline::Pipeline;
use crate::svd::cache::{ALGORITHM_VERSION, CacheError, Decomposed, SvdCache};
use crate::svd::targets::{SvdSpec, select, shape};

pub const TARGETS_FILE: &str = "targets.json";

pub struct DecomposeStage<'a> {
    pub spec: SvdSpec,
    /// The pipeline's model source and the directory it is relative to (for `describe`).
    pub model_source: String,
    pub base_dir: PathBuf,
    pub shared: &'a Shared,
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

/// The SVD factors of the targets the upstream `decompose` stage listed, from the shared cache.
pub fn upstream_factors(
    ctx: &StageContext,
    model: &crate::model::Model,
    base: &crate::svf::expert::BaseModel,
    home: &crate::assets::TsqHome,
) -> Result<Vec<Decomposed>, StageError> {
    let file = ctx
        .upstream_dir(&crate::stages::ids::decompose())?
        .join(TARGETS_FILE);
    let targets: Vec<Target> = crate::fsutil::read_json(&file, crate::fsutil::MAX_TEXT_BYTES)
        .map_err(|e| StageError::at("reading", &file, e))?;
    let names: Vec<String> = targets.into_iter().map(|t| t.name).collect();
    crate::svf::factors_for(model, base, &names, home)
        .map_err(crate::exec::failed_to("loading the SVD factors"))
}

fn failed(e: impl Into<crate::exec::Cause>) -> StageError {
    StageError::failed("decomposing", e)
}

impl StageRunner for DecomposeStage<'_> {
    fn inputs(&self) -> Result<BTreeMap<String, String>, StageError> {
        Ok(BTreeMap::from([(
            "svd_algorithm".to_string(),
            ALGORITHM_VERSION.to_string(),
        )]))
    }

    /// Targets, trainable parameters and cache size, from the model's config alone.
    fn describe(&self) -> Option<String> {
        let source = crate::assets::AssetSource::parse(&self.model_source, &self.base_dir).ok()?;
        let Some(path) = source.cached(&self.shared.home) else {
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
        let record = ModelRecord::from_upstream(ctx)?;
        let model_hash = record.base_model()?.blake3;
        let model = self.shared.model(&record)?;
        let names = select(&self.spec, model.transformer.config.num_layers).map_err(failed)?;
        let cache = SvdCache::new(&self.shared.home, &model_hash);
        let interrupted = || ctx.check_interrupt().is_err();
        let decomposed = cache
            .load_or_decompose(&names, &model.transformer, &interrupted)
            .map_err(|e| match e {
                CacheError::Interrupted => StageError::Interrupted,
                e => failed(e),
            })?;
        let reused = decomposed.iter().filter(|d| d.reused).count();
        let targets = decomposed
            .into_iter()
            .map(|d| {
                let (rows, cols) = (d.factors.u.dim(0)?, d.factors.vt.dim(1)?);
                Ok(Target {
                    name: d.name,
                    rows,
                    cols,
                    rank: d.factors.s.dim(0)?,
                    relative_error: d.factors.relative_error,
                    cache_file: d.file,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(failed)?;
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

pub struct DecomposeKind;

impl Kind for DecomposeKind {
    fn name(&self) -> &'static str {
        "decompose"
    }

    fn version(&self) -> u32 {
        1
    }

    fn declare(&self, p: &Pipeline) -> Vec<Declared> {
        p.spec
            .svd
            .iter()
            .map(|svd| Declared {
                id: super::ids::decompose(),
                subject: None,
                deps: vec![super::ids::model()],
                config: to_json(svd),
                pointer: "/svd".into(),
            })
            .collect()
    }

    fn runner<'a>(&self, env: &'a Env<'a>, _: &Stage) -> Option<Box<dyn StageRunner + 'a>> {
        let p = env.pipeline;
        Some(Box::new(DecomposeStage {
            spec: p.spec.svd.clone()?,
            model_source: p.spec.model.source.clone(),
            base_dir: p.dir().to_path_buf(),
            shared: &env.shared,
        }))
    }
}
