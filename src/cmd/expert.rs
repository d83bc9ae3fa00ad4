//! `tsq expert inspect|combine|export`: SVF expert files as things a user can look at, mix and ship.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{CmdError, Format, ModelArgs};
use crate::svf::expert::{Expert, Mix, combine, layer_of};

/// Summary statistics of a vector.
fn stats(values: &[f32]) -> Value {
    let n = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    json!({"mean": mean, "std": var.sqrt(), "min": min, "max": max})
}

/// Per target: m(z) statistics and the effective scaling of the matrix, Σ(s ⊙ e) / Σ s.
fn describe(expert: &Expert) -> Result<Value, CmdError> {
    let scales = expert.effective_scales().map_err(CmdError::failed)?;
    let mut targets = Vec::new();
    for (name, (z, s)) in &expert.vectors {
        let m: Vec<f32> = crate::svf::scale(expert.meta.parametrization, z)
            .and_then(|m| m.to_vec1())
            .map_err(CmdError::failed)?;
        let e: Vec<f32> = scales[name].to_vec1().map_err(CmdError::failed)?;
        let s: Vec<f32> = s.to_vec1().map_err(CmdError::failed)?;
        let total: f64 = s.iter().map(|&v| v as f64).sum();
        let scaled: f64 = s.iter().zip(&e).map(|(&s, &e)| (s * e) as f64).sum();
        targets.push(json!({
            "target": name, "layer": layer_of(name), "rank": s.len(), "m": stats(&m),
            "effective_scale": stats(&e), "singular_value_mass": scaled / total.max(f64::MIN_POSITIVE),
        }));
    }
    Ok(json!({
        "format_version": expert.meta.format_version, "base_model": expert.meta.base_model,
        "parametrization": expert.meta.parametrization, "svd_algorithm": expert.meta.svd_algorithm,
        "trainable_parameters": expert.vectors.values().map(|(z, _)| z.elem_count()).sum::<usize>(),
        "training": expert.meta.training, "targets": targets,
    }))
}

pub fn inspect(file: &Path, format: Format) -> Result<(), CmdError> {
    let expert = Expert::load(file).map_err(CmdError::failed)?;
    let report = describe(&expert)?;
    if format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(CmdError::failed)?
        );
        return Ok(());
    }
    println!("{}", file.display());
    println!(
        "  base model      {} (blake3 {})",
        expert.meta.base_model.name,
        expert
            .meta
            .base_model
            .blake3
            .chars()
            .take(16)
            .collect::<String>()
    );
    println!(
        "  parametrization {:?}, {} targets, {} parameters",
        expert.meta.parametrization,
        expert.meta.targets.len(),
        report["trainable_parameters"]
    );
    if !expert.meta.training.is_null() {
        println!("  made by         {}", expert.meta.training);
    }
    println!(
        "  {:<28} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "target", "rank", "m mean", "m std", "e min", "e max", "Σs'/Σs"
    );
    for t in report["targets"].as_array().into_iter().flatten() {
        println!(
            "  {:<28} {:>6} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4}",
            t["target"].as_str().unwrap_or(""),
            t["rank"],
            t["m"]["mean"].as_f64().unwrap_or(f64::NAN),
            t["m"]["std"].as_f64().unwrap_or(f64::NAN),
            t["effective_scale"]["min"].as_f64().unwrap_or(f64::NAN),
            t["effective_scale"]["max"].as_f64().unwrap_or(f64::NAN),
            t["singular_value_mass"].as_f64().unwrap_or(f64::NAN),
        );
    }
    Ok(())
}

/// How `tsq expert combine` weighs its inputs.
pub enum Weights {
    /// One weight per expert (`--weights 0.7,0.3`); none given means equal weights.
    PerExpert(Option<Vec<f64>>),
    /// A JSON file holding one array of per-layer weights per expert.
    PerLayerFile(PathBuf),
}

pub fn combine_files(files: &[PathBuf], weights: &Weights, out: &Path) -> Result<(), CmdError> {
    let experts = files
        .iter()
        .map(|f| {
            Ok((
                f.display().to_string(),
                Expert::load(f).map_err(CmdError::failed)?,
            ))
        })
        .collect::<Result<Vec<_>, CmdError>>()?;
    let mix = match weights {
        Weights::PerExpert(Some(w)) => Mix::PerExpert(w.clone()),
        Weights::PerExpert(None) => Mix::PerExpert(vec![1.0 / files.len() as f64; files.len()]),
        Weights::PerLayerFile(path) => {
            let text = crate::fsutil::read_bounded(path, crate::fsutil::MAX_TEXT_BYTES)
                .map_err(|e| CmdError::Usage(format!("{}: {e}", path.display())))?;
            Mix::PerLayer(serde_json::from_str(&text).map_err(|e| {
                CmdError::Usage(format!(
                    "{}: expected a JSON array of per-layer weight arrays, one per expert: {e}",
                    path.display()
                ))
            })?)
        }
    };
    let mixed = combine(&experts, &mix).map_err(|e| CmdError::Usage(e.to_string()))?;
    mixed.save(out).map_err(CmdError::failed)?;
    println!(
        "wrote {} ({} targets)",
        out.display(),
        mixed.meta.targets.len()
    );
    Ok(())
}

/// Manifest written beside an export, saying how it was made.
pub const EXPORT_MANIFEST: &str = "tsq-export.json";

/// Writes the model with the expert composed in as an HF-layout directory. The directory is
/// built beside `out` and renamed into place, so a failed export leaves nothing half-written,
/// and an existing `out` is never overwritten.
pub fn export(model_args: &ModelArgs, out: &Path) -> Result<(), CmdError> {
    if out.exists() {
        return Err(CmdError::Usage(format!(
            "{} already exists; choose a new directory",
            out.display()
        )));
    }
    // Checked before loading (and maybe fetching) the model.
    let Some(expert_file) = model_args.expert.as_deref() else {
        return Err(CmdError::Usage("export needs --expert FILE".into()));
    };
    let (model, expert) = model_args.load_with_expert()?;
    let expert = expert.ok_or_else(|| CmdError::failed("the expert was not applied"))?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(CmdError::failed)?;
    let staging = tempfile::Builder::new()
        .prefix(".tsq-export-")
        .tempdir_in(parent)
        .map_err(CmdError::failed)?;
    crate::model::hf::save(&model, staging.path()).map_err(CmdError::failed)?;
    let manifest = json!({
        "made_by": format!("tsq {}", env!("CARGO_PKG_VERSION")),
        "base_model": {"source": model_args.source, "path": model.path, "name": expert.meta.base_model.name, "blake3": expert.meta.base_model.blake3},
        "expert": {"file": expert_file, "blake3": crate::hash::file_blake3(expert_file).map_err(CmdError::failed)?, "parametrization": expert.meta.parametrization, "training": expert.meta.training},
        "targets": expert.meta.targets,
        "composition": "W' = U diag(s ⊙ e) Vᵀ in f32 per target; other weights unchanged",
        "tensors": BTreeMap::from([("layout", "HF transformers, model.safetensors, float32")]),
    });
    crate::fsutil::write_json(&staging.path().join(EXPORT_MANIFEST), &manifest)
        .map_err(CmdError::failed)?;
    let built = staging.keep();
    if let Err(e) = std::fs::rename(&built, out) {
        let _ = std::fs::remove_dir_all(&built);
        return Err(CmdError::failed(format!(
            "cannot move the export to {}: {e}",
            out.display()
        )));
    }
    println!(
        "wrote {} ({} targets adapted)",
        out.display(),
        expert.meta.targets.len()
    );
    Ok(())
}
