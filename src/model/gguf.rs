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

use super::config::{
    Architecture, ConfigError, DEFAULT_ROPE_THETA, Gemma, ModelConfig, RopeScaling,
};
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
    // Phi-3's long-context scaling (`longrope`), as llama.cpp's converter stores it.
    if content.tensor_infos.contains_key(LONGROPE_FACTORS) {
        let refused = ConfigError::UnsupportedGgufRopeScaling("longrope".into());
        return Err(ModelError::config(path, refused));
    }
    // Llama 3.1+'s rope scaling, as llama.cpp's converter stores it: one divisor per frequency.
    if content.tensor_infos.contains_key(ROPE_FREQS) {
        let divisors = read(ROPE_FREQS)?.flatten_all()?.to_vec1::<f32>()?;
        config.rope_scaling = Some(RopeScaling::Divisors(divisors));
        config.check().map_err(|e| ModelError::config(path, e))?;
    }
    let mut tensors = BTreeMap::new();
    for gguf_name in content.tensor_infos.keys() {
        let Some(name) = canonical_name(gguf_name, config.architecture) else {
            continue;
        };
        let mut t = read(gguf_name)?;
        if let Some(heads) = permuted_heads(&name, &config) {
            t = unpermute_rows(&t, heads)?;
        }
        // llama.cpp's converter stores Gemma's norms as 1 + w; the canonical weight is w.
        if config.architecture.is_gemma() && name.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        tensors.insert(name, t.to_dtype(dtype)?.to_device(device)?);
    }
    super::hf::unfuse(&config, &mut tensors, gguf_name)
        .map_err(|e| ModelError::load(path, e.to_string()))?;
    Ok(GgufModel {
        config,
        tensors,
        metadata: content.metadata,
    })
}

/// The tensor of per-frequency rope divisors (Llama 3.1+ in llama.cpp's converter).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// One of the two tensors of Phi-3's `longrope` factors in llama.cpp's converter.
const LONGROPE_FACTORS: &str = "rope_factors_long.weight";

/// Whole-model tensors: llama.cpp's name, canonical name.
const FIXED_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "embed.weight"),
    ("output_norm.weight", "norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Modules of a layer (`blk.N.<module>.weight`): llama.cpp's name, canonical name.
const LAYER_MODULES: [(&str, &str); 14] = [
    ("attn_q", "attn.q_proj"),
    ("attn_k", "attn.k_proj"),
    ("attn_v", "attn.v_proj"),
    ("attn_qkv", "attn.qkv_proj"),
    ("attn_output", "attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_q_norm", "attn.q_norm"),
    ("attn_k_norm", "attn.k_norm"),
    ("attn_norm", "attn_norm"),
    ("ffn_norm", "mlp_norm"),
    ("post_attention_norm", "attn_out_norm"),
    ("post_ffw_norm", "mlp_out_norm"),
];

/// GGUF tensor name → canonical name (`blk.3.ffn_up.weight` → `layers.3.mlp.up_proj.weight`).
/// Phi-3's `ffn_up` holds gate and up stacked (`mlp.gate_up_proj`), split after loading.
pub fn canonical_name(gguf: &str, architecture: Architecture) -> Option<String> {
    if let Some((_, name)) = FIXED_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let module = match (module, architecture) {
        ("ffn_up", Architecture::Phi3) => "mlp.gate_up_proj",
        _ => LAYER_MODULES.iter().find(|(g, _)| *g == module)?.1,
    };
    Some(format!("layers.{layer}.{module}.{suffix}"))
}

/// Canonical name → llama.cpp's name (inverse of [`canonical_name`]), for messages.
fn gguf_name(canonical: &str) -> String {
    if let Some((name, _)) = FIXED_NAMES.iter().find(|(_, c)| *c == canonical) {
        return name.to_string();
    }
    let renamed = canonical
        .strip_prefix("layers.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(layer, rest)| {
            let (module, suffix) = rest.rsplit_once('.')?;
            let module = match module {
                "mlp.gate_up_proj" => "ffn_up",
                _ => LAYER_MODULES.iter().find(|(_, c)| *c == module)?.0,
            };
            Some(format!("blk.{layer}.{module}.{suffix}"))
        });
    renamed.unwrap_or_else(|| canonical.to_string())
}

