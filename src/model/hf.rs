//! HF-layout model directories: `config.json`, `*.safetensors` (sharded or not), `tokenizer.json`,
//! `tokenizer_config.json` (chat template, BOS/EOS).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::config::{HfConfig, ModelConfig};
use super::error::{ModelError, Result};

/// Canonical name → HF tensor name (inverse of [`canonical_name`]).
pub fn hf_name(canonical: &str) -> String {
    match canonical {
        "embed.weight" => "model.embed_tokens.weight".into(),
        "norm.weight" => "model.norm.weight".into(),
        "lm_head.weight" => "lm_head.weight".into(),
        other => {
            let rest = other.strip_prefix("layers.").unwrap_or(other);
            let rest = rest
                .replace(".attn.", ".self_attn.")
                .replace(".attn_norm.", ".input_layernorm.")
                .replace(".mlp_norm.", ".post_attention_layernorm.");
            format!("model.layers.{rest}")
        }
    }
}

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

/// Gemma's norms under the generic names (what [`canonical_name`] makes of its HF names) and
/// canonically: its `post_attention_layernorm` normalises the attention's output, and the MLP's
/// input norm is `pre_feedforward_layernorm`. In load order.
const GEMMA_NORMS: [(&str, &str); 3] = [
    ("mlp_norm", "attn_out_norm"),
    ("pre_feedforward_layernorm", "mlp_norm"),
    ("post_feedforward_layernorm", "mlp_out_norm"),
];

/// Renames Gemma's norms to their canonical names (see [`GEMMA_NORMS`]); other families as
/// they are.
pub fn from_gemma_layout(config: &ModelConfig, tensors: &mut BTreeMap<String, Tensor>) {
    rename_gemma_norms(config, tensors, GEMMA_NORMS);
}

/// The inverse of [`from_gemma_layout`], for export.
fn to_gemma_layout(config: &ModelConfig, tensors: &mut BTreeMap<String, Tensor>) {
    let mut back = GEMMA_NORMS.map(|(generic, own)| (own, generic));
    back.reverse();
    rename_gemma_norms(config, tensors, back);
}

fn rename_gemma_norms(
    config: &ModelConfig,
    tensors: &mut BTreeMap<String, Tensor>,
    renames: [(&str, &str); 3],
) {
    if !config.architecture.is_gemma() {
        return;
    }
    for layer in 0..config.num_layers {
        for (from, to) in renames {
            if let Some(t) = tensors.remove(&format!("layers.{layer}.{from}.weight")) {
                tensors.insert(format!("layers.{layer}.{to}.weight"), t);
            }
        }
    }
}

pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = crate::fsutil::read_bounded(&path, crate::fsutil::MAX_TEXT_BYTES)
        .map_err(|e| ModelError::load(&path, format!("cannot read: {e}")))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::load(&path, format!("invalid config: {e}")))?;
    // serde would say "expected usize at line 2 column 39"; name the field instead.
    for field in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
    ] {
        if let Some(v) = value.get(field).filter(|v| !v.is_null() && !v.is_u64()) {
            return Err(ModelError::load(
                &path,
                format!("`{field}` must be a non-negative integer, found {v}"),
            ));
        }
    }
    let hf: HfConfig = serde_json::from_value(value)
        .map_err(|e| ModelError::load(&path, format!("invalid config: {e}")))?;
    hf.resolve().map_err(|e| ModelError::config(&path, e))
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
        // candle maps the file: refuse a device or pipe before it does.
        crate::fsutil::open_regular(&file)
            .map_err(|e| ModelError::load(&file, format!("cannot open: {e}")))?;
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

/// Projections a checkpoint stores stacked in one matrix (Phi-3's `qkv_proj`, `gate_up_proj`),
/// with the parts' rows: the part names and, for each, its row count under `config`.
fn fused_projections(config: &ModelConfig) -> [(&'static str, Vec<(&'static str, usize)>); 2] {
    let (q, kv) = (
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
    );
    let i = config.intermediate_size;
    [
        (
            "attn.qkv_proj",
            vec![("attn.q_proj", q), ("attn.k_proj", kv), ("attn.v_proj", kv)],
        ),
        (
            "mlp.gate_up_proj",
            vec![("mlp.gate_proj", i), ("mlp.up_proj", i)],
        ),
    ]
}

