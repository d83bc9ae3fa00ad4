//! Reading GGUF files: config from metadata, weights dequantized to the working dtype under
//! canonical names, and the tokenizer and chat template from metadata.
//!
//! llama.cpp's converter permutes the rows of q and k (so its rope can rotate adjacent pairs);
//! HF checkpoints rotate halves. We undo the permutation here so GGUF and safetensors models load
//! to one canonical layout and share one forward pass.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::config::{Architecture, ConfigError, DEFAULT_ROPE_THETA, ModelConfig, RopeScaling};
use super::error::{ModelError, Result};

/// Everything tsq takes from a GGUF file.
pub struct GgufModel {
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, Value>,
}

/// Reads the file's header (metadata and tensor table) without loading weights.
pub fn read_header(path: &Path) -> Result<(Content, BufReader<File>)> {
    let file = crate::fsutil::open_regular(path)
        .map_err(|e| ModelError::load(path, format!("cannot open: {e}")))?;
    let size = file
        .metadata()
        .map_err(|e| ModelError::load(path, format!("cannot stat: {e}")))?
        .len();
    let mut reader = BufReader::new(file);
    let content = super::gguf_header::read_content(&mut reader, size)
        .map_err(|e| ModelError::load(path, format!("not a readable GGUF file: {e}")))?;
    Ok((content, reader))
}

pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel> {
    let (content, mut reader) = read_header(path)?;
    let mut config = config_from_metadata(path, &content.metadata)?;
    let mut read = |gguf_name: &str| -> Result<Tensor> {
        let q = content
            .tensor(&mut reader, gguf_name, &Device::Cpu)
            .map_err(|e| ModelError::load(path, format!("tensor `{gguf_name}`: {e}")))?;
        Ok(q.dequantize(&Device::Cpu)?)
    };
    // Llama 3.1+'s rope scaling, as llama.cpp's converter stores it: one divisor per frequency.
    if content.tensor_infos.contains_key(ROPE_FREQS) {
        let divisors = read(ROPE_FREQS)?.flatten_all()?.to_vec1::<f32>()?;
        config.rope_scaling = Some(RopeScaling::Divisors(divisors));
        config.check().map_err(|e| ModelError::config(path, e))?;
    }
    let mut tensors = BTreeMap::new();
    for gguf_name in content.tensor_infos.keys() {
        let Some(name) = canonical_name(gguf_name) else {
            continue;
        };
        let mut t = read(gguf_name)?;
        if let Some(heads) = permuted_heads(&name, &config) {
            t = unpermute_rows(&t, heads)?;
        }
        tensors.insert(name, t.to_dtype(dtype)?.to_device(device)?);
    }
    Ok(GgufModel {
        config,
        tensors,
        metadata: content.metadata,
    })
}

/// The tensor of per-frequency rope divisors (Llama 3.1+ in llama.cpp's converter).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// GGUF tensor name → canonical name (`blk.3.ffn_up.weight` → `layers.3.mlp.up_proj.weight`).
pub fn canonical_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("embed.weight"),
        "output_norm.weight" => Some("norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let module = match module {
        "attn_q" => "attn.q_proj",
        "attn_k" => "attn.k_proj",
        "attn_v" => "attn.v_proj",
        "attn_output" => "attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_q_norm" => "attn.q_norm",
        "attn_k_norm" => "attn.k_norm",
        "attn_norm" => "attn_norm",
        "ffn_norm" => "mlp_norm",
        _ => return None,
    };
    Some(format!("layers.{layer}.{module}.{suffix}"))
}

/// How many heads a permuted tensor was split into, for q and k weights and biases.
fn permuted_heads(name: &str, config: &ModelConfig) -> Option<usize> {
    if matches!(
        config.architecture,
        Architecture::Qwen2 | Architecture::Qwen3
    ) {
        return None; // llama.cpp does not permute Qwen2's or Qwen3's q/k.
    }
    if name.contains(".attn.q_proj.") {
        Some(config.num_heads)
    } else if name.contains(".attn.k_proj.") {
        Some(config.num_kv_heads)
    } else {
        None
    }
}