/// How many heads a permuted tensor was split into, for q and k weights and biases.
fn permuted_heads(name: &str, config: &ModelConfig) -> Option<usize> {
    if matches!(
        config.architecture,
        Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Phi3
            | Architecture::Gemma2
            | Architecture::Gemma3
    ) {
        return None; // llama.cpp permutes only its Llama family's q/k.
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
    // llama.cpp's `gemma3` is the text model (HF's `gemma3` names the multimodal one).
    let architecture = match arch_name {
        "gemma3" => Some(Architecture::Gemma3),
        other => Architecture::parse(other),
    }
    .ok_or_else(|| ModelError::config(path, ConfigError::Unsupported(arch_name.to_string())))?;
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
    let head_dim = meta_usize(path, md, &key("attention.key_length"))
        .unwrap_or(hidden_size / num_heads.max(1));
    // Which half of each head's rotated part llama.cpp's rows hold depends on how its
    // converter permuted them; unchecked against a partial model, so refused.
    if let Ok(rotated) = meta_usize(path, md, &key("rope.dimension_count"))
        && rotated != head_dim
    {
        let refused = ConfigError::GgufPartialRotary { rotated, head_dim };
        return Err(ModelError::config(path, refused));
    }
    // Older converters describe other scalings in metadata; tsq does not compute them.
    let scaling = meta_str(path, md, &key("rope.scaling.type")).ok();
    if let Some(kind) = scaling.filter(|k| !matches!(*k, "none" | "llama3" | "linear")) {
        let refused = ConfigError::UnsupportedGgufRopeScaling(kind.to_string());
        return Err(ModelError::config(path, refused));
    }
    let config = ModelConfig {
        architecture,
        hidden_size,
        intermediate_size: meta_usize(path, md, &key("feed_forward_length"))?,
        num_layers,
        num_heads,
        num_kv_heads: meta_usize(path, md, &key("attention.head_count_kv")).unwrap_or(num_heads),
        head_dim,
        vocab_size,
        rope_theta: meta_f64(path, md, &key("rope.freq_base")).unwrap_or(DEFAULT_ROPE_THETA),
        rms_norm_eps: meta_f64(path, md, &key("attention.layer_norm_rms_epsilon"))?,
        max_position_embeddings: meta_usize(path, md, &key("context_length"))?,
        tie_word_embeddings: true, // corrected by the loader when `output.weight` exists
        // `linear` here; Llama 3's set by the loader from `rope_freqs.weight` if present.
        rope_scaling: match scaling {
            Some("linear") => Some(RopeScaling::Linear {
                factor: meta_f64(path, md, &key("rope.scaling.factor"))?,
            }),
            _ => None,
        },
        // Phi-4's converter writes 0 for "no window".
        sliding_window: meta_usize(path, md, &key("attention.sliding_window"))
            .ok()
            .filter(|&w| w > 0),
        // llama.cpp keeps no list in its GGUFs: SmolLM3's every fourth layer is implied.
        layers_without_rope: ModelConfig::default_layers_without_rope(architecture, num_layers),
        gemma: architecture.is_gemma().then(|| {
            let per_head = hidden_size / num_heads.max(1);
            gemma(architecture, md, &key, head_dim, per_head, num_layers)
        }),
        partial_rotary_dim: None,
    };
    config.check().map_err(|e| ModelError::config(path, e))?;
    Ok(config)
}

/// Gemma's settings as llama.cpp reads its GGUFs: soft caps from metadata; the rest is not in
/// the file, and llama.cpp derives it as below (its `llm_load_hparams`): sliding-window layers
/// by the releases' patterns (Gemma 2: every other from the first; Gemma 3: five of every six),
/// Gemma 3's local rotation base 10⁴, and an attention scale of head_dim^-½ except for the
/// 27B models (46 and 62 layers), whose `query_pre_attn_scalar` is hidden / heads
/// (`hidden_per_head`).
fn gemma(
    architecture: Architecture,
    md: &HashMap<String, Value>,
    key: &dyn Fn(&str) -> String,
    head_dim: usize,
    hidden_per_head: usize,
    layers: usize,
) -> Gemma {
    let gemma3 = architecture == Architecture::Gemma3;
    let pattern = if gemma3 { 6 } else { 2 };
    let large = layers == if gemma3 { 62 } else { 46 };
    let cap = |k: &str| {
        md.get(&key(k))
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
            .filter(|&c| c > 0.0)
    };
    Gemma {
        query_pre_attn_scalar: if large { hidden_per_head } else { head_dim },
        attn_softcap: cap("attn_logit_softcapping"),
        final_softcap: cap("final_logit_softcapping"),
        local_layers: (0..layers).filter(|i| i % pattern < pattern - 1).collect(),
        local_rope_theta: gemma3.then_some(10_000.0),
    }
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
        let cases: [(&str, Value, &str); 9] = [
            (
                "general.architecture",
                Value::String("gemma".into()),
                "unsupported architecture `gemma`",
            ),
            (
                "llama.rope.dimension_count",
                Value::U32(12),
                "rotates 12 of each head's 16 dimensions",
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
    fn longrope_factors_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = gguf_with(dir.path(), &[]);
        let (content, _) = read_header(&path).unwrap();
        let metadata: Vec<(&str, &Value)> = content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let factors = candle_core::Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
        let factors = candle_core::quantized::QTensor::quantize(
            &factors,
            candle_core::quantized::GgmlDType::F32,
        )
        .unwrap();
        let mut file = File::create(&path).unwrap();
        let tensors = [(LONGROPE_FACTORS, &factors)];
        candle_core::quantized::gguf_file::write(&mut file, &metadata, &tensors).unwrap();
        let err = load(&path, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("GGUF rope scaling `longrope` is not supported"),
            "{err}"
        );
    }

    #[test]
    fn canonical_names() {
        let llama = Architecture::Llama;
        for (gguf, canonical, architecture) in [
            (
                "blk.12.ffn_up.weight",
                "layers.12.mlp.up_proj.weight",
                llama,
            ),
            ("blk.0.attn_q.bias", "layers.0.attn.q_proj.bias", llama),
            ("token_embd.weight", "embed.weight", llama),
            (
                "blk.1.ffn_up.weight",
                "layers.1.mlp.gate_up_proj.weight",
                Architecture::Phi3,
            ),
            (
                "blk.1.attn_qkv.weight",
                "layers.1.attn.qkv_proj.weight",
                Architecture::Phi3,
            ),
        ] {
            assert_eq!(
                canonical_name(gguf, architecture).as_deref(),
                Some(canonical)
            );
            assert_eq!(gguf_name(canonical), gguf);
        }
        assert_eq!(canonical_name("rope_freqs.weight", llama), None);
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