/// Splits every fused projection (weight and bias) among `tensors` into its parts, which is
/// what the engines read; a fused matrix whose rows do not add up is an error naming it as the
/// file does (`file_name` of its canonical name).
pub fn unfuse(
    config: &ModelConfig,
    tensors: &mut BTreeMap<String, Tensor>,
    file_name: fn(&str) -> String,
) -> Result<()> {
    for layer in 0..config.num_layers {
        for (fused, parts) in fused_projections(config) {
            for kind in ["weight", "bias"] {
                let name = format!("layers.{layer}.{fused}.{kind}");
                let Some(whole) = tensors.remove(&name) else {
                    continue;
                };
                let want: usize = parts.iter().map(|(_, rows)| rows).sum();
                if whole.dim(0)? != want {
                    return Err(ModelError::Input(format!(
                        "`{}` has {} rows; the config implies {want}",
                        file_name(&name),
                        whole.dim(0)?
                    )));
                }
                let mut first = 0;
                for (part, rows) in &parts {
                    let piece = whole.narrow(0, first, *rows)?.contiguous()?;
                    tensors.insert(format!("layers.{layer}.{part}.{kind}"), piece);
                    first += rows;
                }
            }
        }
    }
    Ok(())
}

/// The inverse of [`unfuse`], for writing a checkpoint as its family stores it.
fn fuse(config: &ModelConfig, tensors: &mut BTreeMap<String, Tensor>) -> Result<()> {
    for layer in 0..config.num_layers {
        for (fused, parts) in fused_projections(config) {
            for kind in ["weight", "bias"] {
                let names: Vec<String> = (parts.iter())
                    .map(|(part, _)| format!("layers.{layer}.{part}.{kind}"))
                    .collect();
                let pieces: Option<Vec<Tensor>> = names.iter().map(|n| tensors.remove(n)).collect();
                if let Some(pieces) = pieces {
                    let whole = Tensor::cat(&pieces, 0)?;
                    tensors.insert(format!("layers.{layer}.{fused}.{kind}"), whole);
                }
            }
        }
    }
    Ok(())
}

/// `tokenizer_config.json`, if present.
pub fn tokenizer_config(dir: &Path) -> Option<Value> {
    let path = dir.join("tokenizer_config.json");
    serde_json::from_str(&crate::fsutil::read_bounded(&path, crate::fsutil::MAX_TEXT_BYTES).ok()?)
        .ok()
}

/// The ids that end generation in `generation_config.json` (`eos_token_id`, one or a list:
/// instruction-tuned Llama 3 and Phi-3 end a turn with a token other than the tokenizer's EOS).
pub fn generation_eos_ids(dir: &Path) -> Vec<u32> {
    let path = dir.join("generation_config.json");
    let config: Option<Value> = crate::fsutil::read_bounded(&path, crate::fsutil::MAX_TEXT_BYTES)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    let id = |v: &Value| v.as_u64().and_then(|i| u32::try_from(i).ok());
    match config.as_ref().and_then(|c| c.get("eos_token_id")) {
        Some(Value::Array(ids)) => ids.iter().filter_map(id).collect(),
        Some(one) => id(one).into_iter().collect(),
        None => Vec::new(),
    }
}

/// A special token's text from `tokenizer_config.json` (plain string or `{content: ...}`).
pub fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        other => other.get("content")?.as_str().map(str::to_string),
    }
}