/// Inverse of llama.cpp's `permute`: rows grouped per head as (2, d/2) were stored as (d/2, 2).
fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = t.dim(0)?;
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(ModelError::Input(format!(
            "a q/k tensor of {rows} rows cannot be split into {heads} heads of row pairs"
        )));
    }
    let rest: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    let out = t
        .reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(out)
}

fn meta<'a>(path: &Path, md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key)
        .ok_or_else(|| ModelError::load(path, format!("GGUF metadata lacks `{key}`")))
}

fn meta_usize(path: &Path, md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    let v = meta(path, md, key)?;
    let not_count = || {
        ModelError::load(
            path,
            format!("GGUF metadata `{key}` is not a count (a non-negative integer)"),
        )
    };
    let value = match v.to_u64().or_else(|_| v.to_u32().map(u64::from)) {
        Ok(x) => x,
        Err(_) => {
            let signed = v
                .to_i32()
                .map(i64::from)
                .or_else(|_| v.to_i64())
                .map_err(|_| not_count())?;
            u64::try_from(signed).map_err(|_| not_count())?
        }
    };
    usize::try_from(value).map_err(|_| not_count())
}

fn meta_f64(path: &Path, md: &HashMap<String, Value>, key: &str) -> Result<f64> {
    let v = meta(path, md, key)?;
    v.to_f32()
        .map(f64::from)
        .or_else(|_| v.to_f64())
        .map_err(|_| ModelError::load(path, format!("GGUF metadata `{key}` is not a number")))
}

pub fn meta_str<'a>(path: &Path, md: &'a HashMap<String, Value>, key: &str) -> Result<&'a str> {
    meta(path, md, key)?
        .to_string()
        .map(String::as_str)
        .map_err(|_| ModelError::load(path, format!("GGUF metadata `{key}` is not a string")))
}

