//! HF-layout model directories: `config.json`, `*.safetensors` (sharded or not), `tokenizer.json`,
//! `tokenizer_config.json` (chat template, BOS/EOS).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::config::{HfConfig, ModelConfig};
use super::error::{ModelError, Result};

/// HF tensor name → canonical name.
pub fn canonical_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("embed.weight"),
        "model.norm.weight" => Some("norm.weight"),
        "lm_head.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest
        .replace("self_attn.", "attn.")
        .replace("input_layernorm", "attn_norm")
        .replace("post_attention_layernorm", "mlp_norm");
    Some(format!("layers.{layer}.{rest}"))
}

pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ModelError::load(&path, format!("cannot read: {e}")))?;
    let hf: HfConfig = serde_json::from_str(&text)
        .map_err(|e| ModelError::load(&path, format!("invalid config: {e}")))?;
    hf.resolve().map_err(|m| ModelError::load(&path, m))
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::load(dir, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::load(dir, "no *.safetensors weight files"));
    }
    Ok(files)
}

pub fn load_tensors(dir: &Path, dtype: DType, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for file in weight_files(dir)? {
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| {
            ModelError::load(
                &file,
                format!("cannot read weights (missing or truncated?): {e}"),
            )
        })?;
        for (name, t) in tensors {
            if let Some(canonical) = canonical_name(&name) {
                out.insert(canonical, t.to_dtype(dtype)?.to_device(device)?);
            }
        }
    }
    Ok(out)
}

/// `tokenizer_config.json`, if present.
pub fn tokenizer_config(dir: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?).ok()
}

/// A special token's text from `tokenizer_config.json` (plain string or `{content: ...}`).
pub fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        other => other.get("content")?.as_str().map(str::to_string),
    }
}