/// Writes `model` as an HF-layout directory (config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json) that HF transformers and tsq itself can load.
pub fn save(model: &super::Model, dir: &Path) -> Result<()> {
    let io = |file: &Path, e: &dyn std::fmt::Display| {
        ModelError::load(file, format!("cannot write: {e}"))
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, &e))?;
    let tf = &model.transformer;
    let c = &tf.config;
    let (arch, model_type) = match c.architecture {
        super::config::Architecture::Llama => ("LlamaForCausalLM", "llama"),
        super::config::Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        super::config::Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        super::config::Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        super::config::Architecture::SmolLm3 => ("SmolLM3ForCausalLM", "smollm3"),
        super::config::Architecture::Phi3 => ("Phi3ForCausalLM", "phi3"),
        super::config::Architecture::Gemma2 => ("Gemma2ForCausalLM", "gemma2"),
        super::config::Architecture::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
    };
    let rope_scaling = match &c.rope_scaling {
        None => Value::Null,
        Some(scaling) => scaling.to_hf().ok_or_else(|| {
            ModelError::Input(
                "this model's rope scaling came as GGUF frequency divisors, which config.json \
                 cannot express: export from the model's HF directory instead"
                    .into(),
            )
        })?,
    };
    let mut config = serde_json::json!({
        "rope_scaling": rope_scaling, "sliding_window": c.sliding_window,
        "use_sliding_window": c.sliding_window.is_some(),
        "architectures": [arch], "model_type": model_type, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": "float32", "hidden_act": "silu",
        "bos_token_id": model.tokenizer.bos_id, "eos_token_id": model.tokenizer.eos_ids.first(),
        // Some families default to an id past a small vocabulary (Phi-3's 32000), which
        // transformers then refuses; padding only matters to training there.
        "pad_token_id": Value::Null,
    });
    if let Some(g) = &c.gemma {
        let kind = |i| match g.local_layers.contains(&i) {
            true => "sliding_attention",
            false => "full_attention",
        };
        let gemma = serde_json::json!({
            "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": g.query_pre_attn_scalar,
            "attn_logit_softcapping": g.attn_softcap, "final_logit_softcapping": g.final_softcap,
            "layer_types": (0..c.num_layers).map(kind).collect::<Vec<_>>(),
            "rope_local_base_freq": g.local_rope_theta,
        });
        for (key, value) in gemma.as_object().into_iter().flatten() {
            config[key] = value.clone();
        }
    }
    if let Some(super::config::RopeScaling::LongRope(l)) = &c.rope_scaling {
        // transformers' Phi-3 reads it from the top level only: without it there, transformers
        // 5.25 never switched to the long factors and derived the attention factor from its
        // default context (logits 0.07 off on the `longrope` fixture).
        config["original_max_position_embeddings"] = l.original_context.into();
    }
    if let Some(rotated) = c.partial_rotary_dim {
        config["partial_rotary_factor"] = (rotated as f64 / c.head_dim as f64).into();
    }
    if c.architecture == super::config::Architecture::SmolLm3 {
        let flags: Vec<u8> = (0..c.num_layers).map(|i| u8::from(c.rotates(i))).collect();
        config["no_rope_layers"] = flags.into();
    }
    write_json(&dir.join("config.json"), &config)?;
    let generation = serde_json::json!({
        "bos_token_id": model.tokenizer.bos_id, "eos_token_id": model.tokenizer.eos_ids,
    });
    write_json(&dir.join("generation_config.json"), &generation)?;
    let mut tensors = tf.tensors()?;
    if c.architecture == super::config::Architecture::Phi3 {
        fuse(c, &mut tensors)?;
    }
    to_gemma_layout(c, &mut tensors);
    let tensors: std::collections::HashMap<String, Tensor> = (tensors.into_iter())
        .map(|(k, v)| (hf_name(&k), v))
        .collect();
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).map_err(|e| io(&weights, &e))?;
    model.tokenizer.save(&dir.join("tokenizer.json"))?;
    let token_text = |id: Option<u32>| id.and_then(|i| model.tokenizer.decode(&[i], true).ok());
    let tok_config = serde_json::json!({
        "bos_token": token_text(model.tokenizer.bos_id),
        "eos_token": token_text(model.tokenizer.eos_ids.first().copied()),
        "add_bos_token": model.tokenizer.add_bos,
        "chat_template": model.chat.as_ref().map(|c| c.source()),
    });
    write_json(&dir.join("tokenizer_config.json"), &tok_config)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    crate::fsutil::write_json(path, value)
        .map_err(|e| ModelError::load(path, format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Architecture, RopeScaling, Yarn};
    use crate::model::testing::{random_weights, tiny_config};
    use crate::model::transformer::{Batch, LogitsAt, Mode, Transformer};

    /// Reads a small `config.json` in `dir`: sizes fixed, `family` (the architecture key and
    /// its value) and `extra` (`, "key": value...`) as given.
    fn read_small_config(
        dir: &Path,
        family: &str,
        layers: usize,
        extra: &str,
    ) -> Result<ModelConfig> {
        let config = format!(
            r#"{{{family}, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": {layers}, "num_attention_heads": 4, "vocab_size": 100,
            "rms_norm_eps": 1e-5{extra}}}"#
        );
        std::fs::write(dir.join("config.json"), config).unwrap();
        read_config(dir)
    }

    #[test]
    fn crafted_configs_are_errors_naming_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let config = |layers: &str, vocab: &str| {
            format!(
                r#"{{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": {layers}, "num_attention_heads": 4, "vocab_size": {vocab},
                "rms_norm_eps": 1e-5}}"#
            )
        };
        std::fs::write(dir.path().join("config.json"), config("2", "100")).unwrap();
        assert!(read_config(dir.path()).is_ok());
        for (layers, vocab, want) in [
            ("-1", "100", "num_hidden_layers"),
            ("100000000000", "100", "`num_layers` is 100000000000"),
            ("2", "0", "`vocab_size` is 0"),
        ] {
            std::fs::write(dir.path().join("config.json"), config(layers, vocab)).unwrap();
            let err = read_config(dir.path()).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("config.json"), "{err}");
        }
    }

    /// SmolLM3's layers without rotary embeddings: its list read, the default every fourth,
    /// and a list that does not fit the layers refused naming the field.
    #[test]
    fn smollm3_layers_without_rope_are_read_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let read =
            |extra: &str| read_small_config(dir.path(), r#""model_type": "smollm3""#, 8, extra);
        assert_eq!(read("").unwrap().layers_without_rope, [3, 7]);
        let listed = read(r#", "no_rope_layers": [1, 0, 1, 1, 1, 1, 1, 1]"#).unwrap();
        assert_eq!(listed.layers_without_rope, [1]);
        let err = read(r#", "no_rope_layers": [1, 0, 1]"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`no_rope_layers` has 3 flags for 8 layers")
                && err.contains("config.json"),
            "{err}"
        );
    }

    /// Scalings tsq does not compute are refused by name, bad parameters naming the key;
    /// Llama 3's is read from either form, YaRN's with transformers' defaults.
    #[test]
    fn rope_scaling_is_read_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let read = |extra: &str| {
            read_small_config(
                dir.path(),
                r#""architectures": ["LlamaForCausalLM"]"#,
                2,
                extra,
            )
        };
        let llama3 = r#""rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192"#;
        for (extra, want) in [
            (
                r#", "rope_scaling": {"type": "dynamic", "factor": 4.0}"#,
                "`dynamic` is not supported",
            ),
            (
                r#", "rope_scaling": {"rope_type": "linear"}"#,
                "`factor` is missing",
            ),
            (
                r#", "rope_scaling": {"rope_type": "yarn", "factor": "4"}"#,
                "`factor` is not a number",
            ),
            (
                r#", "rope_scaling": {"rope_type": "yarn", "factor": -4.0}"#,
                "factor -4",
            ),
            (
                r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
                "`low_freq_factor` is missing",
            ),
        ] {
            let err = read(extra).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("config.json"), "{err}");
        }
        for extra in [
            format!(r#", "rope_theta": 500000.0, "rope_scaling": {{{llama3}}}"#),
            format!(r#", "rope_parameters": {{"rope_theta": 500000.0, {llama3}}}"#),
        ] {
            let c = read(&extra).unwrap();
            assert_eq!(c.rope_theta, 500000.0);
            assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        }
        let yarn = |fields: &str| -> RopeScaling {
            let extra = format!(
                r#", "max_position_embeddings": 4096, "rope_scaling": {{"type": "yarn"{fields}}}"#
            );
            read(&extra).unwrap().rope_scaling.unwrap()
        };
        let attention_factor = 0.1 * 4f64.ln() + 1.0;
        let expected = RopeScaling::Yarn(Yarn {
            factor: 4.0,
            original_context: 1024,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
            attention_factor,
        });
        let original = r#", "original_max_position_embeddings": 1024"#;
        assert_eq!(yarn(&format!(r#", "factor": 4.0{original}"#)), expected);
        assert_eq!(yarn(original), expected, "the factor from the two contexts");
    }

    /// Phi-3.5's LongRoPE from either form (the releases': `type` in `rope_scaling`, the
    /// original context at the top level; transformers 5's `rope_parameters`), its attention
    /// factor derived from the two contexts; factors that do not fit the heads refused.
    #[test]
    fn longrope_is_read_in_either_form() {
        let dir = tempfile::tempdir().unwrap();
        let read = |extra: &str| {
            let family =
                r#""architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 131072"#;
            read_small_config(dir.path(), family, 2, extra)
        };
        let factors = |short: &str| {
            format!(r#""short_factor": [{short}], "long_factor": [1, 2, 3, 4, 5, 6, 7, 8]"#)
        };
        let eight = factors("1, 1, 1, 1, 1.5, 2, 2, 2");
        let expected = RopeScaling::LongRope(super::super::config::LongRope {
            short: vec![1.0, 1.0, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0],
            long: (1..=8).map(|f| f as f32).collect(),
            original_context: 4096,
            attention_factor: (1.0 + 32f64.ln() / 4096f64.ln()).sqrt(),
        });
        for extra in [
            format!(
                r#", "original_max_position_embeddings": 4096,
                "rope_scaling": {{"type": "longrope", {eight}}}"#
            ),
            format!(
                r#", "rope_parameters": {{"rope_theta": 10000.0, "rope_type": "longrope",
                "original_max_position_embeddings": 4096, {eight}}}"#
            ),
        ] {
            assert_eq!(read(&extra).unwrap().rope_scaling, Some(expected.clone()));
        }
        for (extra, want) in [
            (
                format!(r#", "rope_scaling": {{"type": "longrope", {eight}}}"#),
                "`original_max_position_embeddings` is missing",
            ),
            (
                format!(
                    r#", "original_max_position_embeddings": 4096,
                    "rope_scaling": {{"type": "longrope", {}}}"#,
                    factors("1, 1")
                ),
                "2 short and 8 long factors for 16 rotated dimensions per head",
            ),
        ] {
            let err = read(&extra).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("config.json"), "{err}");
        }
    }

    /// Phi-4-mini rotates three quarters of each head, from either config form (heads of 16
    /// here: 12 dimensions); a fraction leaving no even number of dimensions is refused.
    #[test]
    fn partial_rotation_is_read_in_either_form() {
        let dir = tempfile::tempdir().unwrap();
        let read = |extra: &str| {
            let family = r#""architectures": ["Phi3ForCausalLM"]"#;
            read_small_config(dir.path(), family, 2, extra)
        };
        for extra in [
            r#", "partial_rotary_factor": 0.75"#,
            r#", "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default",
                "partial_rotary_factor": 0.75}"#,
        ] {
            let config = read(extra).unwrap();
            assert_eq!((config.rotary_dim(), config.inv_freq().len()), (12, 6));
        }
        assert_eq!(
            read(r#", "partial_rotary_factor": 1.0"#)
                .unwrap()
                .partial_rotary_dim,
            None
        );
        let err = read(r#", "partial_rotary_factor": 0.05"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`partial_rotary_factor` is 0"), "{err}");
    }

    /// Gemma's configs as transformers 4 (the released checkpoints) and 5 write them: the
    /// sliding-window layers from `layer_types` or the release's pattern, Gemma 3's local
    /// rotation base beside the global one; what tsq does not compute is refused by name.
    #[test]
    fn gemma_configs_are_read_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let gemma3 = r#""model_type": "gemma3_text""#;
        let read = |family, layers, extra| read_small_config(dir.path(), family, layers, extra);
        let legacy = r#", "query_pre_attn_scalar": 256, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window": 1024, "sliding_window_pattern": 6"#;
        let c = read(gemma3, 12, legacy).unwrap();
        let g = c.gemma.as_ref().unwrap();
        assert_eq!(g.local_layers, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]);
        assert_eq!((g.local_rope_theta, c.rope_theta), (Some(10000.0), 1e6));
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        assert_eq!((c.sliding_window, c.attention_span()), (Some(1024), 2048));
        let gemma2 = r#""architectures": ["Gemma2ForCausalLM"]"#;
        let c = read(
            gemma2,
            4,
            r#", "query_pre_attn_scalar": 144, "final_logit_softcapping": 30.0"#,
        )
        .unwrap();
        let g = c.gemma.unwrap();
        assert_eq!((g.local_layers, g.final_softcap), (vec![0, 2], Some(30.0)));
        assert_eq!(g.local_rope_theta, None);
        for (family, extra, want) in [
            (gemma2, "", "`query_pre_attn_scalar`: missing"),
            (
                gemma2,
                r#", "query_pre_attn_scalar": 1, "layer_types": ["full_attention"]"#,
                "`layer_types`: 1 entries for 4 layers",
            ),
            (
                gemma2,
                r#", "query_pre_attn_scalar": 1, "attn_logit_softcapping": -1"#,
                "`attn_logit_softcapping` is -1",
            ),
            (
                gemma3,
                r#", "query_pre_attn_scalar": 1"#,
                "`rope_local_base_freq`: missing",
            ),
            (
                gemma2,
                r#", "query_pre_attn_scalar": 1, "hidden_activation": "gelu""#,
                "`hidden_act` is `gelu`; tsq computes this family's MLP with `gelu_pytorch_tanh`",
            ),
            (
                r#""architectures": ["LlamaForCausalLM"]"#,
                r#", "hidden_act": "relu""#,
                "`hidden_act` is `relu`",
            ),
        ] {
            let err = read(family, 4, extra).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("config.json"), "{err}");
        }
    }

    #[test]
    fn generation_config_names_the_end_tokens() {
        let dir = tempfile::tempdir().unwrap();
        assert!(generation_eos_ids(dir.path()).is_empty());
        let file = dir.path().join("generation_config.json");
        for (text, ids) in [
            (r#"{"eos_token_id": 7}"#, vec![7]),
            (
                r#"{"eos_token_id": [32000, 32001, 32007]}"#,
                vec![32000, 32001, 32007],
            ),
            (r#"{"eos_token_id": [-1, 5]}"#, vec![5]),
            (r#"{"bos_token_id": 1}"#, vec![]),
            ("not json", vec![]),
        ] {
            std::fs::write(&file, text).unwrap();
            assert_eq!(generation_eos_ids(dir.path()), ids, "{text}");
        }
    }

    /// Fused projections split into their parts and back; rows that do not add up are an
    /// error naming the checkpoint's tensor.
    #[test]
    fn fused_projections_split_and_join_again() {
        let config = tiny_config(Architecture::Phi3);
        let weights = random_weights(&config, 4, &Device::Cpu);
        let mut fused = weights.clone();
        fuse(&config, &mut fused).unwrap();
        assert!(fused.contains_key("layers.1.attn.qkv_proj.weight"));
        assert!(!fused.contains_key("layers.1.mlp.up_proj.weight"));
        let mut split = fused.clone();
        unfuse(&config, &mut split, hf_name).unwrap();
        assert_eq!(
            split.keys().collect::<Vec<_>>(),
            weights.keys().collect::<Vec<_>>()
        );
        for (name, w) in &weights {
            let diff = (w - &split[name])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        let qkv = "layers.0.attn.qkv_proj.weight";
        let short = fused[qkv]
            .narrow(0, 1, fused[qkv].dim(0).unwrap() - 1)
            .unwrap();
        fused.insert(qkv.into(), short);
        let err = unfuse(&config, &mut fused, hf_name)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.layers.0.self_attn.qkv_proj.weight"),
            "{err}"
        );
    }

    fn logits(tf: &Transformer) -> Tensor {
        let ids = Tensor::new(&[[5u32, 3, 9, 1, 7]], &Device::Cpu).unwrap();
        let batch = Batch::left_padded(&[0], 0, 5, &Device::Cpu).unwrap();
        tf.forward(&ids, &batch, None, Mode::Fast, LogitsAt::All)
            .unwrap()
    }

    #[test]
    fn sharded_weights_load_as_one_model_in_f32_bf16_and_f16() {
        let config = tiny_config(Architecture::Qwen2);
        let weights = random_weights(&config, 9, &Device::Cpu);
        let dir = tempfile::tempdir().unwrap();
        // Two shards, as HF writes them for large models: every tensor in exactly one file.
        let (first, second): (Vec<_>, Vec<_>) = weights
            .iter()
            .map(|(k, v)| (hf_name(k), v.clone()))
            .enumerate()
            .partition(|(i, _)| i % 2 == 0);
        for (file, shard) in [
            ("model-00001-of-00002", first),
            ("model-00002-of-00002", second),
        ] {
            let shard: std::collections::HashMap<String, Tensor> =
                shard.into_iter().map(|(_, kv)| kv).collect();
            candle_core::safetensors::save(&shard, dir.path().join(format!("{file}.safetensors")))
                .unwrap();
        }
        let loaded = load_tensors(dir.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(loaded.len(), weights.len());
        let expected = logits(&Transformer::new(config.clone(), weights).unwrap());
        let f32_logits = logits(&Transformer::new(config.clone(), loaded).unwrap());
        let diff = (&f32_logits - &expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);

        // bf16 keeps ~3 significant digits, f16 ~4: same logits to a few percent of their range.
        let max_abs = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let scale = max_abs(&expected);
        for dtype in [DType::BF16, DType::F16] {
            let weights = load_tensors(dir.path(), dtype, &Device::Cpu).unwrap();
            let tf = Transformer::new(config.clone(), weights).unwrap();
            assert_eq!(tf.weights_dtype(), dtype);
            let diff = max_abs(&(logits(&tf) - &expected).unwrap());
            assert!(
                diff < 0.05 * scale,
                "{dtype:?} logits differ by {diff} (scale {scale})"
            );
        }
    }
}