pub fn config_from_metadata(path: &Path, md: &HashMap<String, Value>) -> Result<ModelConfig> {
    let arch_name = meta_str(path, md, "general.architecture")?;
    let architecture = Architecture::parse(arch_name)
        .ok_or_else(|| ModelError::config(path, ConfigError::Unsupported(arch_name.to_string())))?;
    if architecture == Architecture::Phi3 {
        let refused = ConfigError::FusedGguf(arch_name.to_string());
        return Err(ModelError::config(path, refused));
    }
    let key = |k: &str| format!("{arch_name}.{k}");
    let hidden_size = meta_usize(path, md, &key("embedding_length"))?;
    let num_heads = meta_usize(path, md, &key("attention.head_count"))?;
    let vocab_size = match meta_usize(path, md, &key("vocab_size")) {
        Ok(v) => v,
        Err(_) => meta(path, md, "tokenizer.ggml.tokens")?
            .to_vec()
            .map(Vec::len)
            .map_err(|_| {
                ModelError::load(path, "GGUF metadata `tokenizer.ggml.tokens` is not a list")
            })?,
    };
    let num_layers = meta_usize(path, md, &key("block_count"))?;
    let config = ModelConfig {
        architecture,
        hidden_size,
        intermediate_size: meta_usize(path, md, &key("feed_forward_length"))?,
        num_layers,
        num_heads,
        num_kv_heads: meta_usize(path, md, &key("attention.head_count_kv")).unwrap_or(num_heads),
        head_dim: meta_usize(path, md, &key("attention.key_length"))
            .unwrap_or(hidden_size / num_heads.max(1)),
        vocab_size,
        rope_theta: meta_f64(path, md, &key("rope.freq_base")).unwrap_or(DEFAULT_ROPE_THETA),
        rms_norm_eps: meta_f64(path, md, &key("attention.layer_norm_rms_epsilon"))?,
        max_position_embeddings: meta_usize(path, md, &key("context_length"))?,
        tie_word_embeddings: true, // corrected by the loader when `output.weight` exists
        rope_scaling: None,        // set by the loader from `rope_freqs.weight` if present
        sliding_window: meta_usize(path, md, &key("attention.sliding_window")).ok(),
        // llama.cpp keeps no list in its GGUFs: SmolLM3's every fourth layer is implied.
        layers_without_rope: ModelConfig::default_layers_without_rope(architecture, num_layers),
    };
    // Older converters describe other scalings in metadata; tsq does not compute them.
    if let Ok(kind) = meta_str(path, md, &key("rope.scaling.type"))
        && !matches!(kind, "none" | "llama3")
    {
        return Err(ModelError::config(
            path,
            ConfigError::UnsupportedGgufRopeScaling(kind.to_string()),
        ));
    }
    config.check().map_err(|e| ModelError::config(path, e))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF holding only this metadata (no tensors), as a crafted file would.
    fn gguf_with(dir: &Path, overrides: &[(&str, Value)]) -> std::path::PathBuf {
        let mut meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("llama.embedding_length".into(), Value::U32(64)),
            ("llama.attention.head_count".into(), Value::U32(4)),
            ("llama.vocab_size".into(), Value::U32(100)),
            ("llama.feed_forward_length".into(), Value::U32(128)),
            ("llama.block_count".into(), Value::U32(2)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Value::F32(1e-5),
            ),
            ("llama.context_length".into(), Value::U32(512)),
        ];
        for (k, v) in overrides {
            meta.retain(|(name, _)| name != k);
            meta.push((k.to_string(), v.clone()));
        }
        let path = dir.join("crafted.gguf");
        let mut file = File::create(&path).unwrap();
        let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        candle_core::quantized::gguf_file::write(&mut file, &refs, &[]).unwrap();
        path
    }

    #[test]
    fn crafted_metadata_is_a_located_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        assert!(crate::model::read_config(&gguf_with(dir.path(), &[])).is_ok());
        let cases: [(&str, Value, &str); 8] = [
            (
                "general.architecture",
                Value::String("phi3".into()),
                "`phi3` GGUFs are not read",
            ),
            (
                "llama.rope.scaling.type",
                Value::String("yarn".into()),
                "GGUF rope scaling `yarn` is not supported",
            ),
            (
                "llama.block_count",
                Value::I32(-3),
                "`llama.block_count` is not a count",
            ),
            (
                "llama.block_count",
                Value::U64(1 << 40),
                "`num_layers` is 1099511627776",
            ),
            (
                "llama.context_length",
                Value::U64(u64::MAX),
                "`max_position_embeddings`",
            ),
            ("llama.vocab_size", Value::U32(0), "`vocab_size` is 0"),
            ("llama.embedding_length", Value::I64(-1), "is not a count"),
            (
                "llama.attention.layer_norm_rms_epsilon",
                Value::F32(f32::NAN),
                "`rms_norm_eps`",
            ),
        ];
        for (key, value, want) in cases {
            let path = gguf_with(dir.path(), &[(key, value)]);
            let err = crate::model::read_config(&path).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("crafted.gguf"),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn canonical_names() {
        assert_eq!(
            canonical_name("blk.12.ffn_up.weight").as_deref(),
            Some("layers.12.mlp.up_proj.weight")
        );
        assert_eq!(
            canonical_name("blk.0.attn_q.bias").as_deref(),
            Some("layers.0.attn.q_proj.bias")
        );
        assert_eq!(
            canonical_name("token_embd.weight").as_deref(),
            Some("embed.weight")
        );
        assert_eq!(canonical_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        // llama.cpp: reshape(h, 2, d/2, in).swap(1, 2); build that from known rows and invert it.
        let (heads, d, cols) = (2usize, 4usize, 3usize);
        let hf = Tensor::arange(0f32, (heads * d * cols) as f32, &Device::Cpu)?
            .reshape((heads * d, cols))?;
        let gguf = hf
            .reshape((heads, 2, d / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((heads * d, cols))?;
        let back = unpermute_rows(&gguf, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        Ok(())
    }
}
